"""Batch norm, step by step, for a learner: the data behind ``bnkit explain``.

:func:`explain` runs a bnkit batch-norm layer on an input for one or more steps and
records, per channel, every number of the textbook computation: the values that feed the
statistics, the mean, the *biased* variance used to normalize, the *unbiased* variance
used to update the running variance, ``invstd``, the normalized output ``xhat``, the affine
output ``y``, and the running statistics before and after each step. The numbers come
from :mod:`bnkit.reference` (the spec) and are cross-checked against the bnkit module that
runs the same call. :func:`compare_with_torch` then runs ``torch.nn.BatchNorm*`` - the
oracle - on the same input and records the largest difference.

The result is plain data (dataclasses with ``to_dict()``); the command line renders it.

The default input is the classic 2x2x2x2 example of the seed texts (N=2, C=2, H=W=2)::

    [[[[1, 1], [1, 2]], [[-1, 1], [0, 1]]], [[[0, -1], [2, 2]], [[0, -1], [3, 1]]]]

channel 0 sees the 8 values 1, 1, 1, 2, 0, -1, 2, 2 (mean 1, biased var 1, unbiased 8/7).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import bnkit
from bnkit import reference as ref

__all__ = [
    "CLASSIC_INPUT",
    "ChannelStep",
    "Explanation",
    "Step",
    "compare_with_torch",
    "explain",
    "parse_input",
    "parse_shape",
    "random_input",
]

CLASSIC_INPUT: list = [[[[1, 1], [1, 2]], [[-1, 1], [0, 1]]], [[[0, -1], [2, 2]], [[0, -1], [3, 1]]]]

_LAYERS = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}

NOTES = {
    "per_channel": (
        "Each channel c is normalized on its own: its statistics use the M = N * (spatial size) values of "
        "x[:, c] (every dim except dim 1), so running_mean and running_var have one entry per channel."
    ),
    "biased": (
        "Normalizing uses the biased variance (divide by M): the actual spread of this batch, as in the paper's "
        "Algorithm 1 (numpy's var/std also divide by M; torch.var/std divide by M - 1 unless unbiased=False)."
    ),
    "unbiased": (
        "The running variance is updated with the unbiased variance (divide by M - 1, Bessel's correction): it "
        "estimates the variance of the whole data set from a sample of M values, and the sample's own spread "
        "underestimates it by the factor (M - 1) / M."
    ),
    "momentum": (
        "momentum (torch's convention) is the weight of the NEW batch: running = (1 - momentum) * running + "
        "momentum * batch. Keras and Flax call the weight of the OLD value momentum: keras_momentum = "
        "1 - torch_momentum (Keras' 0.99 is torch's 0.01; d2l's from-scratch 0.9 is torch's 0.1)."
    ),
    "cumulative": (
        "momentum=None: the cumulative moving average. At the k-th update the factor is 1/k, so the running "
        "statistics are the plain average of all batch statistics seen so far."
    ),
    "eps": "eps sits inside the square root: invstd = 1 / sqrt(var + eps); it keeps a constant channel finite.",
    "affine": (
        "y = weight * xhat + bias. weight starts at 1 and bias at 0, so before any training the affine output "
        "equals xhat; training learns them (with weight = sqrt(var + eps) and bias = mean, BN would be undone)."
    ),
    "eval": (
        "Eval mode with running statistics: normalize with running_mean/running_var (estimates of the whole data "
        "set), leave them unchanged; the output of a sample no longer depends on the rest of the batch."
    ),
    "no_running": (
        "track_running_stats=False: there are no running statistics, so every mode (train or eval) normalizes "
        "with the statistics of the batch itself."
    ),
}


@dataclass
class ChannelStep:
    """One channel in one step: every number of the textbook computation."""

    channel: int
    values: list[float]  # x[:, c] flattened: the M values that feed this channel's statistics
    mean: float | None  # batch mean: sum(values) / M
    var_biased: float | None  # sum((values - mean)^2) / M      (used to normalize)
    var_unbiased: float | None  # sum((values - mean)^2) / (M - 1)  (used for running_var); None if M < 2
    normalize_mean: float  # the mean actually used to normalize (batch or running)
    normalize_var: float  # the variance actually used to normalize (biased batch var or running_var)
    invstd: float  # 1 / sqrt(normalize_var + eps)
    weight: float
    bias: float
    normalized: list[float]  # xhat = (x - normalize_mean) * invstd, same order as values
    output: list[float]  # y = weight * xhat + bias
    running_mean_before: float | None
    running_mean_after: float | None
    running_var_before: float | None
    running_var_after: float | None


@dataclass
class Step:
    """One call of the layer."""

    index: int  # 1-based
    normalize_with: str  # "batch" | "running"
    updates_running_stats: bool
    momentum: float | None  # the factor applied in this step (1/k for momentum=None); None if no update
    input: list
    output: list  # the bnkit module's output for this call
    channels: list[ChannelStep]
    bnkit_module_vs_reference: float  # largest |module output - textbook output| (both bnkit)
    torch: dict[str, float] | None = None  # filled by compare_with_torch: largest |bnkit - torch.nn| per item


@dataclass
class Explanation:
    """The whole walk-through; ``to_dict()`` is the JSON of ``bnkit explain --json``."""

    layer: str
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    mode: str
    dtype: str
    input_shape: list[int]
    count_per_channel: int  # M
    steps: list[Step]
    notes: list[str] = field(default_factory=list)
    backend: str | None = None  # the bnkit backend the module ran on
    max_abs_diff_vs_torch: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- input ------------------------------------------------------------------------------


def parse_input(text: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """A tensor from JSON text (nested lists of numbers, 2 to 5 dims); ``ValueError`` if not."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"input is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    try:
        x = torch.tensor(data, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"input must be a rectangular nested list of numbers ({exc})") from None
    _check_input(x)
    return x


def parse_shape(text: str) -> tuple[int, ...]:
    """``"4,3,5,5"`` or ``"4x3x5x5"`` -> (4, 3, 5, 5); ``ValueError`` for anything else."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--shape must be integers like 4,3,5,5, got {text!r}") from None
    if not 2 <= len(shape) <= 5 or any(s < 1 for s in shape):
        raise ValueError(f"--shape must have 2 to 5 positive sizes (N, C, ...), got {text!r}")
    return shape


def random_input(shape: tuple[int, ...], seed: int, steps: int = 1, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """``steps`` batches from N(0, 1), rounded to 2 decimals so a reader can follow them."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).round(decimals=2).to(dtype) for _ in range(steps)]


def _check_input(x: Tensor) -> None:
    if x.dim() not in _LAYERS:
        raise ValueError(f"input must have 2 to 5 dims (N, C, ...), got shape {list(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"input is empty (shape {list(x.shape)})")


def _per_channel(name: str, values: list[float] | None, c: int) -> list[float] | None:
    if values is None:
        return None
    if len(values) != c:
        raise ValueError(f"--{name} needs one value per channel ({c}), got {len(values)}")
    return [float(v) for v in values]


# --- the walk-through ---------------------------------------------------------------------


def _make_layer(cls_name: str, c: int, eps: float, momentum: float | None, affine: bool, track: bool,
                dtype: torch.dtype, source: Any) -> nn.Module:
    return getattr(source, cls_name)(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track,
                                     dtype=dtype)


def _init_layer(layer: nn.Module, weight: list[float] | None, bias: list[float] | None,
                running_mean: list[float] | None, running_var: list[float] | None) -> None:
    with torch.no_grad():
        for name, values in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                             ("running_var", running_var)):
            t = getattr(layer, name)
            if t is not None and values is not None:
                t.copy_(torch.tensor(values, dtype=t.dtype))


def _channel_values(x: Tensor) -> Tensor:
    """(C, M): row c holds x[:, c] flattened (batch-major, then spatial)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _floats(t: Tensor | None) -> list[float] | None:
    return None if t is None else [float(v) for v in t.tolist()]


def explain(
    inputs: Tensor | list[Tensor] | None = None,
    *,
    steps: int = 1,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    affine: bool = True,
    track_running_stats: bool = True,
    mode: str = "train",
    weight: list[float] | None = None,
    bias: list[float] | None = None,
    running_mean: list[float] | None = None,
    running_var: list[float] | None = None,
    backend: str = "reference",
) -> Explanation:
    """Walk through ``steps`` calls of a bnkit batch-norm layer.

    ``inputs`` is one tensor (reused at every step), a list of one tensor per step, or
    ``None`` for :data:`CLASSIC_INPUT` in float32. ``weight``/``bias`` (affine only) and
    ``running_mean``/``running_var`` (with running statistics only) set the layer's initial
    values per channel; torch's defaults (1, 0, 0, 1) otherwise. The layer class follows
    the input's dims: (N, C) and (N, C, L) -> BatchNorm1d, 4 dims -> 2d, 5 dims -> 3d.
    ``backend`` is the bnkit backend the module runs on (default ``"reference"``: the spec,
    and no kernel compilation before the first answer; ``"auto"`` runs the fast kernels).
    Raises ``ValueError`` for inputs or options torch would reject.
    """
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if mode not in ("train", "eval"):
        raise ValueError(f"--mode must be 'train' or 'eval', got {mode!r}")
    if not (isinstance(eps, float | int) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"--eps must be a positive number, got {eps}")
    if momentum is not None and not (0.0 <= momentum <= 1.0):
        raise ValueError(f"--momentum must be in [0, 1] or 'none', got {momentum}")
    if inputs is None:
        inputs = torch.tensor(CLASSIC_INPUT, dtype=torch.float32)
    batches = list(inputs) if isinstance(inputs, list | tuple) else [inputs] * steps
    if len(batches) != steps:
        raise ValueError(f"got {len(batches)} input batches for {steps} steps")
    first = batches[0]
    _check_input(first)
    for x in batches[1:]:
        if x.shape != first.shape:
            raise ValueError(f"every step needs the same shape, got {list(first.shape)} and {list(x.shape)}")
    if first.dtype not in _DTYPES.values():
        raise ValueError(f"input dtype must be float32 or float64, got {first.dtype}")
    c = first.shape[1]
    weight, bias = _per_channel("weight", weight, c), _per_channel("bias", bias, c)
    running_mean, running_var = _per_channel("running-mean", running_mean, c), _per_channel("running-var",
                                                                                            running_var, c)
    if not affine and (weight is not None or bias is not None):
        raise ValueError("--weight/--bias need --affine")
    if not track_running_stats and (running_mean is not None or running_var is not None):
        raise ValueError("--running-mean/--running-var need --track-running-stats")
    if running_var is not None and any(v < 0 for v in running_var):
        raise ValueError(f"--running-var must be >= 0, got {running_var}")

    cls_name = _LAYERS[first.dim()]
    layer = _make_layer(cls_name, c, eps, momentum, affine, track_running_stats, first.dtype, bnkit.nn)
    _init_layer(layer, weight, bias, running_mean, running_var)
    layer.train(mode == "train")
    m = ref.count_per_channel(first)
    use_batch = mode == "train" or not track_running_stats
    updates = mode == "train" and track_running_stats
    if use_batch and m < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(first.shape)} "
            f"(M = {m}: a single value has no spread)"
        )

    record: list[Step] = []
    updates_done = 0
    ran_on: str | None = None
    for index, x in enumerate(batches, start=1):
        rm_before = None if layer.running_mean is None else layer.running_mean.detach().clone()
        rv_before = None if layer.running_var is None else layer.running_var.detach().clone()
        with torch.no_grad(), bnkit.use_backend(backend):
            y_module = layer(x)
        ran_on = bnkit.last_backend()
        step = _textbook_step(index, x, layer, rm_before, rv_before, use_batch, updates, updates_done, momentum, eps)
        if updates:
            updates_done += 1
        step.output = y_module.tolist()
        textbook_y = torch.tensor([ch.output for ch in step.channels], dtype=torch.float64)
        step.bnkit_module_vs_reference = float(
            (_channel_values(y_module.to(torch.float64)) - textbook_y).abs().max()
        )
        record.append(step)

    notes = [NOTES["per_channel"]]
    if use_batch:
        notes += [NOTES["biased"]]
    if updates:
        notes += [NOTES["unbiased"], NOTES["cumulative"] if momentum is None else NOTES["momentum"]]
    if mode == "eval" and track_running_stats:
        notes.append(NOTES["eval"])
    if not track_running_stats:
        notes.append(NOTES["no_running"])
    notes.append(NOTES["eps"])
    if affine:
        notes.append(NOTES["affine"])
    return Explanation(
        layer=cls_name, num_features=c, eps=float(eps), momentum=momentum, affine=affine,
        track_running_stats=track_running_stats, mode=mode, dtype=str(first.dtype).replace("torch.", ""),
        input_shape=list(first.shape), count_per_channel=m, steps=record, notes=notes, backend=ran_on,
    )


def _textbook_step(index: int, x: Tensor, layer: nn.Module, rm_before: Tensor | None, rv_before: Tensor | None,
                   use_batch: bool, updates: bool, updates_done: int, momentum: float | None,
                   eps: float) -> Step:
    """The numbers of one step, from :mod:`bnkit.reference` (the spec), not from the module."""
    c = x.shape[1]
    m = ref.count_per_channel(x)
    mean = var = unbiased = None
    if m >= 1:
        mean, var = ref.batch_stats(x)
        unbiased = ref.unbiased_var(var, m) if m >= 2 else None
    sd = ref.stats_dtype(x.dtype)
    if use_batch:
        norm_mean, norm_var = mean, var
    else:
        norm_mean, norm_var = rm_before.to(sd), rv_before.to(sd)
    inv = ref.invstd(norm_var, eps)
    w = layer.weight.detach().to(sd) if layer.weight is not None else torch.ones(c, dtype=sd)
    b = layer.bias.detach().to(sd) if layer.bias is not None else torch.zeros(c, dtype=sd)
    xhat = ref.normalize(x, norm_mean, inv, None, None)
    y = ref.normalize(x, norm_mean, inv, w, b)
    factor: float | None = None
    rm_after, rv_after = rm_before, rv_before
    if updates:
        factor = momentum if momentum is not None else 1.0 / (updates_done + 1)
        rm_after, rv_after = ref.update_running_stats(rm_before, rv_before, mean, var, m, factor)
    values, xh, ys = _channel_values(x), _channel_values(xhat), _channel_values(y)
    channels = []
    for ch in range(c):
        channels.append(ChannelStep(
            channel=ch,
            values=_floats(values[ch]),
            mean=None if mean is None else float(mean[ch]),
            var_biased=None if var is None else float(var[ch]),
            var_unbiased=None if unbiased is None else float(unbiased[ch]),
            normalize_mean=float(norm_mean[ch]),
            normalize_var=float(norm_var[ch]),
            invstd=float(inv[ch]),
            weight=float(w[ch]),
            bias=float(b[ch]),
            normalized=_floats(xh[ch]),
            output=_floats(ys[ch]),
            running_mean_before=None if rm_before is None else float(rm_before[ch]),
            running_mean_after=None if rm_after is None else float(rm_after[ch]),
            running_var_before=None if rv_before is None else float(rv_before[ch]),
            running_var_after=None if rv_after is None else float(rv_after[ch]),
        ))
    return Step(index=index, normalize_with="batch" if use_batch else "running", updates_running_stats=updates,
                momentum=factor, input=x.tolist(), output=[], channels=channels, bnkit_module_vs_reference=0.0)


# --- the oracle ---------------------------------------------------------------------------


def compare_with_torch(explanation: Explanation) -> float:
    """Run ``torch.nn.BatchNorm*`` (the oracle) on the same calls; record the largest differences.

    This is the one place bnkit's explain runs torch's own batch norm: a comparison, not a
    computation. Each step gets ``step.torch`` = largest ``|bnkit - torch.nn|`` of the
    output (the explained textbook output and the bnkit module's), running_mean and
    running_var; returns (and stores) the largest of all.
    """
    e = explanation
    dtype = _DTYPES[e.dtype]
    layer = _make_layer(e.layer, e.num_features, e.eps, e.momentum, e.affine, e.track_running_stats, dtype, nn)
    first = e.steps[0].channels
    _init_layer(
        layer,
        [ch.weight for ch in first] if e.affine else None,
        [ch.bias for ch in first] if e.affine else None,
        [ch.running_mean_before for ch in first] if e.track_running_stats else None,
        [ch.running_var_before for ch in first] if e.track_running_stats else None,
    )
    layer.train(e.mode == "train")
    worst = 0.0
    for step in e.steps:
        x = torch.tensor(step.input, dtype=dtype)
        with torch.no_grad():
            y = layer(x)
        textbook = torch.tensor([ch.output for ch in step.channels], dtype=torch.float64)
        diffs = {
            "output": float((_channel_values(y.to(torch.float64)) - textbook).abs().max()),
            "bnkit_module_output": float((y.to(torch.float64) - torch.tensor(step.output, dtype=torch.float64))
                                         .abs().max()),
        }
        if layer.running_mean is not None:
            for name in ("running_mean", "running_var"):
                ours = torch.tensor([getattr(ch, f"{name}_after") for ch in step.channels], dtype=torch.float64)
                diffs[name] = float((getattr(layer, name).to(torch.float64) - ours).abs().max())
        step.torch = diffs
        worst = max(worst, *diffs.values())
    e.max_abs_diff_vs_torch = worst
    return worst
