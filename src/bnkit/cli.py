"""The ``bnkit`` command: ``explain``, ``inspect``, ``diagnose``, ``demo``, ``bench`` and ``warmup``.

A thin layer over the public API: each sub-command parses its options, calls one library
function (:func:`bnkit.explain.explain`, :func:`bnkit.utils.inspect.inspect`,
:func:`bnkit.utils.diagnose.diagnose`, :func:`bnkit.demo.run_demo`,
:func:`bnkit.bench.cpu.main`, :func:`bnkit.utils.warmup.warmup`) and renders what it returns - rich
tables and a progress bar on a terminal, plain text when piped, JSON with ``--json``.

A user's mistake (missing file, bad JSON, a shape that does not fit, a bad option value)
ends with one line on stderr and exit status 2, never a traceback. Set ``BNKIT_DEBUG=1``
to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import pickle
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2  # user mistakes (argparse's convention)
EXIT_UNAVAILABLE = 3  # a sub-command whose module is not part of this build


class UserError(Exception):
    """A mistake in the command line or its input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is ONE line (argparse prints the usage block too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (try '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


# --- option types -------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _momentum(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {text!r}")
    return value


def _json_list(text: str) -> list[float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a JSON list of numbers like [1, 0.5], got {text!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of numbers like [1, 0.5], got {text!r}")
    return [float(v) for v in value]


def _read_text_arg(text: str) -> str:
    """``@path`` reads the file, anything else is the text itself."""
    if not text.startswith("@"):
        return text
    path = Path(text[1:])
    if not path.exists():
        raise UserError(f"file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a JSON file")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


# --- rendering ----------------------------------------------------------------------------


def _console(stderr: bool = False):
    """rich Console: colours and live bars on a terminal; plain, wide, no markup when piped."""
    from rich.console import Console

    class _QuietOnClosedPipe(Console):
        def on_broken_pipe(self) -> None:
            # `bnkit explain | head`: the reader has what it wanted; rich would exit 1.
            self.quiet = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0)

    probe = _QuietOnClosedPipe(stderr=stderr)
    if probe.is_terminal:
        return probe
    return _QuietOnClosedPipe(stderr=stderr, width=200, no_color=True, highlight=False, emoji=False)


def _table(console, title: str | None = None, **kwargs: Any):
    from rich import box
    from rich.table import Table

    style = box.ROUNDED if console.is_terminal else box.ASCII
    return Table(title=title, box=style, title_justify="left", **kwargs)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _fmt(value: float | None, precision: int) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.{precision}g}"


def torch_style(values: list[float], precision: int = 4) -> list[str]:
    """``values`` written as ``print(torch.tensor(values))`` writes them (torch's default print options).

    torch picks one format per tensor from its finite non-zero magnitudes: whole numbers as ``2.``;
    scientific notation when the largest exceeds 1e8, the smallest is below 1e-4 or they span more
    than 1000x (for whole numbers: the first two); otherwise ``precision`` decimal places.
    """
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    whole = all(v == math.ceil(v) for v in values if math.isfinite(v))
    sci = bool(finite) and (max(finite) / min(finite) > 1000 or max(finite) > 1e8
                            or (not whole and min(finite) < 1e-4))
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
        elif sci:
            out.append(f"{v:.{precision}e}")
        elif whole:
            out.append(f"{v:.0f}.")
        else:
            out.append(f"{v:.{precision}f}")
    return out


def _tf(value: float | None, precision: int) -> str:
    """One number as torch prints a 0-d tensor."""
    return "-" if value is None else torch_style([value], precision)[0]


def _fmt_values(values: list[float], precision: int, limit: int = 16) -> str:
    """A channel's values as torch prints them (one format for the whole list), at most ``limit`` shown."""
    shown = ", ".join(torch_style(values, precision)[:limit])
    more = len(values) - limit
    return f"[{shown}{f', ... +{more} more' if more > 0 else ''}]"


def _notes_from(caught: list[warnings.WarningMessage]) -> list[str]:
    seen: list[str] = []
    for w in caught:
        text = str(w.message)
        if text not in seen:
            seen.append(text)
    return seen


# --- explain -----------------------------------------------------------------------------


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from bnkit.explain import compare_with_torch, explain, parse_input, random_input

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    if args.input is not None:
        inputs: Any = parse_input(_read_text_arg(args.input), dtype)
    elif args.shape is not None:
        from bnkit.explain import parse_shape

        inputs = random_input(parse_shape(args.shape), args.seed, args.steps, dtype)
    else:
        from bnkit.explain import CLASSIC_INPUT

        inputs = torch.tensor(CLASSIC_INPUT, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = explain(
            inputs,
            steps=args.steps,
            momentum=args.momentum,
            eps=args.eps,
            affine=args.affine,
            track_running_stats=args.track_running_stats,
            mode=args.mode,
            weight=args.weight,
            bias=args.bias,
            running_mean=args.running_mean,
            running_var=args.running_var,
            backend=args.backend,
        )
        compare_with_torch(result)
    if args.json:
        _print_json(result.to_dict())
        return 0
    _render_explanation(result, args.precision, _notes_from(caught))
    return 0


def _render_explanation(e, p: int, warnings_seen: list[str]) -> None:
    console = _console()
    momentum = "None (cumulative average)" if e.momentum is None else f"{e.momentum:g}"
    console.print(
        f"bnkit explain: {e.layer}({e.num_features}, eps={e.eps:g}, momentum={momentum}, affine={e.affine}, "
        f"track_running_stats={e.track_running_stats}) in {e.mode} mode, {e.dtype}, backend {e.backend}",
        markup=False,
    )
    shape = e.input_shape
    names = {2: ["N"], 3: ["N", "L"], 4: ["N", "H", "W"], 5: ["N", "D", "H", "W"]}[len(shape)]
    sizes = [shape[0], *shape[2:]]
    console.print(
        f"input shape {tuple(shape)} = (N, C{''.join(', ' + n for n in names[1:])}): the batch statistics of "
        f"channel c are taken over the values of x[:, c], M = {' * '.join(names)} = "
        f"{' * '.join(map(str, sizes)) + ' = ' if len(sizes) > 1 else ''}{e.count_per_channel} values",
        markup=False,
    )
    for step in e.steps:
        _render_step(console, e, step, p)
    console.print()
    diff = e.max_abs_diff_vs_torch
    verdict = "identical" if diff == 0 else ("within float rounding" if diff is not None and diff < 1e-4 else "")
    console.print(
        f"largest |bnkit - torch.nn.{e.layer}| over all steps (output and running stats): {_fmt(diff, 3)}"
        f"{f'  ({verdict})' if verdict else ''}",
        markup=False,
    )
    console.print()
    console.print("Why:", markup=False)
    for note in e.notes:
        console.print(textwrap.fill(note, width=110, initial_indent="  - ", subsequent_indent="    "), markup=False)
    for note in warnings_seen:
        console.print(f"note: {note}", markup=False)


def _render_step(console, e, step, p: int) -> None:
    console.print()
    what = "normalize with the batch statistics" if step.normalize_with == "batch" else (
        "normalize with the running statistics")
    if step.updates_running_stats:
        what += f", then update the running statistics with factor {_tf(step.momentum, p)}"
    elif e.track_running_stats:
        what += ", running statistics unchanged"
    else:
        what += " (no running statistics)"
    console.print(f"step {step.index} of {len(e.steps)}: {what}", markup=False)
    running = e.track_running_stats
    stats = _table(console, title=None)
    stats.add_column("ch", justify="right")
    stats.add_column(f"values feeding the statistics (M={e.count_per_channel})", min_width=24, overflow="fold")
    batch = step.normalize_with == "batch"
    stats.add_column("batch mean" if batch else "batch mean\n(unused)", justify="right")
    stats.add_column("var, biased (/M)\n" + ("normalizes" if batch else "(unused)"), justify="right")
    stats.add_column("var, unbiased (/(M-1))\n" + ("-> running_var" if step.updates_running_stats else "(unused)"),
                     justify="right")
    stats.add_column("invstd =\n1/sqrt(" + ("var" if batch else "running_var") + "+eps)", justify="right")
    if running:
        stats.add_column("running_mean\nbefore -> after", justify="right")
        stats.add_column("running_var\nbefore -> after", justify="right")
    for ch in step.channels:
        row = [
            str(ch.channel), _fmt_values(ch.values, p), _tf(ch.mean, p), _tf(ch.var_biased, p),
            _tf(ch.var_unbiased, p), _tf(ch.invstd, p),
        ]
        if running:
            row += [
                f"{_tf(ch.running_mean_before, p)} -> {_tf(ch.running_mean_after, p)}",
                f"{_tf(ch.running_var_before, p)} -> {_tf(ch.running_var_after, p)}",
            ]
        stats.add_row(*row)
    console.print(stats)
    if not batch:
        console.print("  eval mode: xhat uses running_mean and running_var, not the batch's statistics", markup=False)
    outputs = _table(console, title=None)
    outputs.add_column("ch", justify="right")
    if e.affine:
        outputs.add_column("xhat = (x - mean) * invstd", overflow="fold")
        outputs.add_column("w, b", justify="right")
        outputs.add_column("y = w * xhat + b", overflow="fold")
    else:
        outputs.add_column("y = xhat = (x - mean) * invstd   (no affine: no weight, no bias)", overflow="fold")
    for ch in step.channels:
        row = [str(ch.channel), _fmt_values(ch.normalized, p)]
        if e.affine:
            row += [f"{_tf(ch.weight, p)}, {_tf(ch.bias, p)}", _fmt_values(ch.output, p)]
        outputs.add_row(*row)
    console.print(outputs)
    if step.torch is not None:
        parts = ", ".join(f"{k} {_fmt(v, 3)}" for k, v in step.torch.items())
        console.print(f"  largest |bnkit - torch.nn|: {parts}", markup=False)


# --- demo --------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    require_extra("demo", "matplotlib", "sklearn")
    from bnkit.demo import DemoConfig, run_demo

    config = DemoConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    console = _console()
    if not args.json:
        console.print(
            "bnkit demo: BN-LeNet (sigmoid, average pooling, BN after every conv and hidden linear layer) on\n"
            "scikit-learn's 8x8 digits upsampled to 28x28; a torch.nn twin and a bnkit twin from the same initial\n"
            f"weights, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, seed {args.seed}",
            markup=False,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if console.is_terminal and not args.json:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console, transient=True) as progress:
                task = progress.add_task("loading digits, first bnkit call (compiles kernels once)", total=None)

                def on_step(step: int, total: int) -> None:
                    progress.update(task, completed=step, total=total, description="training")

                summary = run_demo(config, out=args.out, threads=args.threads, on_step=on_step)
        else:
            if not args.json:
                console.print("loading digits, first bnkit call (compiles kernels once) ...", markup=False)
            on_step = None if args.json else _plain_progress()
            summary = run_demo(config, out=args.out, threads=args.threads, on_step=on_step)
    if args.json:
        _print_json(summary.to_dict())
        return 0
    _render_demo(console, summary, _notes_from(caught))
    return 0


def _jobs(text: str) -> int:
    try:
        jobs = int(text)
    except ValueError:
        jobs = -1
    if jobs < 0:
        raise argparse.ArgumentTypeError(f"--jobs must be a non-negative integer (0: one per CPU), got {text!r}")
    return jobs


def _cmd_warmup(args: argparse.Namespace) -> int:
    from bnkit.kernels.cpu.cache import cache_dir
    from bnkit.utils.warmup import warmup

    console = _console()
    if console.is_terminal and not args.json:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("compiling CPU kernels", total=None)

            def on_step(done: int, total: int, label: str) -> None:
                progress.update(task, completed=done, total=total, description=f"compiling CPU kernels: {label}")

            report = warmup(args.dtypes, on_step=on_step, jobs=args.jobs)
    else:
        def on_step(done: int, total: int, label: str) -> None:
            if not args.json and done < total:
                sys.stdout.write(f"  [{done + 1}/{total}] {label}\n")
                sys.stdout.flush()

        report = warmup(args.dtypes, on_step=on_step, jobs=args.jobs)
    where = cache_dir()
    if args.json:
        _print_json({"dtypes": list(report.dtypes), "steps": report.steps, "seconds": round(report.seconds, 3),
                     "jobs": report.jobs,
                     "compiled": list(report.compiled), "cache_dir": None if where is None else str(where)})
        return 0
    what = "compiled" if report.compiled else "loaded from numba's cache (nothing to compile)"
    console.print(f"bnkit warmup: CPU kernels for {', '.join(report.dtypes)} {what} in {report.seconds:.1f} s "
                  f"({report.steps} steps, {report.jobs} process{'es' if report.jobs > 1 else ''}); cache: {where}",
                  markup=False)
    return 0


def _dtype_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    allowed = ("float32", "float64", "bfloat16", "float16")
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return names


def _plain_progress() -> Callable[[int, int], None]:
    """Piped output: one line at every tenth of the run instead of a live bar."""
    marks: set[int] = set()

    def on_step(step: int, total: int) -> None:
        tenth = step * 10 // total
        if tenth not in marks and (tenth > 0 or step == 1):
            marks.add(tenth)
            sys.stdout.write(f"  step {step}/{total}\n")
            sys.stdout.flush()

    return on_step


def _render_demo(console, s, notes: list[str]) -> None:
    pct = "{:.1%}".format
    table = _table(console, title=f"results after {s.steps} steps ({s.seconds:.1f} s, {s.threads} thread(s), "
                                  f"bnkit backend: {s.backend})")
    table.add_column("")
    table.add_column("bnkit twin", justify="right")
    table.add_column("torch.nn twin", justify="right")
    table.add_row("train accuracy (eval mode)", pct(s.train_accuracy), "")
    table.add_row("held-out accuracy, eval mode (right)", pct(s.test_accuracy_eval), pct(s.torch_test_accuracy_eval))
    table.add_row(f"held-out accuracy, train mode (wrong), shuffled batches of {s.batch_size}",
                  pct(s.test_accuracy_train_mode), "")
    table.add_row(f"held-out accuracy, train mode (wrong), batches of {s.batch_size} sorted by label",
                  pct(s.test_accuracy_train_mode_sorted), "")
    table.add_row("time per training step (median)", f"{s.ms_per_step_bnkit:.2f} ms", f"{s.ms_per_step_torch:.2f} ms")
    table.add_row("first bnkit step (kernel compile or cache load)", f"{s.first_call_seconds:.2f} s", "")
    console.print(table)
    console.print(
        f"largest difference bnkit vs torch.nn: loss {_fmt(s.max_loss_diff, 3)} (over all steps), parameters "
        f"{_fmt(s.max_param_diff, 3)}, running statistics {_fmt(s.max_buffer_diff, 3)} (after training)",
        markup=False,
    )
    console.print(
        "train mode normalizes each test batch with its own statistics (and overwrites the running ones): "
        "call model.eval() before evaluating.",
        markup=False,
    )
    if s.diagnosis:
        _render_diagnosis_story(console, s.diagnosis)
    console.print(f"plots in {s.out}: " + ", ".join(Path(p).name for p in s.plots) + " (and summary.json)",
                  markup=False)
    for note in notes:
        console.print(f"note: {note}", markup=False)


def _render_diagnosis_story(console, story: dict) -> None:
    """The demo's bnkit.diagnose story (bnkit.demo.diagnosis): healthy, broken, repaired."""
    from bnkit.utils.diagnose import Diagnosis, format_table

    def show(payload: dict) -> None:
        diagnosis = Diagnosis.from_dict(payload)
        table = format_table(diagnosis)
        if not console.is_terminal:
            from rich import box

            table.box = box.ASCII
        console.print(table)
        for line in diagnosis.summary_lines():
            console.print(line, markup=False)

    pct = "{:.1%}".format
    console.print()
    console.print(f"bnkit.diagnose(model, held-out digits) after training (held-out accuracy "
                  f"{pct(story['accuracy_trained'])}):", markup=False)
    show(story["trained"])
    console.print()
    console.print(f"now break a copy: {story['break_steps']} more training steps (lr {story['break_lr']:g}) on a "
                  f"stream sorted by label (its last batches: 7s, 8s and 9s only) with "
                  f"momentum={story['break_momentum']:g} (the Keras/d2l convention typed into torch: 90% weight on "
                  f"the new batch); held-out accuracy {pct(story['accuracy_broken'])}. bnkit.diagnose names the "
                  "layers:", markup=False)
    show(story["broken"])
    repaired = Diagnosis.from_dict(story["repaired"])
    verdicts = ", ".join(f"{layer.name} {layer.verdict}" for layer in repaired.layers)
    console.print()
    console.print(f"after bnkit.recalibrate(model, training digits): {verdicts}; held-out accuracy "
                  f"{pct(story['accuracy_broken'])} -> {pct(story['accuracy_repaired'])} "
                  f"(diagnosis story: {story['seconds']:.1f} s)", markup=False)


# --- inspect -----------------------------------------------------------------------------


# import name -> the name pip installs it by
_DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def require_extra(extra: str, *modules: str) -> None:
    """Raise :class:`UserError` (one line, exit 2) naming the install command when a module of ``extra`` is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(_DISTRIBUTIONS.get(m, m) for m in missing)
        raise UserError(f"this needs {names}, which bnkit installs only with its {extra!r} extra: "
                        f"pip install 'bnkit[{extra}]'")


def _optional_module(name: str, command: str) -> Any:
    """Import ``name``, or report that this build does not have ``command`` yet.

    Only the absence of ``name`` itself (or its package) counts as "not available"; a
    dependency missing *inside* it is a real error and propagates.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise _Unavailable(f"bnkit {command}: not available yet ({name} is not part of this build)") from None
        raise


class _Unavailable(Exception):
    pass


def _cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    tools = _optional_module("bnkit.utils.inspect", "inspect")
    try:
        reports = tools.inspect(str(path))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise UserError(str(exc)) from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as exc:
        raise UserError(f"{path} is not a checkpoint bnkit can read ({type(exc).__name__}: {exc})") from None
    if args.plot:
        require_extra("demo", "matplotlib")
        tools.plot_running_stats(reports, args.plot)
    if args.json:
        _print_json([r.to_dict() for r in reports])
        return 0
    console = _console()
    table = tools.format_table(reports)
    if not console.is_terminal:
        from rich import box

        table.box = box.ASCII
    console.print(table)
    if args.plot:
        console.print(f"plot written to {args.plot}", markup=False)
    return 0


# --- diagnose ----------------------------------------------------------------------------


def _load_entry(entry: str) -> tuple[Any, Any]:
    """``package.module:function`` -> the ``(model, data)`` that calling it returns."""
    module_name, sep, function_name = entry.partition(":")
    if not sep or not module_name or not function_name:
        raise UserError(f"ENTRY must look like package.module:function, got {entry!r}")
    # `python -m bnkit` imports from the current directory; the `bnkit` script should too.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the module's own code raised while importing
        raise UserError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise UserError(f"module {module_name!r} has no attribute {function_name!r}")
    if not callable(function):
        raise UserError(f"{entry} is a {type(function).__name__}, not a function returning (model, data)")
    try:
        result = function()
    except Exception as exc:
        raise UserError(f"{entry}() raised {type(exc).__name__}: {exc}") from None
    from torch import nn

    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise UserError(f"{entry}() must return (model, data), got {type(result).__name__}")
    model, data = result
    if not isinstance(model, nn.Module):
        raise UserError(f"{entry}() must return (model, data) with model an nn.Module, got {type(model).__name__}")
    if not hasattr(data, "__iter__"):
        raise UserError(f"{entry}() must return (model, data) with data an iterable of batches, "
                        f"got {type(data).__name__}")
    return model, data


def _cmd_diagnose(args: argparse.Namespace) -> int:
    tools = _optional_module("bnkit.utils.diagnose", "diagnose")
    model, data = _load_entry(args.entry)
    try:
        diagnosis = tools.diagnose(model, data, num_batches=args.num_batches, progress=sys.stderr.isatty())
    except TypeError as exc:  # a model or batch bnkit cannot run (the message names it)
        raise UserError(str(exc)) from None
    if args.plot:
        require_extra("demo", "matplotlib")
        diagnosis.plot(args.plot)
    if args.json:
        _print_json(diagnosis.to_dict())
        return 0
    console = _console()
    table = tools.format_table(diagnosis)
    if not console.is_terminal:
        from rich import box

        table.box = box.ASCII
    console.print(table)
    for line in diagnosis.summary_lines():
        console.print(line, markup=False)
    if args.plot:
        console.print(f"plot written to {args.plot}", markup=False)
    return 0


# --- bench -------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace, forwarded: list[str]) -> int:
    cpu = _optional_module("bnkit.bench.cpu", "bench")
    return int(cpu.main(forwarded) or 0)


# --- the parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (kept separate from :func:`main` so docs and tests can read it)."""
    parser = _Parser(prog="bnkit", description="Batch normalization for PyTorch from first principles.")
    from bnkit import __version__

    parser.add_argument("--version", action="version", version=f"bnkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{explain,inspect,diagnose,demo,bench,warmup}")

    ex = sub.add_parser(
        "explain", help="batch norm step by step, checked against torch.nn",
        description="Batch norm step by step for a learner: per channel, the values feeding the statistics, mean, "
                    "biased and unbiased variance, normalized and affine output, running statistics before and "
                    "after each step, and the largest difference from torch.nn. Default input: the classic "
                    "2x2x2x2 example.",
    )
    source = ex.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="JSON", help="input as a JSON nested list, or @file.json")
    source.add_argument("--shape", metavar="N,C,...", help="random input of this shape (values rounded to 0.01)")
    ex.add_argument("--seed", type=int, default=0, help="seed for --shape (default 0)")
    ex.add_argument("--steps", type=_positive_int, default=1,
                    help="calls of the layer (default 1); --input is reused each step, --shape draws a new batch")
    ex.add_argument("--mode", choices=("train", "eval"), default="train", help="module mode (default train)")
    ex.add_argument("--momentum", type=_momentum, default=0.1,
                    help="torch's momentum, weight of the new batch, or 'none' (cumulative average); default 0.1")
    ex.add_argument("--eps", type=_positive_float, default=1e-5, help="added to the variance (default 1e-5)")
    ex.add_argument("--affine", action=argparse.BooleanOptionalAction, default=True,
                    help="learnable weight and bias (default on)")
    ex.add_argument("--track-running-stats", action=argparse.BooleanOptionalAction, default=True,
                    help="keep running_mean/running_var (default on)")
    ex.add_argument("--weight", type=_json_list, metavar="JSON", help="initial weight per channel, e.g. [2, 0.5]")
    ex.add_argument("--bias", type=_json_list, metavar="JSON", help="initial bias per channel")
    ex.add_argument("--running-mean", type=_json_list, metavar="JSON", help="initial running_mean per channel")
    ex.add_argument("--running-var", type=_json_list, metavar="JSON", help="initial running_var per channel")
    ex.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="default float32")
    ex.add_argument("--backend", choices=("reference", "auto", "cpu", "triton"), default="reference",
                    help="bnkit backend the module runs on (default reference: the spec, no kernel compilation)")
    ex.add_argument("--precision", type=_positive_int, default=4,
                    help="decimal places, as torch prints tensors (default 4, torch's default)")
    ex.add_argument("--json", action="store_true", help="print the full data as JSON")
    ex.set_defaults(func=_cmd_explain)

    ins = sub.add_parser(
        "inspect", help="report the batch-norm layers of a checkpoint",
        description="Per batch-norm layer of a checkpoint (state_dict, .pt/.pth, safetensors): channels, momentum, "
                    "eps, num_batches_tracked, running statistics, weight and bias, with flags for suspicious "
                    "values. Checkpoints are loaded with weights_only=True.",
    )
    ins.add_argument("path", help="checkpoint file")
    ins.add_argument("--plot", metavar="FILE", help="also save a PNG of the per-channel running statistics")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    ins.set_defaults(func=_cmd_inspect)

    diag = sub.add_parser(
        "diagnose", help="why a model behaves differently in eval(): the layer, the cause, the fix",
        description="Per batch-norm layer of the model that ENTRY returns: the data's exact statistics against the "
                    "running ones, how much batch statistics wobble, the effect on the output of each layer's "
                    "running statistics, inspect's flags, and a verdict (ok, stale running statistics, noisy batch "
                    "statistics, dead channels, non-finite) with advice. The model is left unchanged.",
    )
    diag.add_argument("entry", metavar="ENTRY",
                      help="package.module:function returning (model, data); data yields batches as "
                           "bnkit.recalibrate takes them (the current directory is importable)")
    diag.add_argument("--num-batches", type=_positive_int, help="use at most this many batches of data")
    diag.add_argument("--plot", metavar="FILE", help="also save a PNG: divergence and output effect per layer")
    diag.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    diag.set_defaults(func=_cmd_diagnose)

    demo = sub.add_parser(
        "demo", help="train BN-LeNet on digits with bnkit next to torch.nn (the main job)",
        description="Train BN-LeNet on scikit-learn's bundled digits with bnkit batch norm and an identical torch.nn "
                    "twin; print accuracies, the largest difference between the twins and time per step; save "
                    "plots. No network access needed.",
    )
    demo.add_argument("--epochs", type=_positive_int, default=6, help="default 6")
    demo.add_argument("--batch-size", type=_positive_int, default=64, help="default 64")
    demo.add_argument("--lr", type=_positive_float, default=0.5, help="SGD learning rate (default 0.5)")
    demo.add_argument("--seed", type=int, default=0, help="default 0")
    demo.add_argument("--out", default="bnkit-demo", help="folder for the PNG plots (default ./bnkit-demo)")
    demo.add_argument("--threads", type=_positive_int, default=1,
                      help="torch threads (default 1: the tensors are tiny, threads cost more than they save)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser(
        "bench", help="the CPU benchmark table on this machine",
        description="Benchmark bnkit's CPU kernels against torch's native batch norm on this machine. Options other "
                    "than these are passed on to the benchmark script.",
    )
    bench.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.set_defaults(func=_cmd_bench)

    warm = sub.add_parser(
        "warmup", help="compile the CPU kernels ahead of time (Docker images, CI)",
        description="Compile every CPU kernel bnkit may run on this machine into numba's on-disk cache, so that the "
                    "first batch norm of a later process starts at once. Shows a progress bar and the time taken.",
    )
    warm.add_argument("--dtypes", type=_dtype_list, default=("float32", "float64", "bfloat16"), metavar="LIST",
                      help="comma-separated dtypes (default float32,float64,bfloat16; float16 also accepted)")
    warm.add_argument("--jobs", type=_jobs, default=0, metavar="N",
                      help="worker processes that compile side by side (default 0: one per CPU; 1: this process)")
    warm.add_argument("--json", action="store_true", help="print the report as JSON")
    warm.set_defaults(func=_cmd_warmup)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    return (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnkit`` console script and of ``python -m bnkit``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = args.command
    if extra and command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if command == "bench":
            forwarded = argv[argv.index("bench") + 1:]
            return _cmd_bench(args, forwarded)
        return int(args.func(args))
    except _Unavailable as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_UNAVAILABLE
    except _user_errors() as exc:
        if os.environ.get("BNKIT_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.stderr.write(f"bnkit {command}: error: {message}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"bnkit {command}: interrupted\n")
        return 130
    except BrokenPipeError:  # output written without rich, e.g. --json piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
