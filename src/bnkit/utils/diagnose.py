r"""``bnkit.diagnose``: why does my model behave differently in eval()? The layer, the cause, the fix.

A batch-norm layer normalizes with the statistics of the current batch in train mode and
with its running statistics in eval mode. When the two disagree the model changes
behaviour between the modes, and the causes are few: running statistics that no longer
match the data (weight averaging, fine-tuning on other data, a momentum too high, too few
updates), batch statistics too noisy to trust (tiny or non-i.i.d. batches), and dead or
non-finite channels. :func:`diagnose` measures each of them per layer over ``data``.

Per layer, with :math:`\mu, \sigma^2` the exact mean and unbiased variance of the layer's
input over all of ``data`` (what :func:`bnkit.recalibrate` would write), :math:`m, v` the
``running_mean`` and ``running_var``, and ``eps`` added to both variances as the layer
adds it (so a constant channel compares as finite numbers):

* ``mean_shift`` = :math:`(m - \mu) / \sqrt{\sigma^2 + \epsilon}`: how far the running
  mean is from the data's, in the data's standard deviations (median of the absolute
  value over channels; the worst channel keeps its sign);
* ``var_ratio`` = :math:`(v + \epsilon) / (\sigma^2 + \epsilon)` (worst: farthest from 1
  on a log scale);
* ``divergence`` = :math:`KL(N(\mu, \sigma^2 + \epsilon) \,\|\, N(m, v + \epsilon))
  = \tfrac12 [\log r + (1 + s^2)/r - 1]` with :math:`r` the variance ratio and :math:`s`
  the mean shift: 0 when the running statistics are the data's, :math:`s^2/2` for a pure
  shift. A layer whose worst channel exceeds :data:`STALE_DIVERGENCE` has stale running
  statistics;
* ``mean_wobble`` and ``var_wobble``: the root mean square, over the batches of ``data``
  (weighted by their sizes; a ``GhostBatchNorm`` layer's virtual batches), of
  :math:`(\bar x_b - \mu)/\sqrt{\sigma_p^2 + \epsilon}` and
  :math:`(s_b^2 - \sigma_p^2)/(\sigma_p^2 + \epsilon)`, with :math:`\bar x_b, s_b^2` the
  batch's mean and biased variance (what a layer in train mode normalizes with) and
  :math:`\sigma_p^2` the data's population variance. For i.i.d. batches of :math:`M`
  values per channel they are about :math:`1/\sqrt{M}` and :math:`\sqrt{2/M}`; this is what
  a model in train mode pays for small or non-i.i.d. batches. Give ``data`` in the batches
  the model meets in train mode;
* ``output_effect``: the model's output with this one layer normalizing with the exact
  statistics instead of its running statistics (every other layer on its running
  statistics, the whole model in eval mode), as the root mean square of the change in
  units of the standard deviation of the output of the model with *every* layer on the
  exact statistics (the model :func:`bnkit.recalibrate` would give). For a 2-D output
  with several columns (logits), ``prediction_change`` is the fraction of rows whose
  argmax changes. The layer with the largest effect is :attr:`Diagnosis.worst_layer`;
* the flags of :func:`bnkit.inspect` (non-finite, dead, zero weight, never updated).

One verdict per layer, the first that applies: ``non-finite`` (running statistics,
weight, bias or the layer's input on ``data``), ``stale running statistics``,
``dead channels`` (running or data variance below ``eps``), ``noisy batch statistics``
(median ``mean_wobble`` above :data:`NOISY_MEAN_WOBBLE` or ``var_wobble`` above
:data:`NOISY_VAR_WOBBLE`), ``ok``; each with the advice that fits.

How: one pass over ``data`` with every layer normalizing with its batch statistics (as
:func:`bnkit.recalibrate` runs it) gives the exact and the per-batch statistics; a second
pass, inside :func:`bnkit.batch_stats` (``normalize_with="running"``, nothing written to
the buffers) and in eval mode, runs each batch ``2 + layers`` times: all layers on their
running statistics, all on the exact ones, and each one switched alone (a forward hook
returns the layer's own pure function applied with the exact statistics). The model is
left exactly as it was (parameters, buffers, modes, hooks, classes), also when ``data``
or the model raises. ``data`` is iterated twice; a one-shot iterator is first read into
a list (at most ``num_batches`` batches).

The layers diagnosed: subclasses of torch's ``_BatchNorm`` with running statistics
(torch's, bnkit's and its variants, ``SyncBatchNorm``) and bnkit's frozen batch norm (its
input is recorded as it is, it has no batch statistics to wobble; its output effect uses
:func:`bnkit.functional.frozen_batch_norm`). Instance norm is left out. A model with a subclass
of torch's batch norm that bnkit cannot steer (no bnkit twin, e.g. timm's ``BatchNormAct2d``) is
refused with a ``TypeError`` naming it, before any batch runs.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bnkit import reference as ref
from bnkit.functional import frozen_batch_norm
from bnkit.nn import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from bnkit.utils.batch_stats import batch_stats, check_controllable
from bnkit.utils.inspect import LayerReport, json_float
from bnkit.utils.inspect import inspect as inspect_model
from bnkit.utils.recalibrate import (
    StatisticsAccumulator,
    batch_statistics_pass,
    bn_layers,
    check_run_args,
    default_forward,
    run_batches,
)

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "DEAD",
    "NEGLIGIBLE_EFFECT",
    "NOISY",
    "NOISY_MEAN_WOBBLE",
    "NOISY_VAR_WOBBLE",
    "NONFINITE",
    "OK",
    "STALE",
    "STALE_DIVERGENCE",
    "VERDICTS",
    "Diagnosis",
    "LayerDiagnosis",
    "Spread",
    "diagnose",
    "format_table",
    "plot_diagnosis",
]

OK = "ok"
STALE = "stale running statistics"
NOISY = "noisy batch statistics"
DEAD = "dead channels"
NONFINITE = "non-finite"
VERDICTS = (OK, STALE, NOISY, DEAD, NONFINITE)

# KL of 0.25 nats: a mean off by 0.7 data standard deviations, or a running variance about
# 3.3 (or 0.42) times the data's. The demo's trained BN-LeNet on a few hundred held-out digits
# stays below 0.11 in its worst channel; the layers its broken copy needs recalibrated are at 0.3 to 6.
STALE_DIVERGENCE = 0.25
# i.i.d. batches of about 10 values per channel wobble this much (1/sqrt(M), sqrt(2/M)).
NOISY_MEAN_WOBBLE = 0.3
NOISY_VAR_WOBBLE = 0.45
# A noisy layer fed batches of at least this many samples points at non-i.i.d. batches.
IID_BATCH_SAMPLES = 16
# An output effect below this is float rounding, not a layer to name.
NEGLIGIBLE_EFFECT = 1e-4
# A momentum at least this large lets the last few batches decide the running statistics.
HIGH_MOMENTUM = 0.5


# --- what a diagnosis holds ------------------------------------------------------------------


def _from_json_float(x: Any) -> float | None:
    if isinstance(x, str):
        return float(x)  # "nan", "inf", "-inf"
    return None if x is None else float(x)


@dataclass
class Spread:
    """A per-channel quantity in two numbers: its median and its worst channel.

    ``worst`` is the value at channel ``channel``; a non-finite channel is the worst.
    ``None`` everywhere when the quantity is undefined (no channel).
    """

    median: float | None
    worst: float | None
    channel: int | None

    @classmethod
    def of(cls, values: Tensor, badness: Tensor | None = None, median_of: Tensor | None = None) -> Spread:
        """``badness`` ranks the channels (default ``values``); ``median_of`` (default ``values``)."""
        values = values.detach().to("cpu", torch.float64).reshape(-1)
        if values.numel() == 0:
            return cls(None, None, None)
        badness = values if badness is None else badness.reshape(-1)
        median_of = values if median_of is None else median_of.reshape(-1)
        finite = torch.isfinite(median_of)
        median = float(median_of[finite].median()) if bool(finite.any()) else math.nan
        broken = (~torch.isfinite(values)).nonzero().flatten()
        if broken.numel():
            channel = int(broken[0])
        else:
            channel = int(torch.argmax(badness))
        return cls(median, float(values[channel]), channel)

    def to_dict(self) -> dict[str, Any]:
        return {"median": json_float(self.median), "worst": json_float(self.worst), "channel": self.channel}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spread:
        return cls(_from_json_float(d["median"]), _from_json_float(d["worst"]), d["channel"])


_SPREADS = ("mean_shift", "var_ratio", "divergence", "mean_wobble", "var_wobble")


@dataclass
class LayerDiagnosis:
    """What :func:`diagnose` found about one batch-norm layer (see the module docstring)."""

    name: str
    kind: str
    channels: int
    batches: int
    samples_per_batch: float | None
    values_per_batch: float | None
    mean_shift: Spread
    var_ratio: Spread
    divergence: Spread
    mean_wobble: Spread
    var_wobble: Spread
    output_effect: float | None
    prediction_change: float | None
    verdict: str
    advice: str
    flags: list[str] = field(default_factory=list)
    dead_channels: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: plain types; non-finite floats as ``"nan"``/``"inf"``/``"-inf"``."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "channels": self.channels, "batches": self.batches,
            "samples_per_batch": json_float(self.samples_per_batch),
            "values_per_batch": json_float(self.values_per_batch),
        }
        for key in _SPREADS:
            out[key] = getattr(self, key).to_dict()
        out.update(output_effect=json_float(self.output_effect),
                   prediction_change=json_float(self.prediction_change), verdict=self.verdict,
                   advice=self.advice, flags=list(self.flags), dead_channels=list(self.dead_channels))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerDiagnosis:
        return cls(
            name=d["name"], kind=d["kind"], channels=d["channels"], batches=d["batches"],
            samples_per_batch=_from_json_float(d["samples_per_batch"]),
            values_per_batch=_from_json_float(d["values_per_batch"]),
            **{key: Spread.from_dict(d[key]) for key in _SPREADS},
            output_effect=_from_json_float(d["output_effect"]),
            prediction_change=_from_json_float(d["prediction_change"]),
            verdict=d["verdict"], advice=d["advice"], flags=list(d["flags"]),
            dead_channels=list(d["dead_channels"]),
        )


@dataclass
class Diagnosis:
    """One :class:`LayerDiagnosis` per batch-norm layer, in ``model.named_modules()`` order.

    ``output_effect_all`` / ``prediction_change_all``: every layer on the exact statistics
    at once (the recalibrated model) against every layer on its running statistics.
    ``print(diagnosis)`` shows the table and the advice; ``rich`` renders it in colour.
    """

    layers: list[LayerDiagnosis]
    batches: int
    output_effect_all: float | None
    prediction_change_all: float | None

    @property
    def worst_layer(self) -> str | None:
        """The layer whose running statistics cost the output the most.

        ``None`` when no layer changes the output by more than :data:`NEGLIGIBLE_EFFECT`
        (float rounding) or no effect was measured.
        """
        effects = [(layer.output_effect, layer.name) for layer in self.layers
                   if layer.output_effect is not None and not math.isnan(layer.output_effect)]
        if not effects or max(effects)[0] < NEGLIGIBLE_EFFECT:
            return None
        return max(effects)[1]

    @property
    def healthy(self) -> bool:
        return all(layer.verdict == OK for layer in self.layers)

    def layer(self, name: str) -> LayerDiagnosis:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no batch-norm layer named {name!r} in this diagnosis "
                       f"(layers: {', '.join(repr(x.name) for x in self.layers)})")

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON (``json.dumps(..., allow_nan=False)`` accepts it)."""
        return {
            "batches": self.batches,
            "output_effect_all": json_float(self.output_effect_all),
            "prediction_change_all": json_float(self.prediction_change_all),
            "worst_layer": self.worst_layer,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Diagnosis:
        """The inverse of :meth:`to_dict`."""
        return cls(layers=[LayerDiagnosis.from_dict(x) for x in d["layers"]], batches=d["batches"],
                   output_effect_all=_from_json_float(d["output_effect_all"]),
                   prediction_change_all=_from_json_float(d["prediction_change_all"]))

    def table(self) -> Table:
        """A ``rich.table.Table``: one row per layer."""
        return format_table(self)

    def summary_lines(self) -> list[str]:
        """The lines printed under the table: the effect of recalibrating, and each non-ok layer's advice."""
        total = _fmt(self.output_effect_all)
        if self.prediction_change_all is not None:
            total += f" ({self.prediction_change_all:.1%} of predictions change)"
        lines = [f"all layers on the data's exact statistics (what bnkit.recalibrate gives): output effect {total}"
                 + (f"; largest single layer: {self.worst_layer}" if self.worst_layer else "")]
        for layer in self.layers:
            if layer.verdict != OK:
                lines.append(f"{layer.name or '<root>'} ({layer.verdict}): {layer.advice}")
        if self.healthy:
            lines.append("every layer is ok")
        return lines

    def __rich_console__(self, console, options):
        from rich.text import Text

        yield self.table()
        for line in self.summary_lines():
            yield Text(line)

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=160, no_color=True, highlight=False, emoji=False).print(self)
        return buffer.getvalue()

    def plot(self, path: str | os.PathLike) -> Path:
        """One PNG: the worst channel's divergence per layer (left), the output effect per layer (right)."""
        return plot_diagnosis(self, path)


# --- measuring -------------------------------------------------------------------------------


class _LayerAccumulator(StatisticsAccumulator):
    """recalibrate's exact statistics, plus the spread of the per-batch means and variances.

    The per-batch means, weighted by their element counts, are merged like data points
    (Chan's formula with M2 = 0): their M2 is then sum_b n_b (mean_b - mu)^2, the
    between-batch part of the total. The biased batch variances are merged the same way.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.samples = 0
        self.batch_means: tuple[int, Tensor, Tensor] | None = None
        self.batch_vars: tuple[int, Tensor, Tensor] | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # GhostBatchNorm normalizes each virtual batch (torch.split along dim 0) with its own
        # statistics in train mode: those are the batches whose wobble matters. The exact
        # statistics do not change (Chan's merge of the pieces is the whole).
        virtual = getattr(module, "virtual_batch_size", None)
        x = args[0]
        if isinstance(virtual, int) and x.dim() >= 2 and x.shape[0] > virtual:
            for piece in x.split(virtual):
                super().__call__(module, (piece, *args[1:]), kwargs)
            return
        super().__call__(module, args, kwargs)

    def add(self, n: int, mean: Tensor, m2: Tensor, samples: int) -> None:
        super().add(n, mean, m2, samples)
        self.samples += samples
        zero = torch.zeros_like(mean)
        var = m2 / n
        if self.batch_means is None:
            self.batch_means, self.batch_vars = (n, mean, zero), (n, var, zero)
        else:
            self.batch_means = ref.merge_stats(*self.batch_means, n, mean, zero)
            self.batch_vars = ref.merge_stats(*self.batch_vars, n, var, zero)


@dataclass
class _Exact:
    """A layer's exact statistics over the data (float64, CPU) and its batch spread."""

    mean: Tensor
    var: Tensor  # unbiased, as running_var
    mean_wobble: Tensor
    var_wobble: Tensor
    batches: int
    samples_per_batch: float
    values_per_batch: float


def _exact(acc: _LayerAccumulator, eps: float) -> _Exact | None:
    if acc.mean is None:
        return None
    n = acc.count
    mean = acc.mean.cpu()
    m2 = acc.m2.cpu()
    var = m2 / (n - 1) if n > 1 else torch.full_like(m2, math.nan)
    var_pop = m2 / n
    _, _, between = acc.batch_means
    _, mean_of_vars, m2_of_vars = acc.batch_vars
    mean_wobble = (between.cpu() / n).sqrt() / (var_pop + eps).sqrt()
    # sum_b n_b (v_b - var_pop)^2 = M2 of the v_b around their mean + n (their mean - var_pop)^2
    var_spread = (m2_of_vars.cpu() + n * (mean_of_vars.cpu() - var_pop).square()) / n
    var_wobble = var_spread.sqrt() / (var_pop + eps)
    return _Exact(mean, var, mean_wobble, var_wobble, acc.batches, acc.samples / acc.batches, n / acc.batches)


def _flatten_output(output: Any) -> list[Tensor]:
    """The floating-point tensors of a model's output (a tensor, or nested tuples/lists/dicts)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() or output.is_complex() else []
    if isinstance(output, dict):
        return [t for v in output.values() for t in _flatten_output(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _flatten_output(v)]
    return []


class _EffectMeter:
    """Sums over batches of one switched model's output change against the running-statistics model."""

    def __init__(self) -> None:
        self.sq_diff = 0.0
        self.elements = 0
        self.flips = 0
        self.rows = 0

    def add(self, outputs: list[Tensor], baseline: list[Tensor]) -> None:
        for y, y0 in zip(outputs, baseline, strict=True):
            d = (y.detach().to(torch.float64) - y0.detach().to(torch.float64))
            self.sq_diff += float(d.abs().square().sum())
            self.elements += d.numel()
        if len(outputs) == 1 and outputs[0].dim() == 2 and outputs[0].shape[1] > 1 and not outputs[0].is_complex():
            self.flips += int((outputs[0].argmax(1) != baseline[0].argmax(1)).sum())
            self.rows += outputs[0].shape[0]

    def effect(self, scale: float) -> float | None:
        if self.elements == 0:
            return None
        rms = math.sqrt(self.sq_diff / self.elements)
        if rms == 0 or math.isnan(rms) or math.isnan(scale):
            return rms if not math.isnan(scale) else math.nan
        return rms / scale if scale > 0 else math.inf  # the exact-statistics output is constant

    def prediction_change(self) -> float | None:
        return self.flips / self.rows if self.rows else None


class _OutputScale:
    """Running mean and M2 of every element of the reference (exact-statistics) output."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, outputs: list[Tensor]) -> None:
        for y in outputs:
            v = y.detach().to(torch.float64).reshape(-1)
            if v.is_complex():
                v = torch.view_as_real(v).reshape(-1)
            if v.numel() == 0:
                continue
            n = v.numel()
            mean = float(v.mean())
            m2 = float((v - mean).square().sum())
            total = self.count + n
            delta = mean - self.mean
            self.m2 += m2 + delta * delta * self.count * n / total
            self.mean += delta * n / total
            self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (dropout off: outputs comparable), each one's flag restored."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, training in saved:
            m.training = training


_FROZEN = (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)


def _frozen_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """bnkit's frozen batch-norm layers: running statistics that they always normalize with."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _FROZEN)]


@contextlib.contextmanager
def _recording(layers: list[tuple[str, nn.Module]]) -> Iterator[list[StatisticsAccumulator]]:
    """Accumulators on the inputs of layers whose mode is left as it is (frozen ones); hooks removed on exit."""
    accumulators = [_LayerAccumulator(m) for _, m in layers]
    handles = []
    try:
        for (_, m), acc in zip(layers, accumulators, strict=True):
            handles.append(m.register_forward_pre_hook(acc, with_kwargs=True))
        yield accumulators
    finally:
        for h in handles:
            h.remove()


def _switch_hook(exact: tuple[Tensor, Tensor], active: Callable[[], bool]):
    """Forward hook: when ``active()``, the layer's output is its own pure function with ``exact`` statistics."""
    mean, var = exact

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not active():
            return None
        if isinstance(module, _FROZEN):
            return frozen_batch_norm(args[0], mean, var, module.weight, module.bias, module.eps,
                                     activation=getattr(module, "activation", "identity"),
                                     activation_param=getattr(module, "activation_param", 0.01),
                                     channel_dim=getattr(module, "channel_dim", 1))
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        y, _, _ = module._batch_norm_pure(args[0], mean, var, module.weight, module.bias, False, 0.0, module.eps,
                                          mask=mask, channel_dim=module.channel_dim)
        return y

    return hook


def _output_effects(
    model: nn.Module,
    data: Iterable[Any],
    layers: list[tuple[str, nn.Module]],
    exact: dict[str, tuple[Tensor, Tensor]],
    num_batches: int | None,
    progress: bool,
    forward: Callable[[nn.Module, Any], Any] | None,
    device: torch.device | str | None,
) -> tuple[dict[str, _EffectMeter], _EffectMeter, _OutputScale]:
    switched: set[str] = set()
    meters = {name: _EffectMeter() for name, _ in layers if name in exact}
    every = _EffectMeter()
    scale = _OutputScale()

    def on_output(batch: Any, output: Any) -> None:
        # `output` is the model on its running statistics; now the exact ones, all and one at a time.
        run = forward or default_forward
        baseline = _flatten_output(output)
        switched.update(meters)
        reference = _flatten_output(run(model, batch))
        every.add(reference, baseline)
        scale.add(reference)
        for name, meter in meters.items():
            switched.clear()
            switched.add(name)
            meter.add(_flatten_output(run(model, batch)), baseline)
        switched.clear()

    with contextlib.ExitStack() as stack:
        stack.enter_context(batch_stats(model, normalize_with="running", update_running_stats=False))
        stack.enter_context(_eval_mode(model))
        for name, module in layers:
            if name not in exact:
                continue
            mean, var = exact[name]
            rm = module.running_mean
            stats = (mean.to(rm.device, rm.dtype), var.to(rm.device, rm.dtype))
            handle = module.register_forward_hook(_switch_hook(stats, lambda name=name: name in switched),
                                                  with_kwargs=True)
            stack.callback(handle.remove)
        run_batches(model, data, num_batches, progress, forward, device, "diagnose: output effect", on_output)
    return meters, every, scale


# --- the verdict -----------------------------------------------------------------------------


def _verdict(module: nn.Module, report: LayerReport | None, e: _Exact | None,
             divergence: Spread, mean_wobble: Spread, var_wobble: Spread,
             constant: list[int]) -> tuple[str, str]:
    """``(verdict, advice)`` for one layer: the first cause that applies, and what to do about it."""
    nonfinite = dict(report.nonfinite) if report is not None else {}
    input_nonfinite = e is not None and not bool(torch.isfinite(e.mean).all() and torch.isfinite(e.var).all())
    if nonfinite or input_nonfinite:
        if "weight" in nonfinite or "bias" in nonfinite:
            return NONFINITE, ("weight or bias is not finite: training diverged; reload a checkpoint from before "
                               "it (recalibrate cannot repair weights)")
        if nonfinite:
            return NONFINITE, ("the running statistics are not finite (a NaN/inf batch reached them in training): "
                               "bnkit.recalibrate(model, data) replaces them; bnkit.set_nonfinite_policy('skip') "
                               "keeps such batches out of them")
        return NONFINITE, ("the layer's input is not finite on this data: the cause is upstream (the data or an "
                           "earlier layer)")
    if e is None:
        return OK, "the layer saw no data (not on the path of this data): nothing measured"
    if divergence.worst is not None and divergence.worst > STALE_DIVERGENCE:
        momentum = getattr(module, "momentum", None)
        if isinstance(module, _FROZEN):
            return STALE, ("a frozen layer's statistics come from other data (pretraining, another domain): "
                           "bnkit.unfreeze(model), bnkit.recalibrate(model, data), then bnkit.freeze(model) again "
                           "(a layer frozen elsewhere: recalibrate the unfrozen model)")
        if report is not None and report.never_updated:
            return STALE, ("the running statistics were never updated (still 0 and 1: trained in eval() or saved "
                           "before training): bnkit.recalibrate(model, data)")
        if momentum is not None and momentum >= HIGH_MOMENTUM:
            return STALE, (f"momentum {momentum:g} lets the last few batches decide the running statistics: "
                           "bnkit.recalibrate(model, data), and train with a smaller momentum (0.1) or None")
        return STALE, ("the running statistics do not fit this data (weight averaging, fine-tuning on other data, "
                       "a new domain, too few updates): bnkit.recalibrate(model, data) on the data the model will "
                       "see")
    dead = sorted(set(report.dead_channels if report is not None else []) | set(constant))
    if dead:
        shown = ", ".join(map(str, dead[:8])) + (", ..." if len(dead) > 8 else "")
        return DEAD, (f"{len(dead)} channel{'s' if len(dead) != 1 else ''} ({shown}) have a variance below eps: they "
                      "carry no signal and the layer divides by about sqrt(eps) there; look at what feeds them (a "
                      "dead ReLU, a pruned or decayed filter) or prune them")
    wobbly = ((mean_wobble.median is not None and mean_wobble.median > NOISY_MEAN_WOBBLE)
              or (var_wobble.median is not None and var_wobble.median > NOISY_VAR_WOBBLE))
    if wobbly:
        if e.samples_per_batch >= IID_BATCH_SAMPLES:
            return NOISY, (f"batches of {e.samples_per_batch:.0f} samples should not wobble this much: they are not "
                           "i.i.d. (sorted or grouped data); shuffle them. In train mode each batch is normalized "
                           "with its own statistics; evaluate in eval()")
        return NOISY, (f"each batch gives {e.values_per_batch:.0f} values per channel ({e.samples_per_batch:.0f} "
                       "samples): in train mode a sample's output depends on the rest of its batch. Use larger "
                       "batches; SyncBatchNorm pools them across devices; GhostBatchNorm trains with the small "
                       "batches you will meet; to fine-tune with small batches, bnkit.freeze(model) normalizes with "
                       "the running statistics; evaluate in eval()")
    return OK, ""


# --- the entry point -------------------------------------------------------------------------


@torch.no_grad()
def diagnose(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> Diagnosis:
    """Diagnose every batch-norm layer of ``model`` on ``data``: the layer, the cause, the fix.

    ``data``, ``num_batches``, ``forward`` and ``device`` as :func:`bnkit.recalibrate` takes
    them; ``data`` is read twice (a one-shot iterator is kept in a list first). ``progress``
    shows a tqdm bar per pass. Returns a :class:`Diagnosis`; the model is left exactly as
    it was, also when ``data`` or the model raises. See the module docstring for every
    number and the rules of the verdict.
    """
    check_run_args("diagnose", model, num_batches, forward)
    layers = bn_layers(model)
    frozen = _frozen_layers(model)
    if not layers and not frozen:
        raise ValueError("diagnose: the model has no batch-norm layer with running statistics")
    for name, m in layers:
        # the first batch would materialize it: that is a change to the model, not a diagnosis
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"diagnose: lazy layer {name!r} is not initialized yet (run one batch through it)")
    check_controllable(model, "diagnose")  # its output-effect pass steers every layer (bnkit.batch_stats)
    if isinstance(data, Iterator):
        data = list(data if num_batches is None else itertools.islice(data, num_batches))

    with batch_statistics_pass(layers, _LayerAccumulator) as accumulators, _recording(frozen) as frozen_accs:
        seen = run_batches(model, data, num_batches, progress, forward, device, "diagnose: statistics")
    if seen == 0:
        raise ValueError("diagnose: data yielded no batches")

    recorded = {name: acc for (name, _), acc in zip(layers + frozen, accumulators + frozen_accs, strict=True)}
    chosen = {id(m) for _, m in layers + frozen}
    everything = [(name, m) for name, m in model.named_modules() if id(m) in chosen]  # the model's order
    exact = {name: _exact(recorded[name], float(m.eps)) for name, m in everything}
    switch = {name: (e.mean, e.var) for name, e in exact.items() if e is not None}
    meters, every, scale = _output_effects(model, data, everything, switch, num_batches, progress, forward,
                                           device)

    reports = {r.name: r for r in inspect_model(model)}
    results = []
    for name, module in everything:
        e = exact[name]
        report = reports.get(name)
        eps = float(module.eps)
        rm = module.running_mean.detach().to("cpu", torch.float64)
        rv = module.running_var.detach().to("cpu", torch.float64)
        if e is None:
            empty = Spread(None, None, None)
            shift = ratio = kl = mean_wobble = var_wobble = empty
            constant: list[int] = []
        else:
            s = e.var + eps
            r = rv + eps
            shift_t = (rm - e.mean) / s.sqrt()
            ratio_t = r / s
            kl_t = 0.5 * (ratio_t.log() + (1 + shift_t.square()) / ratio_t - 1)
            shift = Spread.of(shift_t, badness=shift_t.abs(), median_of=shift_t.abs())
            ratio = Spread.of(ratio_t, badness=ratio_t.log().abs())
            kl = Spread.of(kl_t)
            if isinstance(module, _FROZEN):  # never normalizes with batch statistics: no wobble to pay
                mean_wobble = var_wobble = Spread(None, None, None)
            else:
                mean_wobble = Spread.of(e.mean_wobble)
                var_wobble = Spread.of(e.var_wobble)
            constant = (e.var < eps).nonzero().flatten().tolist()
        verdict, advice = _verdict(module, report, e, kl, mean_wobble, var_wobble, constant)
        flags = list(report.flags) if report is not None else []
        if constant:
            flags.append(f"constant in the data: {len(constant)} channel{'s' if len(constant) != 1 else ''}")
        meter = meters.get(name)
        dead = sorted(set(report.dead_channels if report is not None else []) | set(constant))
        results.append(LayerDiagnosis(
            name=name, kind=type(module).__name__, channels=int(module.num_features),
            batches=e.batches if e is not None else 0,
            samples_per_batch=e.samples_per_batch if e is not None else None,
            values_per_batch=e.values_per_batch if e is not None else None,
            mean_shift=shift, var_ratio=ratio, divergence=kl, mean_wobble=mean_wobble, var_wobble=var_wobble,
            output_effect=meter.effect(scale.std) if meter is not None else None,
            prediction_change=meter.prediction_change() if meter is not None else None,
            verdict=verdict, advice=advice, flags=flags, dead_channels=dead,
        ))
    return Diagnosis(layers=results, batches=seen, output_effect_all=every.effect(scale.std),
                     prediction_change_all=every.prediction_change())


# --- showing it ------------------------------------------------------------------------------

_VERDICT_STYLE = {OK: "green", STALE: "red", NOISY: "yellow", DEAD: "magenta", NONFINITE: "red"}


def _fmt(x: float | None, spec: str = ".2g") -> str:
    if x is None:
        return "-"
    if abs(x) < 1e-4:
        return "0"  # rounding noise of an exact match
    return format(x, spec)


def _fmt_spread(s: Spread, spec: str = ".2g") -> str:
    if s.worst is None:
        return "-"
    return f"{_fmt(s.median, spec)} / {_fmt(s.worst, spec)}\nch {s.channel}"


def format_table(diagnosis: Diagnosis) -> Table:
    """One row per layer: verdict, mean shift, variance ratio, divergence, wobble, output effect, flags."""
    from rich.markup import escape
    from rich.table import Table

    title = (f"bnkit diagnose: {len(diagnosis.layers)} batch-norm layers, {diagnosis.batches} batches; "
             f"numbers are median / worst channel")
    table = Table(title=title, title_justify="left", show_lines=False)
    flagged = any(layer.flags for layer in diagnosis.layers)
    columns = [("layer", "left"), ("verdict", "left"), ("mean shift\n(data std)", "right"),
               ("var ratio\nrunning/data", "right"), ("divergence\n(KL)", "right"),
               ("batch wobble\nmean, var", "right"), ("output\neffect", "right")]
    for col, justify in columns:
        # numbers and names stay whole; the verdict and the flags may wrap
        wraps = col == "verdict"
        table.add_column(col, justify=justify, no_wrap=not wraps, overflow="fold", min_width=13 if wraps else None)
    if flagged:
        table.add_column("flags", justify="left", overflow="fold")
    worst = diagnosis.worst_layer
    for layer in diagnosis.layers:
        style = _VERDICT_STYLE.get(layer.verdict, "")
        effect = _fmt(layer.output_effect)
        if layer.prediction_change is not None:
            effect += f"\n{layer.prediction_change:.1%} flips"
        if layer.name == worst and layer.output_effect:
            effect = f"[bold]{effect}[/bold]"
        row = [
            f"{escape(layer.name or '<root>')}\n{layer.kind}({layer.channels})",
            f"[{style}]{layer.verdict}[/{style}]" if style else layer.verdict,
            _fmt_spread(layer.mean_shift, "+.2g"), _fmt_spread(layer.var_ratio), _fmt_spread(layer.divergence),
            f"{_fmt(layer.mean_wobble.median)}, {_fmt(layer.var_wobble.median)}",
            effect,
        ]
        if flagged:
            row.append(escape("\n".join(layer.flags)) or "-")
        table.add_row(*row)
    return table


def plot_diagnosis(diagnosis: Diagnosis, path: str | os.PathLike) -> Path:
    """Write the PNG of :meth:`Diagnosis.plot` (matplotlib's Agg canvas, no pyplot). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    names = [layer.name or "<root>" for layer in diagnosis.layers]
    colors = {OK: "tab:green", STALE: "tab:red", NOISY: "tab:orange", DEAD: "tab:purple", NONFINITE: "black"}
    fig = Figure(figsize=(10, 0.35 * len(names) + 1.8), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, sharey=True)
    ys = range(len(names))
    floor = 1e-6  # a log axis has no 0: smaller values are drawn at the floor
    kl = [layer.divergence.worst for layer in diagnosis.layers]
    kl = [max(v, floor) if v is not None and math.isfinite(v) else floor for v in kl]
    left.barh(ys, kl, color=[colors.get(layer.verdict, "grey") for layer in diagnosis.layers])
    left.set_xscale("log")
    left.axvline(STALE_DIVERGENCE, color="tab:red", linestyle="--", linewidth=1, label="stale above")
    left.set_yticks(list(ys), names, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("divergence, worst channel (KL, nats)")
    for verdict, color in colors.items():
        if any(layer.verdict == verdict for layer in diagnosis.layers):
            left.plot([], [], "s", color=color, label=verdict)
    left.legend(loc="best", fontsize=7)
    effects = [layer.output_effect if layer.output_effect is not None and math.isfinite(layer.output_effect) else 0.0
               for layer in diagnosis.layers]
    right.barh(ys, effects, color="tab:blue")
    right.set_xlabel("output effect (rms change / output std), layer switched alone")
    fig.suptitle("bnkit diagnose: running statistics against the data's exact statistics", fontsize=10)
    fig.savefig(path, format="png")
    return path
