r"""``bnkit.recalibrate``: recompute running statistics exactly over a data set (PreciseBN).

Running statistics are an exponential moving average of per-batch statistics taken while
the weights were still changing; they can be stale or simply wrong for the weights a
model ends up with. ``recalibrate`` replaces them with the statistics of *all* the
activations each layer sees over ``data``, as if the data were one batch:

* ``running_mean[c]`` = mean of every element of channel ``c`` seen, over all batches;
* ``running_var[c]``  = ``M2[c] / (count - 1)``: the *unbiased* variance over every element
  (torch's convention for ``running_var``), where ``M2`` is the sum of squared deviations.

Per batch and channel the layer's input gives ``(n, mean, M2)`` (two-pass, float64), and
the batches are merged with Chan's parallel formula (:func:`bnkit.reference.merge_stats`),
so batches of different sizes are weighted by their element counts: this is not an
average of per-batch means and variances (which is what a momentum of ``1/k`` gives).
For a bnkit layer called with ``mask=`` only the unmasked elements count.

While the data flows, every batch-norm layer normalizes with the statistics of the
current batch, exactly as in training (the activations a deeper layer sees depend on
that), and does not touch its buffers; the statistics come from hooks on each layer's
input. Modules other than batch norm keep their mode: call ``model.train()`` first if
you want dropout active as in training, leave the model in eval mode for deterministic
activations. Weights are never touched.

Afterwards each layer's ``training``, ``track_running_stats`` and bnkit's mode overrides
are restored and the hooks removed, also when ``data`` or the model raises (then the
running statistics are left exactly as they were). ``num_batches_tracked`` is set to the
number of batches that reached the layer, as ``torch.optim.swa_utils.update_bn`` does, so
a layer with ``momentum=None`` (cumulative average) continues from the recalibrated
values with the right weight. A layer that saw no data keeps its statistics (a warning
names it).

Use cases:

* after SWA / EMA / any weight averaging: the averaged weights never produced the
  running statistics they carry;
* adapting to a new data domain without labels (AdaBN, Li et al. 2016): recalibrate on
  target-domain inputs;
* after pruning, quantization-aware edits or fine-tuning with frozen BN: the activation
  statistics moved;
* replacing the noisy EMA by exact statistics before evaluation (PreciseBN, Wu & Johnson 2021).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bnkit import reference as ref
from bnkit.functional.masked import check_mask, masked_count

__all__ = [
    "StatisticsAccumulator",
    "batch_statistics_pass",
    "bn_layers",
    "check_run_args",
    "default_forward",
    "recalibrate",
    "run_batches",
]

# Attributes a bnkit layer may carry to override torch's mode rule (see bnkit.nn.modes).
_MODE_OVERRIDES = ("_bnkit_normalize_with", "_bnkit_update_running_stats")


class StatisticsAccumulator:
    """Per-channel (count, mean, M2) of every element a layer sees, in float64.

    A forward pre-hook (``register_forward_pre_hook(acc, with_kwargs=True)``): each call
    takes the statistics of one batch (two-pass) and merges them into the running total
    with Chan's formula. Subclasses that want each batch's statistics too override
    :meth:`add`.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.batches = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0].detach()
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        channel_dim = getattr(module, "channel_dim", 1)
        if channel_dim != 1:
            x = x.movedim(channel_dim % x.dim(), 1)
        if x.dim() < 2 or x.shape[1] == 0:
            return
        dims = ref.reduction_dims(x)
        x64 = x.to(torch.float64)
        if mask is None:
            n = ref.count_per_channel(x)
            if n == 0:
                return
            mean = x64.mean(dims)
            m2 = (x64 - mean.view(ref.channel_shape(x))).square().sum(dims)
        else:
            # bnkit's masked layers: only the unmasked elements count (see bnkit.functional.masked).
            m = check_mask(x, mask)
            n = masked_count(x, m)
            if n == 0:
                return
            zero = x64.new_zeros(())
            mean = torch.where(m, x64, zero).sum(dims) / n
            m2 = torch.where(m, x64 - mean.view(ref.channel_shape(x)), zero).square().sum(dims)
        self.add(n, mean, m2, x.shape[0])

    def add(self, n: int, mean: Tensor, m2: Tensor, samples: int) -> None:
        """Merge one batch: ``n`` elements per channel (from ``samples`` samples), its mean and M2."""
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
        else:
            self.count, self.mean, self.m2 = ref.merge_stats(self.count, self.mean, self.m2, n, mean, m2)
        self.batches += 1


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Batch-norm layers (torch's, bnkit's, SyncBatchNorm) that have running statistics."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]


def _move(obj: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        moved = [_move(v, device) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for an input tensor, ``model(batch[0])`` for an ``(input, target, ...)``
    sequence, ``model(**batch)`` for a dict."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("got an empty batch (an empty list/tuple): nothing to pass to the model")
        return model(batch[0])
    return model(batch)


def check_run_args(tool: str, model: Any, num_batches: Any, forward: Any) -> None:
    """The argument checks shared by the tools that run a model over ``data``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{tool} expects an nn.Module, got {type(model).__name__}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")


@contextlib.contextmanager
def batch_statistics_pass(
    layers: list[tuple[str, nn.Module]],
    accumulator: Callable[[nn.Module], StatisticsAccumulator] = StatisticsAccumulator,
) -> Iterator[list[StatisticsAccumulator]]:
    """While inside, each layer normalizes with the current batch's statistics and writes nothing.

    Yields one accumulator per layer (hooked on its input). On exit, also by an exception,
    every layer's ``training``, ``track_running_stats`` and bnkit's mode overrides are
    restored and the hooks removed.
    """
    saved = []
    handles = []
    accumulators = []
    try:
        for _, m in layers:
            overrides = {a: m.__dict__[a] for a in _MODE_OVERRIDES if a in m.__dict__}
            saved.append((m, m.training, m.track_running_stats, overrides))
            # training + track_running_stats=False: normalize with batch statistics, write nothing
            # (torch's rule, and bnkit's resolve_mode); bnkit's overrides are lifted for the run.
            m.training = True
            m.track_running_stats = False
            for a in overrides:
                setattr(m, a, None)
            acc = accumulator(m)
            accumulators.append(acc)
            handles.append(m.register_forward_pre_hook(acc, with_kwargs=True))
        yield accumulators
    finally:
        for h in handles:
            h.remove()
        for m, training, track, overrides in saved:
            m.training = training
            m.track_running_stats = track
            for a, v in overrides.items():
                setattr(m, a, v)


def run_batches(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None,
    progress: bool,
    forward: Callable[[nn.Module, Any], Any] | None,
    device: torch.device | str | None,
    desc: str,
    on_output: Callable[[Any, Any], None] | None = None,
) -> int:
    """Run ``model`` over (at most ``num_batches`` of) ``data``; returns the number of batches.

    A batch is passed as :func:`recalibrate` documents (or through ``forward``), after
    moving its tensors to ``device``. ``on_output(batch, output)`` sees each result.
    """
    run = forward or default_forward
    total = len(data) if hasattr(data, "__len__") else None
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    batches = data if num_batches is None else itertools.islice(data, num_batches)
    seen = 0
    from tqdm.auto import tqdm

    for batch in tqdm(batches, total=total, disable=not progress, desc=desc, unit="batch"):
        moved = _move(batch, device)
        output = run(model, moved)
        if on_output is not None:
            on_output(moved, output)
        seen += 1
    return seen


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Set every batch-norm layer's running statistics to the exact statistics over ``data``.

    ``data`` yields batches: an input tensor, an ``(input, target, ...)`` tuple/list (the
    first item is the input), or a dict passed as keyword arguments (``model(**batch)``).
    ``forward(model, batch)`` replaces that rule for anything else. ``device`` moves the
    tensors of each batch there first. ``num_batches`` stops after that many batches
    (``None``: all of ``data``). ``progress`` shows a tqdm bar.

    Returns ``model`` (changed in place: its running statistics and
    ``num_batches_tracked``; nothing else). See the module docstring for the exact
    definition and the use cases.
    """
    check_run_args("recalibrate", model, num_batches, forward)
    layers = bn_layers(model)
    if not layers:
        raise ValueError("recalibrate: the model has no batch-norm layer with running statistics")
    with batch_statistics_pass(layers) as accumulators:
        seen = run_batches(model, data, num_batches, progress, forward, device, "recalibrate")

    if seen == 0:
        raise ValueError("recalibrate: data yielded no batches; running statistics were left unchanged")
    for (name, _), acc in zip(layers, accumulators, strict=True):
        if acc.mean is not None and acc.count < 2:
            raise ValueError(f"recalibrate: layer {name!r} saw a single value per channel; the unbiased "
                             "variance needs at least 2 (running statistics were left unchanged)")
    for (name, m), acc in zip(layers, accumulators, strict=True):
        if acc.mean is None:
            warnings.warn(f"recalibrate: batch-norm layer {name or type(m).__name__!r} saw no data; "
                          "its running statistics were left unchanged", RuntimeWarning, stacklevel=2)
            continue
        m.running_mean.copy_(acc.mean.to(m.running_mean.dtype))
        m.running_var.copy_((acc.m2 / (acc.count - 1)).to(m.running_var.dtype))
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(acc.batches)
    return model
