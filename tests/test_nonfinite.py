"""The non-finite guard: one bad batch must not poison running statistics for good."""

import warnings

import pytest
import torch
from bn_tolerances import ELEMENTWISE, assert_close
from torch import nn

import bnkit
import bnkit.nn as bnn
from bnkit.nonfinite import get_nonfinite_policy

DT = torch.float64


def batches(n=4, c=3):
    return [torch.randn(5, c, 4, dtype=DT) * 2 + 1 for _ in range(n)]


def bad_batch(kind="nan", c=3):
    x = torch.randn(5, c, 4, dtype=DT)
    x[0, 1, 2] = {"nan": float("nan"), "inf": float("inf")}[kind]
    return x


def buffers(bn):
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


def test_torch_corrupts_running_stats_forever_and_bnkit_skip_does_not():
    good = batches()
    torch_bn = nn.BatchNorm1d(3).to(DT)
    skip_bn = bnn.BatchNorm1d(3, nonfinite="skip").to(DT)
    clean = nn.BatchNorm1d(3).to(DT)  # the oracle: torch on the good batches only
    for bn in (torch_bn, skip_bn, clean):
        bn(good[0])
    with pytest.warns(RuntimeWarning, match="not finite") as record:
        skip_bn(bad_batch())
    assert len([w for w in record if "not finite" in str(w.message)]) == 1
    torch_bn(bad_batch())
    for x in good[1:]:
        for bn in (torch_bn, skip_bn, clean):
            bn(x)
    # torch: NaN forever (channel 1 got the NaN; the others are fine)
    assert torch.isnan(torch_bn.running_mean[1]) and torch.isnan(torch_bn.running_var[1])
    # bnkit with skip: exactly torch on the good batches, num_batches_tracked included
    for a, b in zip(buffers(skip_bn), buffers(clean), strict=True):
        assert_close(a, b, table=ELEMENTWISE)
    skip_bn.eval()
    clean.eval()
    assert_close(skip_bn(good[0]), clean(good[0]), table=ELEMENTWISE)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_skip_leaves_buffers_bitwise_untouched_with_momentum_none(kind):
    bn = bnn.BatchNorm2d(3, momentum=None, nonfinite="skip").to(DT)
    bn(torch.randn(2, 3, 2, 2, dtype=DT))
    before = buffers(bn)
    with pytest.warns(RuntimeWarning):
        bn(bad_batch(kind).reshape(5, 3, 2, 2))
    for a, b in zip(buffers(bn), before, strict=True):
        assert torch.equal(a, b)


def test_raise_names_the_layer_and_writes_nothing():
    model = nn.Sequential(nn.Identity(), nn.Sequential(bnn.BatchNorm1d(3, nonfinite="raise").to(DT)))
    bnkit.name_layers(model)
    bn = model[1][0]
    before = buffers(bn)
    with pytest.raises(FloatingPointError, match=r"1\.0 \(BatchNorm1d\(3\)\)"):
        model(bad_batch())
    for a, b in zip(buffers(bn), before, strict=True):
        assert torch.equal(a, b)


def test_process_wide_switch_and_context_manager():
    follows = bnn.BatchNorm1d(3).to(DT)  # nonfinite=None: follows the process-wide default
    explicit = bnn.BatchNorm1d(3, nonfinite="propagate").to(DT)
    model = nn.ModuleDict({"block": nn.Sequential(follows)})
    assert get_nonfinite_policy() == "propagate"
    with bnkit.nonfinite_policy("skip", model=model):
        with pytest.warns(RuntimeWarning, match=r"block\.0 \(BatchNorm1d\(3\)\)"):
            follows(bad_batch())
        explicit(bad_batch())
    assert get_nonfinite_policy() == "propagate"
    assert torch.isfinite(follows.running_mean).all()
    assert torch.isnan(explicit.running_mean).any()

    with pytest.raises(KeyError):
        with bnkit.nonfinite_policy("raise"):
            raise KeyError("user code failed")
    assert get_nonfinite_policy() == "propagate"

    bnkit.set_nonfinite_policy("raise")
    try:
        with pytest.raises(FloatingPointError):
            follows(bad_batch())
    finally:
        bnkit.set_nonfinite_policy("propagate")


def test_default_is_torch_behaviour_and_finite_batches_never_warn():
    bn = bnn.BatchNorm1d(3).to(DT)
    ref = nn.BatchNorm1d(3).to(DT)
    x = bad_batch()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not finite")
        bn(x)
        ref(x)
        guarded = bnn.BatchNorm1d(3, nonfinite="skip").to(DT)
        guarded(batches()[0])
    torch.testing.assert_close(bn.running_mean, ref.running_mean, equal_nan=True)
    torch.testing.assert_close(bn.running_var, ref.running_var, equal_nan=True)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1


def test_invalid_policies_are_rejected():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        bnn.BatchNorm1d(3, nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        bnkit.set_nonfinite_policy("ignore")
    with pytest.raises(ValueError, match="cannot be None"):
        bnkit.set_nonfinite_policy(None)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        with bnkit.nonfinite_policy("sometimes"):
            pass
    assert get_nonfinite_policy() == "propagate"


def test_naming_a_model_with_torch_layers_warns_that_they_are_not_guarded():
    model = nn.Sequential(nn.BatchNorm1d(3), bnn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match=r"1 batch-norm layer\(s\) are torch's.*\(0\)"):
        assert bnkit.name_layers(model) == ["1"]
