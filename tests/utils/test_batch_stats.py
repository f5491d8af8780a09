"""bnkit.batch_stats: explicit control of what normalizes and what updates.

Expected behaviour comes from the table in the README (written out in ``expected`` below)
and is checked against torch's functional batch norm, the oracle, called with the
arguments each cell of the table means.
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import GRAD, assert_close
from torch import nn

import bnkit

D = torch.float64


def expected(training: bool, track: bool, normalize_with, update) -> tuple[bool, bool]:
    """(normalizes with batch statistics?, updates running statistics?): the README table."""
    if not track:  # no buffers: batch statistics, nothing to update
        return True, False
    use_batch = training if normalize_with is None else normalize_with == "batch"
    return use_batch, training if update is None else update


def _layer(kind: str, track: bool) -> nn.Module:
    cls = nn.BatchNorm2d if kind == "torch" else bnkit.nn.BatchNorm2d
    layer = cls(3, momentum=0.3, track_running_stats=track).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
        if track:
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    return layer


@pytest.mark.parametrize("kind", ["torch", "bnkit"])
@pytest.mark.parametrize("training", [True, False])
def test_full_table(kind, training):
    for track, nw, up in itertools.product([True, False], ["batch", "running", None], [True, False, None]):
        layer = _layer(kind, track).train(training)
        x = torch.randn(4, 3, 2, 3, dtype=D) * 2 + 1
        w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
        rm = None if layer.running_mean is None else layer.running_mean.clone()
        rv = None if layer.running_var is None else layer.running_var.clone()
        use_batch, update = expected(training, track, nw, up)
        if use_batch:
            want = F.batch_norm(x, None, None, w, b, True)
        else:
            want = F.batch_norm(x, rm, rv, w, b, False)  # the running stats as they were before the batch
        if update:
            F.batch_norm(x, rm, rv, None, None, True, 0.3)  # rm, rv <- what one training step makes them
        with bnkit.batch_stats(layer, normalize_with=nw, update_running_stats=up) as same:
            assert same is layer
            y = layer(x)
        case = f"training={training} track={track} normalize_with={nw} update={up}"
        assert_close(y, want, msg=case)
        if track:
            assert_close(layer.running_mean, rm, msg=case)
            assert_close(layer.running_var, rv, msg=case)
            assert layer.num_batches_tracked.item() == int(update), case
        assert type(layer) is (nn.BatchNorm2d if kind == "torch" else bnkit.nn.BatchNorm2d)
        assert layer.training is training


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(4 * 9, 5), nn.BatchNorm1d(5),
    ).double()


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_tent_batch_statistics_in_eval_without_touching_buffers():
    model = _model()
    for _ in range(2):
        model(torch.randn(8, 3, 3, 3, dtype=D))  # some running statistics
    model.eval()
    before = copy.deepcopy(model.state_dict())
    # TENT's own recipe (Wang et al. 2021): drop the buffers so torch uses batch statistics.
    ref = copy.deepcopy(model)
    for m in _bns(ref):
        m.track_running_stats = False
        m.running_mean = None
        m.running_var = None
    x = torch.randn(6, 3, 3, 3, dtype=D)
    with bnkit.batch_stats(model, normalize_with="batch", update_running_stats=False):
        y = model(x)
        y2 = model(x)  # dropout is still off (eval): deterministic
    y_ref = ref(x)
    assert_close(y, y_ref)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    params = [p for m in _bns(model) for p in (m.weight, m.bias)]
    params_ref = [p for m in _bns(ref) for p in (m.weight, m.bias)]
    g = torch.autograd.grad(y.square().sum(), params)
    g_ref = torch.autograd.grad(y_ref.square().sum(), params_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert_close(a, b, table=GRAD)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in _bns(model))


def test_adabn_reestimates_running_statistics_in_eval():
    model = _model().eval()
    for m in _bns(model):
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the target batches
    batches = [torch.randn(6, 3, 3, 3, dtype=D) * (k + 1) + k for k in range(3)]
    with bnkit.batch_stats(model, normalize_with="batch", update_running_stats=True):
        for x in batches:
            model(x)
    first = model[0]
    want_mean = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)
    want_var = torch.stack([x.var((0, 2, 3)) for x in batches]).mean(0)  # unbiased, as torch keeps it
    assert_close(first.running_mean, want_mean)
    assert_close(first.running_var, want_var)
    assert all(m.num_batches_tracked.item() == 3 for m in _bns(model))
    assert not model.training


def test_eval_but_keep_updating():
    bn = nn.BatchNorm1d(3).double().eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    x = torch.randn(10, 3, dtype=D) * 3
    with bnkit.batch_stats(bn, normalize_with="running", update_running_stats=True):
        y = bn(x)
    # normalized with the running statistics as they were before this batch ...
    assert_close(y, (x - 0.5) / (2.0 + 1e-5) ** 0.5)
    # ... which then absorb the batch with momentum 0.1 and the unbiased variance
    assert_close(bn.running_mean, 0.9 * 0.5 + 0.1 * x.mean(0))
    assert_close(bn.running_var, 0.9 * 2.0 + 0.1 * x.var(0))


def test_eval_but_keep_updating_with_mask():
    bn = bnkit.nn.BatchNorm1d(3, channel_dim=-1).double().eval()
    x = torch.randn(4, 5, 3, dtype=D)
    mask = torch.rand(4, 5) > 0.4
    mask[0, :2] = True
    with bnkit.batch_stats(bn, normalize_with="running", update_running_stats=True):
        y = bn(x, mask=mask)
    assert_close(y, x / (1 + 1e-5) ** 0.5)
    assert_close(bn.running_var, 0.9 + 0.1 * x[mask].var(0))


def test_torch_layers_keep_identity_hooks_and_state():
    model = _model()
    bn = model[2]
    ids = {name: id(t) for name, t in itertools.chain(bn.named_parameters(), bn.named_buffers())}
    state = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    bn.register_forward_hook(lambda m, i, o: calls.append(type(m)))
    bn.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    with bnkit.batch_stats(model, normalize_with="batch", update_running_stats=False):
        assert type(bn) is bnkit.nn.BatchNorm2d
        out = model(torch.randn(4, 3, 3, 3, dtype=D))
        # not out.sum(): through the last BatchNorm1d its gradient is 0 up to rounding
        (out * torch.linspace(-1, 1, out.numel(), dtype=D).view_as(out)).sum().backward()
        opt.step()
    assert calls == ["pre", bnkit.nn.BatchNorm2d]
    assert type(bn) is nn.BatchNorm2d
    assert {n: id(t) for n, t in itertools.chain(bn.named_parameters(), bn.named_buffers())} == ids
    assert not any(k in bn.__dict__ for k in ("channel_dim", "nonfinite", "_bnkit_normalize_with",
                                               "_bnkit_update_running_stats"))
    assert model.state_dict().keys() == state.keys()
    assert not torch.equal(model[2].weight, state["2.weight"])  # the optimizer stepped the same tensor
    for k in ("2.running_mean", "2.running_var", "2.num_batches_tracked"):
        assert torch.equal(model.state_dict()[k], state[k])
    model(torch.randn(4, 3, 3, 3, dtype=D))
    assert calls[-1] is nn.BatchNorm2d


def test_restored_on_exception():
    model = _model()
    bk = bnkit.nn.BatchNorm1d(2)
    bk._bnkit_normalize_with = "running"
    model.add_module("extra", bk)
    with pytest.raises(RuntimeError, match="boom"):
        with bnkit.batch_stats(model, normalize_with="batch", update_running_stats=True):
            assert bk._bnkit_normalize_with == "batch"
            raise RuntimeError("boom")
    assert type(model[0]) is nn.BatchNorm2d and "_bnkit_normalize_with" not in model[0].__dict__
    assert bk._bnkit_normalize_with == "running"
    assert "_bnkit_update_running_stats" not in bk.__dict__


def test_nested():
    model = _model().eval()
    bn = model[0]
    x = torch.randn(4, 3, 3, 3, dtype=D)
    with bnkit.batch_stats(model, normalize_with="batch", update_running_stats=False):
        with bnkit.batch_stats(model, normalize_with="running", update_running_stats=True):
            assert (bn._bnkit_normalize_with, bn._bnkit_update_running_stats) == ("running", True)
            model(x)
            assert bn.num_batches_tracked.item() == 1
        assert type(bn) is bnkit.nn.BatchNorm2d  # the outer block still holds it
        assert (bn._bnkit_normalize_with, bn._bnkit_update_running_stats) == ("batch", False)
        model(x)
        assert bn.num_batches_tracked.item() == 1
        with bnkit.batch_stats(model, normalize_with=None, update_running_stats=None):
            assert bnkit.nn.modes.resolve_mode(bn) == (False, False)  # torch's rule in eval
    assert type(bn) is nn.BatchNorm2d


def test_ignores_train_eval_switches_inside():
    model = _model()
    with bnkit.batch_stats(model, normalize_with="running", update_running_stats=False):
        model.train()
        model(torch.randn(4, 3, 3, 3, dtype=D))
    assert all(m.num_batches_tracked.item() == 0 for m in _bns(model))


def test_foreign_batch_norm_subclass_is_an_error_and_nothing_changes():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.BatchNorm2d(3), MyBN(3))
    with pytest.raises(TypeError, match=r"1 \(MyBN\)"):
        with bnkit.batch_stats(model, normalize_with="batch", update_running_stats=False):
            pass
    assert type(model[0]) is nn.BatchNorm2d and type(model[1]) is MyBN


def test_argument_validation():
    model = _model()
    with pytest.raises(ValueError, match="normalize_with must be 'batch', 'running' or None, got 'train'"):
        with bnkit.batch_stats(model, normalize_with="train", update_running_stats=False):
            pass
    with pytest.raises(TypeError, match="update_running_stats must be True, False or None, got int 1"):
        with bnkit.batch_stats(model, normalize_with="batch", update_running_stats=1):
            pass
    with pytest.raises(TypeError, match="expects an nn.Module"):
        with bnkit.batch_stats([model], normalize_with="batch", update_running_stats=False):
            pass
    with pytest.raises(TypeError):
        bnkit.batch_stats(model, "batch", False)  # keyword-only: the call site says what it does
    assert type(model[0]) is nn.BatchNorm2d


def test_docs_examples_run():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / "docs" / "beyond.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, "docs/beyond.md", "exec"), {})
