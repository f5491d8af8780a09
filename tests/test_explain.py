"""``bnkit explain``: the explained numbers against torch.nn (the oracle) and hand-derived values.

The library function :func:`bnkit.explain.explain` is tested in-process over the four modes;
the command is driven as a user would (subprocess, ``--json``) on representative cases.
"""

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
from bn_tolerances import ELEMENTWISE, FLOAT64_REFERENCE, SHORT, assert_close, tolerance
from cli_calls import call
from torch import nn

from bnkit.cli import main
from bnkit.explain import CLASSIC_INPUT, compare_with_torch, explain

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("BNKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "bnkit", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def channel_rows(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def torch_steps(x_steps, mode, momentum, eps, affine, track, dtype, weight=None, bias=None, rm=None, rv=None):
    """Oracle: torch.nn.BatchNormNd over the same calls -> list of (y, running_mean, running_var)."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x_steps[0].dim()]
    layer = cls(x_steps[0].shape[1], eps=eps, momentum=momentum, affine=affine, track_running_stats=track,
                dtype=dtype)
    with torch.no_grad():
        for name, v in (("weight", weight), ("bias", bias), ("running_mean", rm), ("running_var", rv)):
            if v is not None:
                getattr(layer, name).copy_(torch.tensor(v, dtype=dtype))
    layer.train(mode == "train")
    out = []
    for x in x_steps:
        with torch.no_grad():
            y = layer(x)
        rmean = None if layer.running_mean is None else layer.running_mean.clone()
        rvar = None if layer.running_var is None else layer.running_var.clone()
        out.append((y, rmean, rvar))
    return out


def test_classic_example_hand_derived():
    """The 2x2x2x2 example of the seed texts, by hand: channel 0 sees 1,1,1,2,0,-1,2,2."""
    e = explain(steps=1)
    ch0, ch1 = e.steps[0].channels
    assert e.layer == "BatchNorm2d" and e.count_per_channel == 8
    assert ch0.values == [1, 1, 1, 2, 0, -1, 2, 2]
    assert ch1.values == [-1, 1, 0, 1, 0, -1, 3, 1]
    assert ch0.mean == pytest.approx(1.0) and ch1.mean == pytest.approx(0.5)
    assert ch0.var_biased == pytest.approx(1.0) and ch1.var_biased == pytest.approx(1.5)
    assert ch0.var_unbiased == pytest.approx(8 / 7, rel=1e-6) and ch1.var_unbiased == pytest.approx(12 / 7, rel=1e-6)
    # running stats start at 0 and 1; momentum 0.1 weights the new batch
    assert ch0.running_mean_after == pytest.approx(0.1) and ch1.running_mean_after == pytest.approx(0.05)
    assert ch0.running_var_after == pytest.approx(0.9 + 0.1 * 8 / 7, rel=1e-6)
    assert ch0.normalized == pytest.approx([(v - 1.0) / (1.0 + 1e-5) ** 0.5 for v in ch0.values], rel=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_four_modes_match_torch(mode, track, momentum):
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 3, 5, generator=gen) * 2 + 1 for _ in range(3)]
    w, b = [1.5, -0.5, 2.0], [0.1, 0.2, -0.3]
    rm, rv = ([0.5, -1.0, 0.0], [2.0, 0.5, 1.0]) if track else (None, None)
    e = explain(xs, steps=3, mode=mode, momentum=momentum, track_running_stats=track, weight=w, bias=b,
                running_mean=rm, running_var=rv)
    expected = torch_steps(xs, mode, momentum, 1e-5, True, track, torch.float32, w, b, rm, rv)
    tol = tolerance(torch.float32, FLOAT64_REFERENCE)  # explain's textbook computes in float64
    for step, (y, rmean, rvar) in zip(e.steps, expected, strict=True):
        got_y = torch.tensor([ch.output for ch in step.channels])
        torch.testing.assert_close(got_y, channel_rows(y), **tol)
        torch.testing.assert_close(torch.tensor(step.output), y, **tol)
        assert step.normalize_with == ("batch" if mode == "train" or not track else "running")
        if track:
            torch.testing.assert_close(torch.tensor([ch.running_mean_after for ch in step.channels]), rmean, **tol)
            torch.testing.assert_close(torch.tensor([ch.running_var_after for ch in step.channels]), rvar, **tol)
        else:
            assert all(ch.running_mean_after is None for ch in step.channels)
    assert compare_with_torch(e) < 1e-5


def test_statistics_against_float64_formulas():
    x = torch.randn(3, 2, 4, 2, 3, dtype=torch.float64)  # BatchNorm3d
    e = explain(x, eps=1e-3, affine=False)
    rows = channel_rows(x)
    for ch in e.steps[0].channels:
        v = rows[ch.channel]
        assert ch.mean == pytest.approx(float(v.mean()), rel=1e-12)
        assert ch.var_biased == pytest.approx(float(v.var(unbiased=False)), rel=1e-12)
        assert ch.var_unbiased == pytest.approx(float(v.var(unbiased=True)), rel=1e-12)
        assert ch.invstd == pytest.approx(float(1 / (v.var(unbiased=False) + 1e-3).sqrt()), rel=1e-12)
        assert ch.weight == 1.0 and ch.bias == 0.0
    assert e.layer == "BatchNorm3d" and e.dtype == "float64"
    assert compare_with_torch(e) < 1e-12


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_backend_module_matches_torch(mode):
    """backend="auto": the bnkit module runs on the fast kernels; still torch's numbers."""
    x = torch.randn(6, 4, 3, 3) * 3 - 2
    e = explain(x, steps=2, mode=mode, backend="auto", running_mean=[0.1, 0.2, 0.3, 0.4],
                running_var=[1.0, 2.0, 0.5, 0.25])
    _, (y2, _, rv) = torch_steps([x, x], mode, 0.1, 1e-5, True, True, torch.float32,
                                          rm=[0.1, 0.2, 0.3, 0.4], rv=[1.0, 2.0, 0.5, 0.25])
    assert_close(torch.tensor(e.steps[1].output), y2, table=SHORT)
    torch.testing.assert_close(torch.tensor([c.running_var_after for c in e.steps[1].channels]), rv)
    assert compare_with_torch(e) < 1e-4


def test_momentum_none_is_cumulative_average():
    xs = [torch.tensor([[1.0], [3.0]]), torch.tensor([[5.0], [9.0]])]
    e = explain(xs, steps=2, momentum=None)
    assert [s.momentum for s in e.steps] == [1.0, 0.5]
    assert e.steps[1].channels[0].running_mean_after == pytest.approx((2.0 + 7.0) / 2)
    assert e.steps[1].channels[0].running_var_after == pytest.approx((2.0 + 8.0) / 2)  # unbiased: 2 and 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inputs": torch.ones(1, 3)}, "more than 1 value per channel"),
        ({"inputs": torch.ones(4)}, "2 to 5 dims"),
        ({"weight": [1.0, 2.0, 3.0]}, "one value per channel"),
        ({"affine": False, "weight": [1.0, 2.0]}, "--affine"),
        ({"track_running_stats": False, "running_mean": [0.0, 0.0]}, "--track-running-stats"),
        ({"mode": "test"}, "--mode"),
        ({"momentum": 1.5}, "--momentum"),
        ({"steps": 0}, "--steps"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        explain(**kwargs)


# --- the command, as a user runs it ---------------------------------------------------------


def test_cli_default_json_matches_torch():
    res = run_cli("explain", "--json", "--steps", "2")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    x = torch.tensor(CLASSIC_INPUT, dtype=torch.float32)
    expected = torch_steps([x, x], "train", 0.1, 1e-5, True, True, torch.float32)
    for step, (y, rmean, rvar) in zip(data["steps"], expected, strict=True):
        assert_close(torch.tensor(step["output"]), y, table=FLOAT64_REFERENCE)
        torch.testing.assert_close(torch.tensor([c["running_mean_after"] for c in step["channels"]]), rmean)
        torch.testing.assert_close(torch.tensor([c["running_var_after"] for c in step["channels"]]), rvar)
        assert step["torch"]["output"] < 1e-6
    assert [c["var_biased"] for c in data["steps"][0]["channels"]] == pytest.approx([1.0, 1.5])
    assert data["max_abs_diff_vs_torch"] < 1e-6


def test_cli_input_file_eval_float64(tmp_path):
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    path = tmp_path / "x.json"
    path.write_text(json.dumps(x.tolist()))
    res = run_cli("explain", "--input", f"@{path}", "--dtype", "float64", "--mode", "eval", "--no-affine",
                  "--running-mean", "[0.5, -2]", "--running-var", "[3, 0.25]", "--eps", "1e-3", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    (y, rm, rv), = torch_steps([x], "eval", 0.1, 1e-3, False, True, torch.float64, rm=[0.5, -2.0], rv=[3.0, 0.25])
    assert_close(torch.tensor(data["steps"][0]["output"], dtype=torch.float64), y, table=ELEMENTWISE)
    assert data["layer"] == "BatchNorm1d" and data["mode"] == "eval" and not data["affine"]


def test_cli_text_output_and_shape_option():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["explain", "--shape", "3,2,2,2", "--seed", "1", "--steps", "2", "--no-track-running-stats"])
    text = out.getvalue()
    assert code == 0
    assert "step 2 of 2" in text and "biased" in text and "unbiased" in text and "torch.nn" in text
    assert "running_mean" not in text.split("Why:")[0].split("step 1")[1]  # no running stats to show
    assert "\x1b[" not in text  # not a terminal: plain text, no colour codes


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "[[1, 2], [3"], "not valid JSON"),
        (["--input", "[[1, 2], [3]]"], "rectangular"),
        (["--input", "@/definitely/not/here.json"], "file not found"),
        (["--input", "[[1, 2], [3, 4]]", "--weight", "[1, 2, 3]"], "one value per channel"),
        (["--momentum", "abc"], "--momentum"),
        (["--shape", "2"], "--shape"),
    ],
)
def test_cli_user_errors_are_one_line(args, message):
    # in-process (the console script's own entry point) keeps the error cases fast
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["explain", *args])
        except SystemExit as exc:  # argparse errors
            code = exc.code
    text = err.getvalue()
    assert code != 0
    assert len(text.strip().splitlines()) == 1, text
    assert message in text and "Traceback" not in text


def test_cli_user_error_subprocess_has_no_traceback():
    res = run_cli("explain", "--input", "[[1, 2]]")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "more than 1 value per channel" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("values", [
    [1.0, 2.0, -3.0], [0.5, -1.25, 2.0412414], [1e-5, 1.0], [1e9, 2.0], [0.0, 1.5], [1.0143, 1.0714],
    [float("nan"), 1.5], [float("inf"), 2.0, -0.25], [3.0, 3000.5], [0.0, 0.0], [123456.0, 0.001],
])
def test_numbers_are_written_as_torch_prints_them(values):
    from bnkit.cli import torch_style

    printed = str(torch.tensor(values, dtype=torch.float64)).removeprefix("tensor([").split("]")[0]
    expected = [v.strip() for v in printed.split(",")]
    assert torch_style(values) == expected


def test_the_classic_example_reads_as_the_seed_text():
    # ../shared/seeds: running_var 1.0143, 1.0714 and outputs -1.2247, 2.0412 after one step of the example
    code, out, err = call("explain", "--no-affine")
    assert code == 0, err
    for number in ("1.0143", "1.0714", "-1.2247", "2.0412", "0.0500"):
        assert number in out
