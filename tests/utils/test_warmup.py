"""Compiling ahead of time (bnkit.utils.warmup, ``bnkit warmup``) and the notice of a first compile
(bnkit.kernels.compiling)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnkit
from bnkit.cli import main
from bnkit.utils.warmup import warmup

SRC = Path(bnkit.__file__).resolve().parents[1]


# On a cold cache this compiles every float32 kernel (minutes on 2 cores); in the suite most are compiled
# by the tests before it.
@pytest.mark.timeout(1200)
def test_warmup_runs_every_step_then_has_nothing_to_compile():
    seen: list[tuple[int, int, str]] = []
    first = warmup(["float32"], on_step=lambda done, total, label: seen.append((done, total, label)))
    assert first.dtypes == ("float32",) and first.steps > 10 and first.seconds > 0
    assert [s[0] for s in seen] == list(range(first.steps + 1))
    assert all(total == first.steps for _, total, _ in seen) and seen[-1][2] == "done"
    assert all(label.startswith("float32: ") for _, _, label in seen[:-1])
    # every kernel of these paths is now compiled in this process: the same warmup compiles nothing
    again = warmup([torch.float32])
    assert again.compiled == () and again.steps == first.steps


@pytest.mark.timeout(1200)
def test_warmup_in_worker_processes_reports_every_step():
    # after the test above the float32 kernels are in numba's cache: the workers load them (a cold cache
    # compiles in both workers, which only a run of minutes shows: docs/benchmarks.md has the figure)
    seen: list[tuple[int, int, str]] = []
    report = warmup(["float32"], on_step=lambda done, total, label: seen.append((done, total, label)), jobs=2)
    assert report.jobs == 2 and report.compiled == ()
    assert [s[0] for s in seen] == list(range(report.steps + 1)) and seen[-1][2] == "done"
    finished = [label for _, _, label in seen[1:-1]]
    assert len(set(finished)) == len(finished) and all(label.startswith("float32: ") for label in finished)
    assert report.steps == warmup(["float32"]).steps


def test_a_dtypes_backend_and_activation_parts_wait_for_its_layer_part():
    # they run drivers the layer steps compile: started at once, two workers would compile them twice
    from bnkit.utils.warmup import _parts, _ready

    parts = _parts([torch.float32, torch.bfloat16])
    assert parts[:2] == [("float32", "layers"), ("bfloat16", "layers")]  # the longest parts first
    assert ("bfloat16", "activation") not in parts  # no fused-activation kernels for 16-bit data
    waiting = [p for p in parts if p[1] != "layers"]
    assert not any(_ready(p, set()) for p in waiting)
    assert [p for p in waiting if _ready(p, {("float32", "layers")})] == [
        ("float32", "activation"), ("float32", "backend")]  # fmt: skip
    assert waiting[-1][1] == "backend"  # the shortest parts (drivers already compiled) last
    assert all(_ready(p, {("float32", "layers"), ("bfloat16", "layers")}) for p in waiting)


def test_warmup_rejects_other_dtypes():
    with pytest.raises(ValueError, match="int32"):
        warmup(["int32"])


def test_cli_warmup_json():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["warmup", "--dtypes", "float32", "--json"])
    assert code == 0
    report = json.loads(out.getvalue())
    assert report["dtypes"] == ["float32"] and report["steps"] > 10 and report["seconds"] >= 0
    assert report["cache_dir"]


def test_cli_warmup_plain_text_says_how_long():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["warmup", "--dtypes", "float32"])
    text = out.getvalue()
    assert code == 0
    assert "[1/" in text and "bnkit warmup: CPU kernels for float32" in text and " s (" in text


def test_cli_warmup_bad_jobs_is_one_line():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(SystemExit) as exc:
            main(["warmup", "--jobs", "-2"])
    assert exc.value.code == 2
    assert "--jobs" in err.getvalue() and "Traceback" not in err.getvalue()
    with pytest.raises(ValueError, match="jobs"):
        warmup(["float32"], jobs=-1)


def test_cli_warmup_bad_dtype_is_one_line():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(SystemExit) as exc:
            main(["warmup", "--dtypes", "float32,int8"])
    assert exc.value.code == 2
    assert "int8" in err.getvalue() and "Traceback" not in err.getvalue()


FIRST_CALL = """
import torch, bnkit
m = bnkit.nn.BatchNorm2d(4).double().eval()
with torch.no_grad():
    m(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    m(torch.randn(2, 4, 3, 3, dtype=torch.float64))
print("ok")
"""


def test_first_compile_says_so_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")  # empty: the first process compiles
    env["PYTHONPATH"] = str(SRC)

    def run() -> str:
        # -W error: the notice is logged, never a warning that a strict test suite would turn into an error
        proc = subprocess.run([sys.executable, "-W", "error", "-c", FIRST_CALL], capture_output=True, text=True,
                              env=env, timeout=240)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
        return proc.stderr

    cold = run()
    lines = [ln for ln in cold.splitlines() if "compiling CPU kernels" in ln]
    assert lines == [lines[0]] and "bnkit: compiling CPU kernels for float64 (one time" in lines[0], cold
    assert "float32" not in cold  # the backend's float32 probe compiles quietly
    assert "compiling" not in run()  # the second process loads from the cache
