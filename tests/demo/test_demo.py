"""``bnkit demo``: the model, the data, the twins against torch.nn, and the command's output files."""

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
from bn_tolerances import SHORT, TRAINING, assert_close
from torch import nn

import bnkit
from bnkit.cli import main
from bnkit.demo import DemoConfig, bn_lenet, load_digits, train_twins
from bnkit.demo.data import Digits
from bnkit.demo.model import bn_layers
from bnkit.demo.train import accuracy

SRC = Path(__file__).resolve().parents[2] / "src"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "bnkit", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def small_digits() -> Digits:
    d = load_digits(seed=0)
    return Digits(d.x_train[:96], d.y_train[:96], d.x_test[:40], d.y_test[:40])


def test_bn_lenet_has_bn_after_every_conv_and_hidden_linear():
    model = bn_lenet()
    kinds = [type(m) for m in model.children()]
    assert kinds == [
        nn.Conv2d, nn.BatchNorm2d, nn.Sigmoid, nn.AvgPool2d,
        nn.Conv2d, nn.BatchNorm2d, nn.Sigmoid, nn.AvgPool2d,
        nn.Flatten,
        nn.Linear, nn.BatchNorm1d, nn.Sigmoid,
        nn.Linear, nn.BatchNorm1d, nn.Sigmoid,
        nn.Linear,
    ]
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert list(bn_layers(bnkit.convert(model))) == ["bn1", "bn2", "bn3", "bn4"]


def test_digits_are_bundled_split_and_upsampled():
    d = load_digits(seed=0)
    assert d.x_train.shape[1:] == (1, 28, 28) and d.x_test.shape[1:] == (1, 28, 28)
    assert len(d.y_train) + len(d.y_test) == 1797 and abs(len(d.y_test) - 0.2 * 1797) < 10
    assert d.x_train.dtype == torch.float32 and 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    counts = torch.bincount(d.y_test, minlength=10)
    assert int(counts.min()) >= 35  # stratified: about 20% of each digit (~180 each) is held out
    assert not torch.equal(d.y_test, torch.sort(d.y_test).values)  # ... in shuffled order
    again = load_digits(seed=0)
    assert torch.equal(again.y_test, d.y_test) and not torch.equal(load_digits(seed=1).y_test, d.y_test)


def test_twins_match_torch_and_start_identical(small_digits):
    result = train_twins(DemoConfig(epochs=1, batch_size=32, lr=0.5, seed=1), data=small_digits)
    h = result.history
    assert len(h.loss_torch) == 3 and len(h.loss_bnkit) == 3
    assert isinstance(result.bnkit_model.bn1, bnkit.nn.BatchNorm2d)
    assert type(result.torch_model.bn1) is nn.BatchNorm2d
    # the torch twin is the oracle: same losses, parameters and running statistics (float32 rounding)
    assert_close(torch.tensor(h.loss_bnkit), torch.tensor(h.loss_torch), table=SHORT)
    sd_t, sd_b = result.torch_model.state_dict(), result.bnkit_model.state_dict()
    assert sd_t.keys() == sd_b.keys()
    for key in sd_t:
        assert_close(sd_b[key], sd_t[key], table=TRAINING)
    # running stats were recorded at every step and moved away from their (0, 1) start
    assert len(h.running_mean["bn1"]) == 3 and h.running_mean["bn1"][-1].shape == (6,)
    assert float(h.running_var["bn3"][-1].sub(1).abs().max()) > 0


def test_train_mode_accuracy_leaves_the_model_alone(small_digits):
    result = train_twins(DemoConfig(epochs=1, batch_size=32, seed=2), data=small_digits)
    model = result.bnkit_model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = accuracy(model, small_digits.x_test, small_digits.y_test, batch_size=16, train_mode=True)
    assert 0.0 <= acc <= 1.0
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="batch size"):
        DemoConfig(batch_size=1)
    with pytest.raises(ValueError, match="lr"):
        DemoConfig(lr=0.0)


def test_demo_command_writes_plots_and_summary(tmp_path):
    out = tmp_path / "demo"
    res = run_cli("demo", "--epochs", "1", "--batch-size", "256", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["steps"] == len(load_digits().y_train) // 256
    for name in ("loss.png", "running_stats.png", "activations.png", "diagnosis.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    assert json.loads((out / "summary.json").read_text()) == summary
    # the twins agree to float32 rounding; accuracies are fractions; times are positive
    assert summary["max_loss_diff"] < 1e-4 and summary["max_param_diff"] < 1e-4
    for key in ("train_accuracy", "test_accuracy_eval", "test_accuracy_train_mode", "torch_test_accuracy_eval"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["ms_per_step_torch"] > 0 and summary["ms_per_step_bnkit"] > 0
    story = summary["diagnosis"]
    assert [x["name"] for x in story["broken"]["layers"]] == ["bn1", "bn2", "bn3", "bn4"]
    assert story["break_momentum"] == 0.9 and 0.0 <= story["accuracy_repaired"] <= 1.0

    # the text report of the same run (rendered in-process, no second training run)
    from rich.console import Console

    from bnkit.cli import _render_demo
    from bnkit.demo import DemoSummary

    buffer = io.StringIO()
    _render_demo(Console(file=buffer, width=200), DemoSummary(**summary), [])
    text = buffer.getvalue()
    assert "held-out accuracy, eval mode" in text and "train mode (wrong)" in text
    assert "largest difference bnkit vs torch.nn" in text and "loss.png" in text
    assert "bnkit.diagnose names the layers" in text and "after bnkit.recalibrate" in text


def test_demo_bad_out_is_one_line(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["demo", "--epochs", "1", "--out", str(blocker)])
    assert code == 2
    assert len(err.getvalue().strip().splitlines()) == 1 and "not a directory" in err.getvalue()


def test_diagnosis_story_healthy_broken_repaired(tmp_path):
    # A model whose running statistics are the exact ones of the training digits (recalibrated):
    # on held-out digits of the same distribution every layer is ok. Five steps on the end of a
    # label-sorted stream (high digits only) with momentum 0.9 and no weight change (lr 0) leave the
    # classifier's layer with statistics of two digits only; recalibrate repairs it.
    from bnkit.demo.diagnosis import break_model, diagnosis_story
    from bnkit.utils.diagnose import OK, STALE

    d = load_digits(seed=0)
    data = Digits(d.x_train[:480], d.y_train[:480], d.x_test[:96], d.y_test[:96])
    torch.manual_seed(0)
    model = bnkit.convert(bn_lenet())
    bnkit.recalibrate(model, [data.x_train[i:i + 32] for i in range(0, 480, 32)], progress=False)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = break_model(model, data, batch_size=32, lr=0.0)
    assert broken.bn3.momentum == 0.9 and not broken.training
    # the sorted stream: the last five batches of these 480 digits in label order are 6s to 9s
    assert min(torch.sort(data.y_train).values[-5 * 32:].tolist()) >= 6

    story = diagnosis_story(model, data, batch_size=32, lr=0.0, plot=tmp_path / "diagnosis.png")
    for key, value in model.state_dict().items():  # the trained model itself is left alone
        assert torch.equal(value, before[key]), key
    assert [x["verdict"] for x in story.trained["layers"]] == [OK] * 4
    broken_verdicts = {x["name"]: x["verdict"] for x in story.broken["layers"]}
    assert broken_verdicts["bn3"] == STALE and "bn3" in story.broken_layers
    assert "momentum 0.9" in next(x["advice"] for x in story.broken["layers"] if x["name"] == "bn3")
    assert [x["verdict"] for x in story.repaired["layers"]] == [OK] * 4
    assert (tmp_path / "diagnosis.png").read_bytes().startswith(PNG_MAGIC)
