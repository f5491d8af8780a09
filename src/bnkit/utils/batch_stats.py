"""``bnkit.batch_stats``: say what normalizes and what updates, independent of train()/eval().

torch ties two decisions to one flag: ``model.train()`` means "normalize with the batch
statistics *and* update the running ones", ``model.eval()`` means "normalize with the
running statistics *and* leave them alone". Test-time adaptation (TENT) wants batch
statistics without touching the buffers; AdaBN re-estimates the buffers while dropout
stays off; some online settings normalize with the running statistics but keep folding
new batches into them. This context manager sets both switches on every batch-norm layer
of a model and restores them on exit::

    with bnkit.batch_stats(model, normalize_with="batch", update_running_stats=False):
        logits = model(x)      # TENT: batch statistics, buffers untouched, even in eval()

The switches are the per-module overrides read by :func:`bnkit.nn.modes.resolve_mode`.
torch's own ``BatchNorm1d/2d/3d`` layers are switched to bnkit's twins for the duration
of the block (the in-place class swap of :func:`bnkit.convert`: same parameter, buffer
and hook objects) and switched back on exit, also when the block raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.nn.batchnorm import _BatchNormForward
from bnkit.utils.convert import has_bnkit_twin, swap_to_bnkit, swap_to_torch

__all__ = ["batch_stats"]

_NORMALIZE_WITH = ("batch", "running")
_ATTRS = ("_bnkit_normalize_with", "_bnkit_update_running_stats")
_MISSING = object()


def _check_args(model: nn.Module, normalize_with: str | None, update_running_stats: bool | None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"batch_stats expects an nn.Module, got {type(model).__name__}")
    if normalize_with is not None and normalize_with not in _NORMALIZE_WITH:
        raise ValueError(f"normalize_with must be 'batch', 'running' or None, got {normalize_with!r}")
    if update_running_stats is not None and not isinstance(update_running_stats, bool):
        raise TypeError(
            f"update_running_stats must be True, False or None, got {type(update_running_stats).__name__} "
            f"{update_running_stats!r}"
        )


def uncontrollable_layers(model: nn.Module) -> list[str]:
    """The batch-norm layers of ``model`` that bnkit cannot steer, as ``"name (Class)"``: subclasses of
    torch's ``_BatchNorm`` that are neither bnkit's nor an exact torch class with a bnkit twin."""
    return [f"{name or '<model>'} ({type(module).__name__})" for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and not isinstance(module, _BatchNormForward)
            and not has_bnkit_twin(module)]


def check_controllable(model: nn.Module, tool: str) -> None:
    """Raise ``TypeError`` naming every layer of :func:`uncontrollable_layers`, before anything changes."""
    foreign = uncontrollable_layers(model)
    if foreign:
        raise TypeError(
            f"{tool} cannot control these batch-norm layers (no bnkit twin; register one with "
            f"bnkit.utils.convert.register_twin): {', '.join(foreign)}"
        )


def _take_control(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Every batch-norm layer of ``model``, and the torch layers swapped to bnkit to get there.

    Raises ``TypeError`` (before swapping anything) for a batch-norm layer bnkit cannot steer: a
    subclass of torch's ``_BatchNorm`` with no bnkit twin.
    """
    check_controllable(model, "batch_stats")
    layers: list[nn.Module] = []
    swapped: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            if swap_to_bnkit(module):
                swapped.append(module)
            layers.append(module)
    return layers, swapped


def _give_back(swapped: list[nn.Module]) -> None:
    for module in swapped:
        swap_to_torch(module)


@contextlib.contextmanager
def batch_stats(
    model: nn.Module, *, normalize_with: str | None, update_running_stats: bool | None
) -> Iterator[nn.Module]:
    """Set what every batch-norm layer of ``model`` normalizes with and whether it updates.

    Args:
        model: any module; every batch-norm layer in it (the model itself included) is set.
        normalize_with: ``"batch"`` (statistics of the current batch), ``"running"``
            (the running statistics; a layer without them uses the batch's, as torch does)
            or ``None`` (torch's rule: batch in train(), running in eval()).
        update_running_stats: ``True`` (fold each batch into the running statistics with
            the layer's momentum, also in eval()), ``False`` (never touch the buffers, also
            in train()) or ``None`` (torch's rule: update in train() when tracking).

    Both are keyword-only and required, so every call site states what it does. The
    layers' previous settings (including an enclosing ``batch_stats``) come back on exit,
    and torch layers are swapped back to their own class, also when the block raises.
    Yields ``model``. With ``update_running_stats=True`` and ``normalize_with="running"``,
    a layer normalizes with the running statistics as they were *before* the batch, then
    folds the batch in. A layer with ``momentum=None`` uses the cumulative average
    ``1 / num_batches_tracked`` as in training.
    """
    _check_args(model, normalize_with, update_running_stats)
    layers, swapped = _take_control(model)
    saved = [(module, [module.__dict__.get(a, _MISSING) for a in _ATTRS]) for module in layers]
    try:
        for module in layers:
            module._bnkit_normalize_with = normalize_with
            module._bnkit_update_running_stats = update_running_stats
        yield model
    finally:
        for module, values in saved:
            for attr, value in zip(_ATTRS, values, strict=True):
                if value is _MISSING:
                    module.__dict__.pop(attr, None)
                else:
                    setattr(module, attr, value)
        _give_back(swapped)
