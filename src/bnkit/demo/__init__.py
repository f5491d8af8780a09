"""``bnkit demo``: BN-LeNet on scikit-learn's digits, bnkit next to torch.nn, with plots.

:func:`run_demo` trains the two twins of :mod:`bnkit.demo.train`, evaluates them, tells
the diagnosis story of :mod:`bnkit.demo.diagnosis` (healthy, broken, repaired), writes the
figures of :mod:`bnkit.demo.plots` and ``diagnosis.png``, and returns a JSON-ready
:class:`DemoSummary`.
The command line only renders it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bnkit.demo.data import Digits, load_digits
from bnkit.demo.diagnosis import diagnosis_story
from bnkit.demo.model import bn_layers, bn_lenet
from bnkit.demo.plots import capture_activations, plot_activations, plot_loss, plot_running_stats
from bnkit.demo.train import DemoConfig, TwinResult, accuracy, train_twins, warm_up

__all__ = ["DemoConfig", "DemoSummary", "Digits", "bn_lenet", "load_digits", "run_demo", "train_twins"]


@dataclass
class DemoSummary:
    """Everything ``bnkit demo`` reports (``asdict`` gives the JSON of ``--json``)."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    threads: int
    steps: int
    backend: str | None
    train_accuracy: float  # bnkit twin, eval mode, training images
    test_accuracy_eval: float  # bnkit twin, eval mode (running statistics): the right way
    test_accuracy_train_mode: float  # bnkit twin left in train mode: batch statistics of shuffled test batches
    test_accuracy_train_mode_sorted: float  # ... and of test batches sorted by label (data that arrives in order)
    torch_test_accuracy_eval: float  # the torch twin, for comparison
    max_loss_diff: float  # largest |loss_torch - loss_bnkit| over all steps
    max_param_diff: float  # largest |p_torch - p_bnkit| over all parameters after training
    max_buffer_diff: float  # largest difference of running_mean/running_var after training
    ms_per_step_torch: float  # median over steps
    ms_per_step_bnkit: float
    first_call_seconds: float  # one throw-away bnkit step first: kernel compilation or cache loading
    seconds: float
    out: str
    plots: list[str]
    # bnkit.diagnose on the trained twin, on a copy broken by a sorted stream with momentum 0.9,
    # and on that copy after bnkit.recalibrate (see bnkit.demo.diagnosis.DiagnosisStory)
    diagnosis: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, kind: str) -> float:
    items_a = dict(a.named_parameters() if kind == "params" else a.named_buffers())
    items_b = dict(b.named_parameters() if kind == "params" else b.named_buffers())
    worst = 0.0
    for name, ta in items_a.items():
        if ta.is_floating_point():
            worst = max(worst, float((ta.detach() - items_b[name].detach()).abs().max()))
    return worst


def summarize(result: TwinResult, out: Path, plots: list[Path], seconds: float, threads: int,
              first_call_seconds: float = 0.0) -> DemoSummary:
    """Evaluate the trained twins and collect the numbers of the report."""
    d, h, cfg = result.data, result.history, result.config
    eval_batch = 256
    order = torch.argsort(d.y_test, stable=True)
    return DemoSummary(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        threads=threads,
        steps=len(h.loss_torch),
        backend=result.backend,
        train_accuracy=accuracy(result.bnkit_model, d.x_train, d.y_train, eval_batch),
        test_accuracy_eval=accuracy(result.bnkit_model, d.x_test, d.y_test, eval_batch),
        test_accuracy_train_mode=accuracy(result.bnkit_model, d.x_test, d.y_test, cfg.batch_size, train_mode=True),
        test_accuracy_train_mode_sorted=accuracy(result.bnkit_model, d.x_test[order], d.y_test[order],
                                                 cfg.batch_size, train_mode=True),
        torch_test_accuracy_eval=accuracy(result.torch_model, d.x_test, d.y_test, eval_batch),
        max_loss_diff=max(abs(a - b) for a, b in zip(h.loss_torch, h.loss_bnkit, strict=True)),
        max_param_diff=_max_diff(result.torch_model, result.bnkit_model, "params"),
        max_buffer_diff=_max_diff(result.torch_model, result.bnkit_model, "buffers"),
        ms_per_step_torch=1e3 * statistics.median(h.seconds_torch),
        ms_per_step_bnkit=1e3 * statistics.median(h.seconds_bnkit),
        first_call_seconds=first_call_seconds,
        seconds=seconds,
        out=str(out),
        plots=[str(p) for p in plots],
    )


def run_demo(
    config: DemoConfig,
    out: str | Path = "bnkit-demo",
    threads: int | None = 1,
    on_step: Callable[[int, int], None] | None = None,
) -> DemoSummary:
    """Train, evaluate, plot; write ``summary.json`` next to the PNGs in ``out``.

    ``threads`` sets ``torch.set_num_threads`` for the run (restored afterwards). The
    default is 1: BN-LeNet's tensors are tiny, so threads cost more in synchronisation than
    they save, and on a busy machine they can make a step ten times slower.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        data = load_digits(seed=config.seed)
        first_call = warm_up(data, config.batch_size)
        if threads is not None:
            torch.set_num_threads(threads)  # numba's thread pool may have reset it
        result = train_twins(config, data=data, on_step=on_step)
        out.mkdir(parents=True, exist_ok=True)
        model = result.bnkit_model.eval()
        layers = list(bn_layers(model))
        captured = capture_activations(model, result.data.x_test, [layers[0], layers[2]])
        plots = [
            plot_loss(result.history, out / "loss.png"),
            plot_running_stats(result.history, out / "running_stats.png"),
            plot_activations(captured, out / "activations.png"),
        ]
        story = diagnosis_story(model, result.data, config.batch_size, config.lr, plot=out / "diagnosis.png")
        plots.append(out / "diagnosis.png")
        summary = summarize(result, out, plots, 0.0, torch.get_num_threads(), first_call)
        summary.diagnosis = story.to_dict()
        summary.seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary
