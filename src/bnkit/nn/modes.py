"""Which statistics a batch-norm layer normalizes with, and whether it updates its buffers.

torch derives both from ``training`` and ``track_running_stats`` (see the table in
:mod:`bnkit.nn.batchnorm`). A bnkit layer may carry two overrides, set by
``bnkit.batch_stats(...)``: ``_bnkit_normalize_with`` ("batch" | "running") and
``_bnkit_update_running_stats`` (bool); ``None`` means torch's rule.
"""

from __future__ import annotations

from torch import nn

__all__ = ["resolve_mode"]


def resolve_mode(module: nn.Module) -> tuple[bool, bool]:
    """``(use_batch_stats, update_running_stats)`` for ``module`` right now."""
    has_running = module.running_mean is not None and module.running_var is not None
    use_batch = module.training or not has_running
    update = module.training and module.track_running_stats and has_running
    normalize_with = getattr(module, "_bnkit_normalize_with", None)
    if normalize_with is not None:
        use_batch = normalize_with == "batch" or not has_running
    update_override = getattr(module, "_bnkit_update_running_stats", None)
    if update_override is not None:
        update = bool(update_override) and has_running
    return use_batch, update
