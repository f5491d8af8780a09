"""bnkit.diagnose: models built so that the truth is known, checked against float64 oracles."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_calls import call
from models import bn_batch_inputs
from torch import nn

import bnkit
import bnkit.nn as bnn
from bnkit.utils.diagnose import DEAD, NOISY, NONFINITE, OK, STALE, Diagnosis

DT = torch.float64
BN_INDICES = (1, 6)  # the batch-norm layers of make_model, by position (their names are "1" and "6")


def make_model(kind: str) -> nn.Sequential:
    """conv -> BN2d(8) -> relu -> pool -> flatten -> linear -> BN1d(8) -> linear: torch's or bnkit's layers."""
    bn2d, bn1d = (nn.BatchNorm2d, nn.BatchNorm1d) if kind == "torch" else (bnn.BatchNorm2d, bnn.BatchNorm1d)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), bn2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 8), bn1d(8), nn.Linear(8, 5),
    ).to(DT)
    with torch.no_grad():
        for i in BN_INDICES:
            model[i].weight.uniform_(0.5, 2)
            model[i].bias.uniform_(-1, 1)
    return model


def make_data(sizes=(16, 16, 16, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 6, 6, generator=g, dtype=DT) * 2 + 1, torch.zeros(n)) for n in sizes]


def batch_inputs(model: nn.Sequential, data) -> dict[int, list[torch.Tensor]]:
    """The oracle: each BN layer's input batch by batch, every BN normalizing with its batch statistics."""
    return bn_batch_inputs(model, data, BN_INDICES)


def per_channel(x: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (C, N * ...)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def exact_stats(model, data) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for i, chunks in batch_inputs(model, data).items():
        var, mean = torch.var_mean(torch.cat([per_channel(c) for c in chunks], 1), dim=1, correction=1)
        out[i] = (mean, var)
    return out


def set_exact(model, data) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    stats = exact_stats(model, data)
    with torch.no_grad():
        for i, (mean, var) in stats.items():
            model[i].running_mean.copy_(mean)
            model[i].running_var.copy_(var)
            model[i].num_batches_tracked.fill_(10)
    return stats


# --- the verdicts ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torch", "bnkit"])
def test_exact_running_statistics_are_ok(kind):
    model, data = make_model(kind), make_data()
    set_exact(model, data)
    model.eval()
    d = bnkit.diagnose(model, data, progress=False)
    assert [layer.name for layer in d.layers] == ["1", "6"]
    for layer in d.layers:
        assert layer.verdict == OK, (layer.name, layer.advice)
        assert layer.divergence.worst < 1e-12 and abs(layer.mean_shift.worst) < 1e-6
        assert abs(layer.var_ratio.worst - 1) < 1e-9
        assert layer.output_effect < 1e-9 and layer.prediction_change == 0.0
        assert layer.batches == 4 and layer.samples_per_batch == 16
    assert d.layer("1").values_per_batch == 16 * 4 * 4 and d.layer("6").values_per_batch == 16
    assert d.healthy and d.worst_layer is None and d.output_effect_all < 1e-9


@pytest.mark.parametrize("kind", ["torch", "bnkit"])
@pytest.mark.parametrize("layer_index", BN_INDICES)
def test_running_mean_shifted_by_three_data_stds_in_four_channels_is_stale(kind, layer_index):
    model, data = make_model(kind), make_data()
    stats = set_exact(model, data)
    mean, var = stats[layer_index]
    shifted = [1, 3, 4, 6]
    bn = model[layer_index]
    with torch.no_grad():
        bn.running_mean[shifted] += 3 * var[shifted].sqrt()
    model.eval()
    d = bnkit.diagnose(model, data, progress=False)
    name, other = str(layer_index), str(sum(BN_INDICES) - layer_index)
    layer = d.layer(name)
    assert layer.verdict == STALE and "bnkit.recalibrate(model, data)" in layer.advice
    # the shift in the layer's units (sqrt(var + eps)), derived by hand: 3 sqrt(var) / sqrt(var + eps)
    expect_shift = 3 * var[shifted].sqrt() / (var[shifted] + bn.eps).sqrt()
    assert layer.mean_shift.channel in shifted
    assert layer.mean_shift.worst == pytest.approx(float(expect_shift[shifted.index(layer.mean_shift.channel)]),
                                                   rel=1e-6)
    assert layer.mean_shift.worst == pytest.approx(3.0, rel=1e-4)
    assert abs(layer.mean_shift.median) < 1e-6  # 4 of 8 channels: the lower median is an untouched one
    # a pure shift s: KL = s^2 / 2 = 4.5, the variance ratio stays 1
    assert layer.divergence.worst == pytest.approx(float(expect_shift.square().max()) / 2, rel=1e-6)
    assert layer.var_ratio.worst == pytest.approx(1.0, abs=1e-9)
    assert d.layer(other).verdict == OK
    assert d.worst_layer == name
    assert layer.output_effect > 0.1 and d.layer(other).output_effect < 1e-9


def test_variance_ratio_and_divergence_by_hand():
    model, data = make_model("bnkit"), make_data()
    mean, var = set_exact(model, data)[6]
    bn = model[6]
    with torch.no_grad():
        bn.running_var[2] = 4 * var[2]
        bn.running_mean[2] += var[2].sqrt()
    d = bnkit.diagnose(model.eval(), data, progress=False)
    layer = d.layer("6")
    s, r = var[2] + bn.eps, 4 * var[2] + bn.eps
    shift = var[2].sqrt() / s.sqrt()
    kl = 0.5 * (math.log(r / s) + (s + var[2]) / r - 1)  # KL(N(mu, s) || N(mu + sd, r))
    assert layer.var_ratio.channel == 2 and layer.var_ratio.worst == pytest.approx(float(r / s), rel=1e-9)
    assert layer.mean_shift.worst == pytest.approx(float(shift), rel=1e-9)
    assert layer.divergence.channel == 2 and layer.divergence.worst == pytest.approx(float(kl), rel=1e-9)
    assert layer.verdict == STALE


@pytest.mark.parametrize("kind", ["torch", "bnkit"])
def test_batches_of_two_wobble_and_are_noisy(kind):
    model, data = make_model(kind), make_data(sizes=(2,) * 24, seed=3)
    set_exact(model, data)
    d = bnkit.diagnose(model.eval(), data, progress=False)
    layer = d.layer("6")
    assert layer.verdict == NOISY, layer.advice
    assert "larger" in layer.advice and "SyncBatchNorm" in layer.advice and "bnkit.freeze" in layer.advice
    # the oracle: RMS over batches of (batch mean - mean) / sqrt(population var + eps), and of
    # (biased batch var - population var) / (population var + eps), per channel
    chunks = [per_channel(c) for c in batch_inputs(model, data)[6]]
    allx = torch.cat(chunks, 1)
    mu, pop = allx.mean(1), allx.var(1, correction=0)
    means = torch.stack([c.mean(1) for c in chunks])
    variances = torch.stack([c.var(1, correction=0) for c in chunks])
    mean_wobble = ((means - mu).square().mean(0)).sqrt() / (pop + model[6].eps).sqrt()
    var_wobble = ((variances - pop).square().mean(0)).sqrt() / (pop + model[6].eps)
    assert layer.mean_wobble.median == pytest.approx(float(mean_wobble.median()), rel=1e-9)
    assert layer.mean_wobble.worst == pytest.approx(float(mean_wobble.max()), rel=1e-9)
    assert layer.var_wobble.median == pytest.approx(float(var_wobble.median()), rel=1e-9)
    assert layer.mean_wobble.median > 0.5  # about 1/sqrt(2) for batches of two
    assert layer.samples_per_batch == 2 and layer.values_per_batch == 2


def test_sorted_batches_wobble_and_the_advice_is_to_shuffle():
    # Batches of 32 samples, each drawn from one of four clusters 3 standard deviations apart
    # (data that arrives sorted by class): the batch means wobble far more than 1/sqrt(32).
    bn = nn.BatchNorm1d(4).double()
    g = torch.Generator().manual_seed(6)
    data = [torch.randn(32, 4, generator=g, dtype=DT) + 3.0 * (k % 4) for k in range(8)]
    allx = torch.cat(data)
    with torch.no_grad():
        bn.running_mean.copy_(allx.mean(0))
        bn.running_var.copy_(allx.var(0))
    layer = bnkit.diagnose(bn.eval(), data, progress=False).layer("")
    assert layer.verdict == NOISY and "not i.i.d." in layer.advice and "shuffle" in layer.advice
    expect = torch.stack([x.mean(0) - allx.mean(0) for x in data]).square().mean(0).sqrt()
    expect = expect / (allx.var(0, correction=0) + bn.eps).sqrt()
    assert layer.mean_wobble.median == pytest.approx(float(expect.median()), rel=1e-9)
    shuffled = list(allx[torch.randperm(len(allx), generator=g)].split(32))
    assert bnkit.diagnose(bn, shuffled, progress=False).layer("").verdict == OK


def test_large_batches_do_not_wobble():
    model, data = make_model("bnkit"), make_data(sizes=(256, 256), seed=4)
    set_exact(model, data)
    layer = bnkit.diagnose(model.eval(), data, progress=False).layer("6")
    assert layer.mean_wobble.median < 0.15 and layer.verdict == OK


def test_non_finite_running_statistics_weight_and_input(tmp_path):
    model, data = make_model("bnkit"), make_data()
    set_exact(model, data)
    with torch.no_grad():
        model[1].running_var[2] = float("nan")
        model[6].weight[0] = float("inf")
    d = bnkit.diagnose(model.eval(), data, progress=False)
    assert d.layer("1").verdict == NONFINITE and "bnkit.recalibrate" in d.layer("1").advice
    assert any("non-finite" in f for f in d.layer("1").flags)
    assert d.layer("6").verdict == NONFINITE and "weight" in d.layer("6").advice
    # strict JSON even with NaN in the numbers
    text = json.dumps(d.to_dict(), allow_nan=False)
    assert Diagnosis.from_dict(json.loads(text)).to_dict() == d.to_dict()
    assert "non-finite" in str(d)
    assert d.plot(tmp_path / "nan.png").read_bytes().startswith(b"\x89PNG")  # NaN effects drawn as 0

    # a non-finite input: the layer's data statistics are NaN
    model2 = make_model("torch")
    set_exact(model2, data)
    bad = [(x.clone(), y) for x, y in data]
    bad[1][0][0, 0, 0, 0] = float("nan")
    d2 = bnkit.diagnose(model2.eval(), bad, progress=False)
    assert d2.layer("1").verdict == NONFINITE and "upstream" in d2.layer("1").advice


@pytest.mark.parametrize("kind", ["torch", "bnkit"])
def test_dead_channels(kind):
    model, data = make_model(kind), make_data()
    with torch.no_grad():
        model[5].weight[3] = 0.0  # channel 3 of the BN1d layer's input is the constant bias
        model[5].bias[3] = 0.7
    stats = set_exact(model, data)
    assert float(stats[6][1][3]) == 0.0  # the oracle agrees: a constant channel
    d = bnkit.diagnose(model.eval(), data, progress=False)
    layer = d.layer("6")
    assert layer.verdict == DEAD and layer.dead_channels == [3]
    assert any("dead" in f for f in layer.flags)
    assert d.layer("1").verdict == OK
    # running_var < eps while the data varies: the running statistics are wrong, not the channel
    with torch.no_grad():
        model[1].running_var[5] = 0.0
    assert bnkit.diagnose(model, data, progress=False).layer("1").verdict == STALE


def test_never_updated_and_high_momentum_advice():
    model = make_model("torch")
    data = [(x * 4 + 3, y) for x, y in make_data()]
    d = bnkit.diagnose(model.eval(), data, progress=False)  # fresh layers: 0 and 1
    assert d.layer("1").verdict == STALE and "never updated" in d.layer("1").advice
    set_exact(model, data)
    model[6].momentum = 0.9
    with torch.no_grad():
        model[6].running_mean += 2
    assert "momentum 0.9" in bnkit.diagnose(model, data, progress=False).layer("6").advice


def test_frozen_layers_are_diagnosed_too():
    model, data = make_model("bnkit"), make_data()
    set_exact(model, data)
    bnkit.freeze(model)
    assert isinstance(model[6], bnn.FrozenBatchNorm1d)
    # a frozen layer normalizes with its running statistics in every mode: the oracle for the
    # last layer is its input in a plain forward, where the first layer is frozen too
    seen = []
    handle = model[6].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    handle.remove()
    var, mean = torch.var_mean(torch.cat(seen), dim=0, correction=1)
    with torch.no_grad():
        model[6].running_mean.copy_(mean)
        model[6].running_var.copy_(var)
        model[6].running_mean[[0, 5]] += 3 * var[[0, 5]].sqrt()
    before = snapshot(model)
    d = bnkit.diagnose(model, data, progress=False)
    assert snapshot(model) == before
    assert [(x.name, x.kind) for x in d.layers] == [("1", "FrozenBatchNorm2d"), ("6", "FrozenBatchNorm1d")]
    layer = d.layer("6")
    assert layer.verdict == STALE and "bnkit.unfreeze(model)" in layer.advice
    assert layer.mean_shift.channel in (0, 5) and layer.mean_shift.worst == pytest.approx(3.0, rel=1e-4)
    assert layer.mean_wobble.worst is None and layer.var_wobble.worst is None  # no batch statistics
    assert d.layer("1").verdict == OK and d.layer("1").divergence.worst < 1e-12
    assert d.worst_layer == "6" and d.layer("1").output_effect < 1e-9 and layer.output_effect > 0.1


# --- the model is left alone -------------------------------------------------------------------

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
              "_state_dict_hooks", "_load_state_dict_pre_hooks")


def snapshot(model: nn.Module) -> list:
    """Everything about a model diagnose may touch, as comparable values (tensors as bytes)."""

    def raw(t):
        return None if t is None else (t.dtype, tuple(t.shape), t.detach().cpu().contiguous().numpy().tobytes())

    state = []
    for name, m in model.named_modules():
        hooks = tuple((d, tuple(getattr(m, d, {}).items())) for d in HOOK_DICTS)
        attrs = sorted((k, repr(v)) for k, v in m.__dict__.items()
                       if k not in ("_parameters", "_buffers", "_modules") and k not in HOOK_DICTS)
        state.append((name, type(m), m.training, hooks, attrs))
        for pname, p in m._parameters.items():
            state.append((name, pname, id(p), raw(p), p.requires_grad, raw(p.grad)))
        for bname, b in m._buffers.items():
            state.append((name, bname, id(b), raw(b)))
    return state


def mixed_state_model(kind: str) -> nn.Sequential:
    model = make_model(kind)
    model.train()
    model[1].eval()  # a user's choices that diagnose must keep
    model[6].track_running_stats = True
    model[5].weight.requires_grad_(False)
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    model[6].register_forward_hook(lambda m, i, o: None)
    model.register_forward_pre_hook(lambda m, i: None)
    return model


@pytest.mark.parametrize("kind", ["torch", "bnkit"])
def test_model_is_byte_identical_afterwards(kind):
    model, data = mixed_state_model(kind), make_data()
    if kind == "bnkit":
        model[6]._bnkit_normalize_with = "batch"  # an enclosing batch_stats's setting
    before = snapshot(model)
    grad_enabled = torch.is_grad_enabled()
    d = bnkit.diagnose(model, data, progress=False)
    assert snapshot(model) == before
    assert torch.is_grad_enabled() == grad_enabled
    assert len(d.layers) == 2


class RaisesAt:
    """A re-iterable data set whose ``fail_on``-th pass raises after ``after`` batches."""

    def __init__(self, data, after: int, fail_on: int) -> None:
        self.data, self.after, self.fail_on, self.passes = data, after, fail_on, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.data):
            if self.passes == self.fail_on and i == self.after:
                raise RuntimeError("data loader failed")
            yield batch


@pytest.mark.parametrize("kind", ["torch", "bnkit"])
@pytest.mark.parametrize("fail_on", [1, 2])  # the statistics pass, the output-effect pass
def test_model_is_byte_identical_when_data_raises_halfway(kind, fail_on):
    model = mixed_state_model(kind)
    before = snapshot(model)
    data = RaisesAt(make_data(), after=2, fail_on=fail_on)
    with pytest.raises(RuntimeError, match="data loader failed"):
        bnkit.diagnose(model, data, progress=False)
    assert data.passes == fail_on
    assert snapshot(model) == before


def test_one_shot_iterator_and_num_batches():
    model, data = make_model("bnkit"), make_data(sizes=(8, 8, 8, 8, 8))
    set_exact(model, data[:3])
    d = bnkit.diagnose(model.eval(), iter(data), num_batches=3, progress=False)
    assert d.batches == 3 and d.layer("6").batches == 3 and d.healthy


def test_variants_and_a_dict_batch():
    model = nn.Sequential(nn.Linear(4, 6), bnn.BatchRenorm1d(6), nn.ReLU(), bnn.GhostBatchNorm1d(6, 4),
                          nn.Linear(6, 3)).to(DT)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x, scale):
            return self.net(x * scale)

    net = Wrapper()
    g = torch.Generator().manual_seed(5)
    data = [{"x": torch.randn(16, 4, generator=g, dtype=DT), "scale": 2.0} for _ in range(3)]
    bnkit.recalibrate(net, data, progress=False)
    d = bnkit.diagnose(net.eval(), data, progress=False)
    assert [layer.name for layer in d.layers] == ["net.1", "net.3"]
    assert [layer.kind for layer in d.layers] == ["BatchRenorm1d", "GhostBatchNorm1d"]
    assert d.layer("net.1").divergence.worst < 1e-12
    # GhostBatchNorm normalizes virtual batches of 4 in train mode: its wobble is theirs
    ghost = d.layer("net.3")
    assert ghost.samples_per_batch == 4 and ghost.batches == 12 and d.layer("net.1").samples_per_batch == 16
    seen = []
    handle = model[3].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad(), bnkit.batch_stats(net, normalize_with="batch", update_running_stats=False):
        for batch in data:
            net(**batch)
    handle.remove()
    pieces = [p for x in seen for p in x.split(4)]
    allx = torch.cat(seen)
    mu, pop = allx.mean(0), allx.var(0, correction=0)
    wobble = torch.stack([p.mean(0) - mu for p in pieces]).square().mean(0).sqrt() / (pop + model[3].eps).sqrt()
    assert ghost.mean_wobble.median == pytest.approx(float(wobble.median()), rel=1e-9)


# --- showing it --------------------------------------------------------------------------------


def test_json_round_trip_table_and_plot(tmp_path):
    model, data = make_model("torch"), make_data()
    set_exact(model, data)
    with torch.no_grad():
        model[6].running_mean[0] += 5
    d = bnkit.diagnose(model.eval(), data, progress=False)
    payload = d.to_dict()
    text = json.dumps(payload, allow_nan=False)
    again = Diagnosis.from_dict(json.loads(text))
    assert again == d
    assert [(x["name"], x["verdict"]) for x in payload["layers"]] == [("1", OK), ("6", STALE)]
    assert payload["worst_layer"] == "6"
    names = {name for name, _ in model.named_modules()}
    assert all(x["name"] in names for x in payload["layers"])
    table = str(d)
    assert "stale running statistics" in table and "bnkit.recalibrate(model, data)" in table
    path = d.plot(tmp_path / "diagnosis.png")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 5_000


def test_bad_arguments():
    model, data = make_model("torch"), make_data()
    with pytest.raises(TypeError, match="nn.Module"):
        bnkit.diagnose("model", data)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        bnkit.diagnose(nn.Linear(2, 2), data)
    with pytest.raises(ValueError, match="no batches"):
        bnkit.diagnose(model, [], progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        bnkit.diagnose(model, data, num_batches=0)
    lazy = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="lazy layer '1' is not initialized"):
        bnkit.diagnose(lazy, [torch.randn(4, 3)], progress=False)
    assert isinstance(lazy[1].running_mean, nn.parameter.UninitializedBuffer)  # not materialized
    with pytest.raises(KeyError, match="no batch-norm layer named"):
        bnkit.diagnose(model, data, progress=False).layer("nope")


# --- the command line --------------------------------------------------------------------------

ENTRY_MODULE = '''
import torch
from torch import nn


def broken():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    data = [torch.randn(32, 4, dtype=torch.float64) for _ in range(4)]
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
        model[1].running_mean += 4.0  # far off for every channel
    return model.eval(), data


def not_a_pair():
    return 3


def wrong_model():
    return "model", []


def raises():
    raise OSError("dataset missing")


NOT_CALLABLE = 5
'''


@pytest.fixture
def entry_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "diagnose_entry.py").write_text(ENTRY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "diagnose_entry"


def test_command_table_json_and_plot(entry_module, tmp_path):
    code, out, err = call("diagnose", f"{entry_module}:broken", "--plot", str(tmp_path / "d.png"))
    assert code == 0, err
    assert "stale running statistics" in out and "bnkit.recalibrate(model, data)" in out
    assert (tmp_path / "d.png").read_bytes().startswith(b"\x89PNG")
    code, out, err = call("diagnose", f"{entry_module}:broken", "--json", "--num-batches", "2")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["batches"] == 2 and [(x["name"], x["verdict"]) for x in payload["layers"]] == [("1", STALE)]
    # the mean shift: 4 / sqrt(var + eps) of the data; far more than the 0.45 data stds of the threshold
    assert payload["layers"][0]["mean_shift"]["median"] > 1


@pytest.mark.parametrize(("entry", "message"), [
    ("nosuch_module_xyz:make", "cannot import"),
    ("{m}", "package.module:function"),
    ("{m}:missing", "no attribute"),
    ("{m}:NOT_CALLABLE", "not a function"),
    ("{m}:not_a_pair", "must return (model, data)"),
    ("{m}:wrong_model", "nn.Module"),
    ("{m}:raises", "OSError: dataset missing"),
])
def test_command_bad_entry_is_one_line(entry_module, entry, message):
    code, _, err = call("diagnose", entry.format(m=entry_module))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err


def test_a_layer_bnkit_cannot_steer_is_refused_before_any_batch_runs():
    from models import TimmStyleBatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), TimmStyleBatchNormAct2d(4), nn.BatchNorm2d(4))
    seen = []

    def data():
        for _ in range(3):
            seen.append(1)
            yield torch.randn(4, 3, 5, 5)

    with pytest.raises(TypeError, match=r"diagnose cannot control .*1 \(TimmStyleBatchNormAct2d\)"):
        bnkit.diagnose(model, data(), progress=False)
    assert seen == [] and type(model[2]) is nn.BatchNorm2d
