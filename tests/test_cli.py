"""The ``bnkit`` command itself: entry points, sub-command wiring (inspect, bench), one-line errors.

``inspect`` and ``bench`` call other parts of bnkit (``bnkit.utils.inspect``,
``bnkit.bench.cpu``). Their wiring is tested here with stand-in modules, so these tests
exercise the command line alone; the end-to-end ``inspect`` tests run the real module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from cli_calls import call, one_line

from bnkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("BNKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "bnkit", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# --- entry points ---------------------------------------------------------------------------


def test_console_script_points_at_main():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; bnkit supports 3.10)
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert 'bnkit = "bnkit.cli:main"' in section
    assert callable(main)


def test_python_m_bnkit_help_lists_the_sub_commands():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr
    for command in ("explain", "inspect", "diagnose", "demo", "bench"):
        assert command in res.stdout


def test_sub_command_help_and_version():
    code, out, _ = call("explain", "--help")
    assert code == 0 and "--track-running-stats" in out and "--momentum" in out
    code, out, _ = call("--version")
    assert code == 0 and out.startswith("bnkit ")


@pytest.mark.parametrize(
    "args",
    [
        ["nosuch"],
        [],
        ["demo", "--epochs", "-3"],
        ["demo", "--lr", "fast"],
        ["explain", "--eps", "0"],
        ["explain", "--mode", "inference"],
        ["explain", "--input", "[[1]]", "--shape", "2,2"],
        ["explain", "--unknown-flag"],
        ["inspect"],
    ],
)
def test_bad_command_lines_are_one_line_errors(args):
    code, _, err = call(*args)
    assert code == 2
    assert one_line(err), err


# --- bench: forwards its arguments to bnkit.bench.cpu.main ------------------------------------


def test_bench_forwards_arguments(monkeypatch):
    seen: list[list[str]] = []
    fake = types.ModuleType("bnkit.bench.cpu")
    fake.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "bnkit.bench.cpu", fake)
    code, _, err = call("bench", "--quick", "--json", "--repeat", "3")
    assert code == 0, err
    assert seen == [["--quick", "--json", "--repeat", "3"]]
    fake.main = lambda argv: 1
    assert call("bench")[0] == 1


def test_bench_not_available_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bnkit.bench.cpu", None)  # import raises ModuleNotFoundError
    code, _, err = call("bench", "--quick")
    assert code == 3 and one_line(err) and "not available yet" in err


def test_demo_and_plots_without_the_demo_extra_name_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("sklearn", "matplotlib") else real(name, *a))
    code, out, err = call("demo", "--epochs", "1", "--out", str(tmp_path))
    assert code == 2 and one_line(err), err
    assert "scikit-learn" in err and "matplotlib" in err and "pip install 'bnkit[demo]'" in err
    assert not list(tmp_path.iterdir())  # nothing ran
    checkpoint = tmp_path / "m.pt"
    torch.save(torch.nn.Sequential(torch.nn.BatchNorm2d(2)).state_dict(), checkpoint)
    code, _, err = call("inspect", str(checkpoint), "--plot", str(tmp_path / "p.png"))
    assert code == 2 and one_line(err) and "pip install 'bnkit[demo]'" in err, err


def test_the_core_install_leaves_the_demo_libraries_to_their_extra():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "matplotlib" not in core and "scikit-learn" not in core
    demo = {d.split(">")[0].split("=")[0] for d in project["optional-dependencies"]["demo"]}
    assert {"matplotlib", "scikit-learn"} <= demo


# --- inspect: renders bnkit.utils.inspect's reports -------------------------------------------


@dataclass
class _Report:
    name: str
    channels: int

    def to_dict(self) -> dict:
        return asdict(self)


def _fake_inspect_module(calls: list) -> types.ModuleType:
    from rich.table import Table

    fake = types.ModuleType("bnkit.utils.inspect")

    def inspect(source):
        calls.append(("inspect", source))
        if Path(source).read_bytes().startswith(b"garbage"):
            raise ValueError(f"{source} is not a checkpoint")
        return [_Report("bn1", 6), _Report("bn2", 16)]

    def format_table(reports):
        table = Table("layer", "channels")
        for r in reports:
            table.add_row(r.name, str(r.channels))
        return table

    def plot_running_stats(reports, path):
        calls.append(("plot", path))
        Path(path).write_bytes(b"\x89PNG fake")

    fake.inspect, fake.format_table, fake.plot_running_stats = inspect, format_table, plot_running_stats
    return fake


def test_inspect_wiring_json_table_plot(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(sys.modules, "bnkit.utils.inspect", _fake_inspect_module(calls))
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"checkpoint")
    code, out, err = call("inspect", str(ckpt), "--json")
    assert code == 0, err
    assert json.loads(out) == [{"name": "bn1", "channels": 6}, {"name": "bn2", "channels": 16}]
    code, out, err = call("inspect", str(ckpt), "--plot", str(tmp_path / "stats.png"))
    assert code == 0, err
    assert "bn1" in out and "16" in out and (tmp_path / "stats.png").exists()
    assert ("plot", str(tmp_path / "stats.png")) in calls
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    code, _, err = call("inspect", str(bad))
    assert code == 2 and one_line(err) and "not a checkpoint" in err


def test_inspect_missing_file_is_one_line(tmp_path):
    code, _, err = call("inspect", str(tmp_path / "nope.pt"))
    assert code == 2 and one_line(err) and "file not found" in err


def test_inspect_not_available_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bnkit.utils.inspect", None)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    code, _, err = call("inspect", str(ckpt))
    assert code == 3 and one_line(err) and "not available yet" in err


# --- inspect end to end, with the real bnkit.utils.inspect -------------------------------------

needs_inspect = pytest.mark.skipif(not _have("bnkit.utils.inspect"),
                                   reason="bnkit.utils.inspect (model tools) is not in this build")


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, dict]:
    from bnkit.demo import bn_lenet

    torch.manual_seed(0)
    model = bn_lenet().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 28, 28) * 2 + 1)
    path = tmp_path / "lenet.pt"
    torch.save(model.state_dict(), path)
    return path, {"bn1": 6, "bn2": 16, "bn3": 120, "bn4": 84}


@needs_inspect
def test_inspect_real_checkpoint_json(checkpoint, tmp_path):
    path, layers = checkpoint
    res = run_cli("inspect", str(path), "--json", "--plot", str(tmp_path / "rs.png"))
    assert res.returncode == 0, res.stderr
    reports = json.loads(res.stdout)
    assert len(reports) == len(layers)
    text = json.dumps(reports)
    for name, channels in layers.items():
        assert name in text
        assert any(channels in r.values() for r in reports), (name, channels)
    assert (tmp_path / "rs.png").read_bytes().startswith(b"\x89PNG")


@needs_inspect
def test_inspect_real_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("this is not a checkpoint\n")
    res = run_cli("inspect", str(bad))
    assert res.returncode != 0
    assert one_line(res.stderr), res.stderr


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_reader_that_closes_early_is_not_an_error(extra):
    # `bnkit explain | head -1`: the reader leaves after one line; bnkit must exit 0, silently.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "bnkit", "explain", "--shape", "8,4,16,16", "--steps", "20", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err
