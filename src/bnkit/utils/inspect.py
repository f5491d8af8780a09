"""``bnkit.inspect``: a read-only health report of every batch-norm layer in a model or checkpoint.

``inspect(source)`` accepts a module, a ``state_dict``, a dict holding one under a common
key (``"state_dict"``, ``"model_state_dict"``, ``"model"``, ``"ema"``, ...; see
:data:`bnkit.utils.checkpoint.STATE_DICT_KEYS`), or a path to a torch checkpoint (loaded
with ``torch.load(weights_only=True)``: no code is unpickled) or a ``.safetensors`` file.
It returns one :class:`LayerReport` per layer; :func:`format_table` renders them with
rich and :func:`plot_running_stats` draws the per-channel running statistics.

In a state_dict, a batch-norm layer is a prefix ``p`` with both ``p.running_mean`` and
``p.running_var`` (plus, when present, ``p.weight``, ``p.bias``, ``p.num_batches_tracked``);
``eps`` and ``momentum`` are not stored there and are reported as ``None``. In a module,
a layer is anything with ``running_mean``/``running_var``/``eps`` attributes except
instance norm (torch's, bnkit's and frozen batch norm).

Flags (each also a structured field of the report):

* ``non-finite``: NaN/inf entries in running_mean, running_var, weight or bias
  (counts per tensor in ``nonfinite``);
* ``dead``: channels with ``running_var < eps`` (``eps`` = 1e-5, torch's default, when
  unknown): the layer divides by about ``sqrt(eps)`` there, so the channel is constant
  or, with ``running_var`` 0 from a dead ReLU, amplified noise;
* ``zero weight``: channels with ``|weight| < ZERO_WEIGHT_ATOL`` (1e-8): the channel's
  output is its bias whatever the input (pruned, or collapsed by weight decay);
* ``never updated``: ``num_batches_tracked == 0``: the running statistics are still the
  initial 0 and 1 (a model saved before training, or trained in eval mode);
* ``no running stats``: a module layer with ``track_running_stats=False``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from bnkit.utils.checkpoint import extract_state_dict, load_checkpoint

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["DEFAULT_EPS", "ZERO_WEIGHT_ATOL", "LayerReport", "Summary", "format_table", "inspect", "json_float",
           "plot_running_stats"]

DEFAULT_EPS = 1e-5
ZERO_WEIGHT_ATOL = 1e-8
_TENSORS = ("running_mean", "running_var", "weight", "bias")


def json_float(x: float | None) -> float | str | None:
    """Plain float, or ``"nan"``/``"inf"``/``"-inf"`` (strict JSON has no non-finite numbers)."""
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


@dataclass
class Summary:
    """mean, std (population, over channels), min, max of a per-channel tensor's *finite* entries.

    ``nonfinite`` counts the NaN/inf entries left out; the four statistics are ``None``
    when no entry is finite.
    """

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    nonfinite: int = 0

    @classmethod
    def of(cls, t: Tensor) -> Summary:
        v = t.detach().to("cpu", torch.float64).reshape(-1)
        finite = torch.isfinite(v)
        bad = int((~finite).sum())
        v = v[finite]
        if v.numel() == 0:
            return cls(None, None, None, None, bad)
        return cls(v.mean().item(), v.std(correction=0).item(), v.min().item(), v.max().item(), bad)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": json_float(self.mean), "std": json_float(self.std), "min": json_float(self.min),
                "max": json_float(self.max), "nonfinite": self.nonfinite}


@dataclass
class LayerReport:
    """What :func:`inspect` found about one batch-norm layer.

    ``momentum`` is a float, ``"cumulative"`` (a module with ``momentum=None``) or ``None``
    (unknown: read from a state_dict); ``eps`` is ``None`` when unknown. Summaries are
    ``None`` for tensors the layer does not have. ``values`` keeps the per-channel tensors
    for plotting and is left out of :meth:`to_dict`.
    """

    name: str
    kind: str
    channels: int
    momentum: float | str | None
    eps: float | None
    num_batches_tracked: int | None
    running_mean: Summary | None
    running_var: Summary | None
    weight: Summary | None
    bias: Summary | None
    nonfinite: dict[str, int] = field(default_factory=dict)
    dead_channels: list[int] = field(default_factory=list)
    zero_weight_channels: list[int] = field(default_factory=list)
    never_updated: bool = False
    flags: list[str] = field(default_factory=list)
    values: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable: plain str/int/float/bool/list/dict/None; non-finite floats as strings."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "channels": self.channels,
            "momentum": json_float(self.momentum) if isinstance(self.momentum, float) else self.momentum,
            "eps": json_float(self.eps), "num_batches_tracked": self.num_batches_tracked,
        }
        for key in _TENSORS:
            s = getattr(self, key)
            out[key] = s.to_dict() if s is not None else None
        out.update(nonfinite=dict(self.nonfinite), dead_channels=list(self.dead_channels),
                   zero_weight_channels=list(self.zero_weight_channels), never_updated=self.never_updated,
                   flags=list(self.flags))
        return out


def _report(name: str, kind: str, tensors: dict[str, Tensor | None], momentum: float | str | None,
            eps: float | None, nbt: Tensor | None) -> LayerReport:
    values = {k: t.detach().to("cpu", torch.float64).reshape(-1) for k, t in tensors.items() if t is not None}
    channels = next((v.numel() for v in values.values()), 0)
    summaries = {k: Summary.of(values[k]) if k in values else None for k in _TENSORS}
    nonfinite = {k: s.nonfinite for k, s in summaries.items() if s is not None and s.nonfinite}
    threshold = eps if eps is not None else DEFAULT_EPS
    dead = (values["running_var"] < threshold).nonzero().flatten().tolist() if "running_var" in values else []
    zero_w = ((values["weight"].abs() < ZERO_WEIGHT_ATOL).nonzero().flatten().tolist()
              if "weight" in values else [])
    n = int(nbt.item()) if nbt is not None and nbt.numel() == 1 else None
    never = n == 0
    flags = []
    if "running_mean" not in values:
        flags.append("no running stats")
    if nonfinite:
        flags.append("non-finite " + ", ".join(f"{k} ({c})" for k, c in nonfinite.items()))
    if dead:
        flags.append(f"dead: {len(dead)} channel{'s' if len(dead) != 1 else ''} with running_var < {threshold:g}")
    if zero_w:
        flags.append(f"zero weight: {len(zero_w)} channel{'s' if len(zero_w) != 1 else ''}")
    if never:
        flags.append("never updated (num_batches_tracked 0)")
    return LayerReport(name=name, kind=kind, channels=channels, momentum=momentum, eps=eps,
                       num_batches_tracked=n, nonfinite=nonfinite, dead_channels=dead,
                       zero_weight_channels=zero_w, never_updated=never, flags=flags, values=values,
                       **summaries)


def _is_bn_module(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return False
    return all(hasattr(m, a) for a in ("running_mean", "running_var", "eps"))


def _from_module(model: nn.Module) -> list[LayerReport]:
    reports = []
    for name, m in model.named_modules():
        if not _is_bn_module(m):
            continue
        if isinstance(m.running_mean, nn.parameter.UninitializedBuffer):
            raise ValueError(f"inspect: lazy layer {name!r} is not initialized yet (run one batch through it)")
        momentum = getattr(m, "momentum", None)
        if momentum is None and hasattr(m, "momentum"):
            momentum = "cumulative"
        elif momentum is not None:
            momentum = float(momentum)
        tensors = {k: getattr(m, k, None) for k in _TENSORS}
        reports.append(_report(name, type(m).__name__, tensors, momentum, float(m.eps),
                               getattr(m, "num_batches_tracked", None)))
    return reports


def _from_state_dict(sd: dict[str, Tensor]) -> list[LayerReport]:
    reports = []
    for key in sd:
        if not (key == "running_mean" or key.endswith(".running_mean")):
            continue
        prefix = key[: -len("running_mean")]
        if prefix + "running_var" not in sd:
            continue
        tensors = {k: sd.get(prefix + k) for k in _TENSORS}
        tensors = {k: v if isinstance(v, Tensor) else None for k, v in tensors.items()}
        nbt = sd.get(prefix + "num_batches_tracked")
        reports.append(_report(prefix.rstrip("."), "state_dict", tensors, None, None,
                               nbt if isinstance(nbt, Tensor) else None))
    return reports


def inspect(source: nn.Module | dict | str | os.PathLike) -> list[LayerReport]:
    """One :class:`LayerReport` per batch-norm layer of ``source``, in model/state_dict order.

    ``source``: a module, a state_dict, a dict holding one, or a path to a torch checkpoint
    or safetensors file. Raises ``FileNotFoundError`` for a missing path and
    ``ValueError`` ("not a checkpoint ...") for a file or object without a state_dict.
    Nothing is modified.
    """
    if isinstance(source, nn.Module):
        return _from_module(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return _from_state_dict(extract_state_dict(load_checkpoint(path), where=str(path)))
    return _from_state_dict(extract_state_dict(source))


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}"


def _fmt_summary(s: Summary | None) -> str:
    if s is None:
        return "-"
    text = f"{_fmt(s.mean)} ± {_fmt(s.std)}\n[{_fmt(s.min)}, {_fmt(s.max)}]"
    if s.nonfinite:
        text += f"\n{s.nonfinite} non-finite"
    return text


def format_table(reports: list[LayerReport]) -> Table:
    """A ``rich.table.Table``: one row per layer, summaries as ``mean ± std [min, max]``."""
    from rich.table import Table

    table = Table(title=f"batch-norm layers: {len(reports)}", show_lines=True)
    for col, justify in (("layer", "left"), ("C", "right"), ("momentum", "right"), ("eps", "right"),
                         ("batches", "right"), ("running_mean", "left"), ("running_var", "left"),
                         ("weight", "left"), ("bias", "left"), ("flags", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in reports:
        momentum = r.momentum if isinstance(r.momentum, str) else _fmt(r.momentum)
        flags = "\n".join(f"[red]{f}[/red]" for f in r.flags) or "[green]ok[/green]"
        table.add_row(r.name or "<root>", str(r.channels), momentum, _fmt(r.eps),
                      "-" if r.num_batches_tracked is None else str(r.num_batches_tracked),
                      *(_fmt_summary(getattr(r, k)) for k in _TENSORS), flags)
    return table


def plot_running_stats(reports_or_source: list[LayerReport] | Any, path: str | os.PathLike) -> Path:
    """Write a PNG with one row per layer: per-channel ``running_mean`` (left), ``running_var`` (right).

    ``reports_or_source``: the output of :func:`inspect`, or anything :func:`inspect`
    accepts. Dead channels (``running_var < eps``) are marked in red, non-finite ones by
    an orange line; ``running_var`` is drawn on a log scale when it spans decades. Uses matplotlib's
    Agg canvas directly (no pyplot, no global backend change). Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if isinstance(reports_or_source, list) and all(isinstance(r, LayerReport) for r in reports_or_source):
        reports = reports_or_source
    else:
        reports = inspect(reports_or_source)
    reports = [r for r in reports if "running_mean" in r.values and "running_var" in r.values]
    if not reports:
        raise ValueError("plot_running_stats: no batch-norm layer with running statistics to plot")
    path = Path(path)
    rows = len(reports)
    fig = Figure(figsize=(11, 1.6 * rows + 0.6), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    for i, r in enumerate(reports):
        channels = range(r.channels)
        for j, key in enumerate(("running_mean", "running_var")):
            ax = axes[i][j]
            v = r.values[key].numpy()
            ax.plot(channels, v, ".", markersize=3, color="tab:blue")
            if key == "running_var" and r.dead_channels:
                ax.plot(r.dead_channels, v[r.dead_channels], "o", markersize=4, color="tab:red", label="dead")
                ax.legend(loc="upper right", fontsize=7)
            finite = v[np.isfinite(v)]
            if key == "running_var" and finite.size and finite.min() > 0 and finite.max() > 100 * finite.min():
                ax.set_yscale("log")  # spans decades: dead and exploding channels both stay visible
            bad = np.flatnonzero(~np.isfinite(v))
            for k, c in enumerate(bad):
                ax.axvline(c, color="tab:orange", linewidth=1, label="non-finite" if k == 0 else None)
            if bad.size:
                ax.legend(loc="upper right", fontsize=7)
            ax.set_title(f"{r.name or '<root>'} {key}", fontsize=8, loc="left")
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1][0].set_xlabel("channel", fontsize=8)
    axes[-1][1].set_xlabel("channel", fontsize=8)
    fig.savefig(path, format="png")
    return path
