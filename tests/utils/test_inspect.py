"""bnkit.inspect: per-layer reports from modules, state_dicts and files; flags; table; plot; safety."""

import json
import math
import pathlib

import pytest
import safetensors.torch
import torch
from rich.console import Console
from torch import nn

import bnkit
import bnkit.nn as bnn
from bnkit.utils.checkpoint import read_safetensors
from bnkit.utils.inspect import LayerReport, format_table, inspect, plot_running_stats


def make_model() -> nn.Module:
    """Four layers, each with one problem (and one healthy), statistics set by hand."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3),      # 1: healthy
        nn.Conv2d(4, 5, 3), bnn.BatchNorm2d(5, momentum=None),  # 3: dead channels + zero weight
        nn.Flatten(), nn.LazyLinear(6), nn.BatchNorm1d(6),      # 6: non-finite
        nn.BatchNorm1d(6),                                      # 7: never updated
    )
    model(torch.randn(2, 3, 7, 7))  # materialize the lazy layer and count one batch everywhere
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        model[1].running_var.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        model[1].num_batches_tracked.fill_(7)
        model[3].running_var.copy_(torch.tensor([1.0, 1e-7, 0.0, 2.0, 5e-6]))
        model[3].weight.copy_(torch.tensor([1.0, 0.0, 1e-9, -2.0, 1e-3]))
        model[6].running_mean[2] = float("nan")
        model[6].running_var[4] = float("inf")
        model[7].reset_running_stats()
    return model


def check_reports(reports: list[LayerReport], from_module: bool) -> None:
    names = ["1", "3", "6", "7"]
    assert [r.name for r in reports] == names
    healthy, dead, bad, fresh = reports
    assert [r.channels for r in reports] == [4, 5, 6, 6]
    assert healthy.flags == [] and healthy.num_batches_tracked == 7
    rm = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    assert healthy.running_mean.mean == pytest.approx(rm.mean().item())
    assert healthy.running_mean.std == pytest.approx(rm.std(correction=0).item())
    assert (healthy.running_mean.min, healthy.running_mean.max) == (-1.0, 2.0)
    assert healthy.weight.mean == 1.0 and healthy.bias.max == 0.0

    if from_module:
        assert (healthy.eps, healthy.momentum, healthy.kind) == (1e-3, 0.1, "BatchNorm2d")
        assert (dead.momentum, dead.eps) == ("cumulative", 1e-5)
    else:
        assert (healthy.eps, healthy.momentum, healthy.kind) == (None, None, "state_dict")
    assert dead.dead_channels == [1, 2, 4]  # running_var < 1e-5 (the eps, or the default when unknown)
    assert dead.zero_weight_channels == [1, 2]  # |w| < 1e-8
    assert any("dead: 3 channels" in f for f in dead.flags) and any("zero weight: 2" in f for f in dead.flags)

    assert bad.nonfinite == {"running_mean": 1, "running_var": 1}
    assert bad.running_mean.nonfinite == 1 and math.isfinite(bad.running_mean.mean)
    assert any(f.startswith("non-finite") for f in bad.flags)

    assert fresh.never_updated and fresh.num_batches_tracked == 0
    assert fresh.running_var.mean == 1.0 and fresh.running_mean.max == 0.0
    assert any("never updated" in f for f in fresh.flags)


def test_module_source():
    check_reports(inspect(make_model()), from_module=True)


def test_state_dict_and_nested_dicts():
    sd = make_model().state_dict()
    check_reports(inspect(sd), from_module=False)
    for key in ("state_dict", "model", "model_state_dict", "ema"):
        check_reports(inspect({"epoch": 3, "optimizer": {"lr": 0.1}, key: sd}), from_module=False)
    wrapped = {f"module.{k}": v for k, v in sd.items()}  # DataParallel's prefix is kept in the names
    assert [r.name for r in inspect(wrapped)] == ["module.1", "module.3", "module.6", "module.7"]


def test_torch_and_safetensors_files(tmp_path: pathlib.Path):
    sd = make_model().state_dict()
    pt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "epoch": 1}, pt)
    check_reports(inspect(pt), from_module=False)
    check_reports(inspect(str(pt)), from_module=False)
    st = tmp_path / "model.safetensors"
    safetensors.torch.save_file(dict(sd), str(st))
    check_reports(inspect(st), from_module=False)
    renamed = tmp_path / "weights.bin"  # sniffed by content, not only by suffix
    renamed.write_bytes(st.read_bytes())
    check_reports(inspect(renamed), from_module=False)


def test_safetensors_reader_matches_the_safetensors_package(tmp_path: pathlib.Path):
    tensors = {
        "f64": torch.randn(3, 2, dtype=torch.float64), "f32": torch.randn(5), "f16": torch.randn(4).half(),
        "bf16": torch.randn(2, 3).bfloat16(), "i64": torch.arange(7), "u8": torch.arange(5, dtype=torch.uint8),
        "b": torch.tensor([True, False]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    mine = read_safetensors(path)
    theirs = safetensors.torch.load_file(str(path))
    assert mine.keys() == theirs.keys()
    for k in theirs:
        assert mine[k].dtype == theirs[k].dtype and mine[k].shape == theirs[k].shape, k
        assert torch.equal(mine[k], theirs[k]), k


def test_to_dict_is_strict_json():
    model = make_model()
    with torch.no_grad():
        model[6].bias.fill_(float("nan"))  # no finite entry: summaries are None
    reports = inspect(model)
    text = json.dumps([r.to_dict() for r in reports], allow_nan=False)
    back = json.loads(text)
    assert back[2]["bias"] == {"mean": None, "std": None, "min": None, "max": None, "nonfinite": 6}
    assert back[1]["momentum"] == "cumulative" and back[1]["dead_channels"] == [1, 2, 4]
    assert "values" not in back[0]
    assert json.loads(json.dumps(inspect(model.state_dict())[0].to_dict()))["eps"] is None


def test_table_and_plot(tmp_path: pathlib.Path):
    reports = inspect(make_model())
    table = format_table(reports)
    assert table.row_count == 4
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "never updated" in text and "cumulative" in text
    pt = tmp_path / "c.pt"
    torch.save(make_model().state_dict(), pt)
    out = plot_running_stats(pt, tmp_path / "stats.png")  # a source is inspected first (one plot: it is slow)
    assert out == tmp_path / "stats.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    with pytest.raises(ValueError, match="no batch-norm"):
        plot_running_stats(nn.Linear(2, 2), tmp_path / "none.png")


class _Payload:
    """A pickle that would run code (create a file) if it were unpickled unsafely."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_clear_errors_and_no_code_execution(tmp_path: pathlib.Path):
    with pytest.raises(FileNotFoundError):
        inspect(tmp_path / "missing.pt")
    junk = tmp_path / "notes.txt"
    junk.write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        inspect(junk)
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(sentinel)}, evil)
    with pytest.raises(ValueError, match="not a checkpoint"):
        inspect(evil)
    assert not sentinel.exists()
    with pytest.raises(ValueError, match="not a checkpoint"):
        inspect({"epoch": 3, "lr": 0.1})
    with pytest.raises(ValueError, match="not a checkpoint"):
        inspect([1, 2, 3])
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\xff" * 20)
    with pytest.raises(ValueError, match="not a checkpoint"):
        inspect(bad_st)
    with pytest.raises(ValueError, match="lazy"):
        inspect(nn.Sequential(nn.LazyBatchNorm1d()))


def test_top_level_export_is_the_same_function():
    assert bnkit.inspect is inspect
    assert inspect(nn.Linear(2, 2)) == []
