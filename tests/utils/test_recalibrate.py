"""bnkit.recalibrate: exact statistics of everything each layer saw, state restored afterwards."""

import copy

import pytest
import torch
from bn_tolerances import assert_close
from models import bn_batch_inputs
from torch import nn

import bnkit
import bnkit.nn as bnn

DT = torch.float64
SIZES = [5, 2, 7, 3]  # uneven on purpose: an average of per-batch statistics would be wrong


def make_model() -> nn.Sequential:
    """conv -> torch BN -> relu -> conv -> bnkit BN (momentum=None) -> relu -> pool -> linear -> torch BN1d."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3), bnn.BatchNorm2d(5, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 6), nn.BatchNorm1d(6),
    ).to(DT)
    with torch.no_grad():
        for i in (1, 4, 9):
            model[i].weight.uniform_(0.5, 2)
            model[i].bias.uniform_(-1, 1)
    return model


def make_data(sizes=SIZES):
    return [(torch.randn(n, 3, 7, 7, dtype=DT) * 2 + 1, torch.zeros(n)) for n in sizes]


def expected_stats(model: nn.Sequential, data) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The oracle: each BN layer's input batch by batch, with every BN normalizing by its batch
    statistics (torch's F.batch_norm in training mode), concatenated, then mean and unbiased var."""
    seen = bn_batch_inputs(model, data, (1, 4, 9))
    out = {}
    for i, chunks in seen.items():
        allx = torch.cat(chunks).transpose(0, 1).reshape(chunks[0].shape[1], -1)
        var, mean = torch.var_mean(allx, dim=1, correction=1)
        out[i] = (mean, var)
    return out


def test_statistics_are_those_of_the_concatenated_data():
    model = make_model()
    data = make_data()
    expect = expected_stats(model, data)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    model.eval()  # the BN layers must still normalize with batch statistics during the run

    bnkit.recalibrate(model, data, progress=False)
    assert not any(m.training for m in model.modules())

    for i, (mean, var) in expect.items():
        assert_close(model[i].running_mean, mean)
        assert_close(model[i].running_var, var)
        assert model[i].num_batches_tracked.item() == len(SIZES)
    for k, v in model.named_parameters():
        assert torch.equal(v, weights[k]), k
    # Not the average of per-batch statistics (which differs when batch sizes differ).
    with torch.no_grad():
        per_batch_average = torch.stack([model[0](x).mean((0, 2, 3)) for x, _ in data]).mean(0)
    assert not torch.allclose(per_batch_average, model[1].running_mean, rtol=1e-6)  # far beyond rounding


def test_first_layer_directly_from_the_data_and_torch_update_bn_agrees_only_for_equal_batches():
    # Equal batch sizes: torch's update_bn (cumulative average of per-batch means) gives the same mean.
    model = make_model()
    data = make_data([4, 4, 4])
    bnkit.recalibrate(model, data, progress=False)
    conv_out = model[0](torch.cat([x for x, _ in data]))
    var, mean = torch.var_mean(conv_out, dim=(0, 2, 3), correction=1)
    assert_close(model[1].running_mean, mean.detach())
    assert_close(model[1].running_var, var.detach())
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    torch.optim.swa_utils.update_bn([x for x, _ in data], twin)
    assert_close(twin[1].running_mean, model[1].running_mean)


def test_num_batches_limit():
    model = make_model()
    data = make_data()
    expect = expected_stats(model, data[:2])
    bnkit.recalibrate(model, iter(data), num_batches=2, progress=False)
    for i, (mean, var) in expect.items():
        assert_close(model[i].running_mean, mean)
        assert_close(model[i].running_var, var)
        assert model[i].num_batches_tracked.item() == 2


def _state(model):
    """Everything recalibrate borrows: modes, momentum, hooks, bnkit's overrides."""
    return [(m.training, getattr(m, "track_running_stats", None), getattr(m, "momentum", None),
             list(m._forward_pre_hooks), list(m._forward_hooks), getattr(m, "_bnkit_normalize_with", None))
            for m in model.modules()]


def test_state_is_restored_and_other_modules_keep_their_mode():
    model = make_model()
    model.insert(3, nn.Dropout(0.5))
    model.eval()
    model[3].train()  # a user's choice that recalibrate must not change
    model[5]._bnkit_normalize_with = "running"  # a bnkit override, lifted during the run only
    before = _state(model)
    bnkit.recalibrate(model, [x for x, _ in make_data()], progress=False)
    assert _state(model) == before
    assert model[5]._bnkit_normalize_with == "running"
    assert model[1].momentum == 0.1 and model[5].momentum is None


def test_exception_in_data_leaves_everything_as_it_was():
    model = make_model()
    model.train()
    snapshot = copy.deepcopy(model.state_dict())
    before = _state(model)

    def data():
        yield make_data()[0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        bnkit.recalibrate(model, data(), progress=False)
    assert _state(model) == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_dict_batches_custom_forward_and_progress_bar(capsys):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3).to(DT)

        def forward(self, x, scale=1.0):
            return self.bn(x * scale)

    xs = [torch.randn(n, 3, dtype=DT) for n in (4, 6)]
    net = Net()
    bnkit.recalibrate(net, [{"x": x, "scale": 2.0} for x in xs], progress=True)
    var, mean = torch.var_mean(torch.cat(xs) * 2.0, dim=0, correction=1)
    assert_close(net.bn.running_mean, mean)
    assert_close(net.bn.running_var, var)
    assert "recalibrate" in capsys.readouterr().err

    net2 = Net()
    bnkit.recalibrate(net2, xs, progress=False, forward=lambda m, b: m(b, scale=2.0))
    assert_close(net2.bn.running_var, var)


def test_bnkit_channel_dim_layer():
    bn = bnn.BatchNorm1d(3, channel_dim=-1).to(DT)
    xs = [torch.randn(n, 5, 3, dtype=DT) for n in (2, 3)]
    bnkit.recalibrate(bn, xs, progress=False)
    var, mean = torch.var_mean(torch.cat(xs).reshape(-1, 3), dim=0, correction=1)
    assert_close(bn.running_mean, mean)
    assert_close(bn.running_var, var)


def test_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="num_batches"):
        bnkit.recalibrate(model, make_data(), num_batches=0, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        bnkit.recalibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="no batch-norm"):
        bnkit.recalibrate(nn.Linear(2, 2), [torch.randn(2, 2)], progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        bnkit.recalibrate("model", [], progress=False)
    assert _state(model) == _state(make_model())


def test_unused_layer_keeps_its_statistics_with_a_warning():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.BatchNorm1d(2)
            self.unused = nn.BatchNorm1d(2)

        def forward(self, x):
            return self.used(x)

    net = TwoHeads()
    net.unused.running_mean.fill_(3.0)
    with pytest.warns(RuntimeWarning, match="unused"):
        bnkit.recalibrate(net, [torch.randn(4, 2)], progress=False)
    assert torch.equal(net.unused.running_mean, torch.full((2,), 3.0))
    assert net.unused.num_batches_tracked.item() == 0


def test_masked_layer_counts_only_unmasked_elements():
    bn = bnn.BatchNorm1d(3).to(DT)
    xs = [torch.randn(n, 3, 6, dtype=DT) for n in (2, 4)]
    masks = [torch.rand(n, 6) > 0.4 for n in (2, 4)]
    for mk in masks:
        mk[:, 0] = True
    bnkit.recalibrate(bn, list(zip(xs, masks, strict=True)), progress=False,
                      forward=lambda m, b: m(b[0], mask=b[1]))
    kept = torch.cat([x.transpose(1, 2)[mk] for x, mk in zip(xs, masks, strict=True)])  # (count, C)
    var, mean = torch.var_mean(kept, dim=0, correction=1)
    assert_close(bn.running_mean, mean)
    assert_close(bn.running_var, var)
