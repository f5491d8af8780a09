"""Running statistics: the new values after a batch, and the one place they are written.

The update itself is :func:`bnkit.reference.update_running_stats`; the pure functions return
new running statistics, and :func:`write_running_stats` copies them into the buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad as _fwAD

from bnkit import autograd
from bnkit import reference as ref

__all__ = ["updated_running_stats", "write_running_stats"]


def updated_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | Tensor,
) -> tuple[Tensor | None, Tensor | None]:
    """New running statistics after a batch with ``(mean, biased var)`` over ``count`` values.

    Each one given is updated (:func:`bnkit.reference.update_running_stats`); one that is
    ``None`` stays ``None``. The batch statistics are detached: running statistics are
    buffers and carry no gradient.
    """
    if running_mean is None and running_var is None:
        return None, None
    if _fwAD._current_level >= 0:
        # buffers: their forward-mode tangents play no part in the update (torch's rule)
        running_mean, running_var = _primal(running_mean), _primal(running_var)
    if (
        type(momentum) is float
        and running_mean is not None
        and running_var is not None
        and running_mean.dtype == running_var.dtype == mean.dtype == var.dtype
        and running_mean.is_cpu
        and not (running_mean.requires_grad or running_var.requires_grad)
        and autograd._eager(running_mean)
    ):
        # The everyday case: reference.update_running_stats with its Python scalars as cached 0-d
        # tensors of the statistics dtype, which torch rounds to exactly as it rounds a Python
        # scalar, without the cost of wrapping a new scalar per op (several microseconds on a small
        # vector); the blend's dtype conversions are no-ops here.
        dt = mean.dtype
        scalar = autograd.cached_scalar
        take, keep = scalar(momentum, dt), scalar(1 - momentum, dt)
        batch_var = var.detach() * scalar(count / (count - 1), dt)  # reference.unbiased_var
        return (ref.blend_running(running_mean, mean.detach(), take, keep),
                ref.blend_running(running_var, batch_var, take, keep))
    rm = running_mean if running_mean is not None else mean.detach()
    rv = running_var if running_var is not None else var.detach()
    new_mean, new_var = ref.update_running_stats(rm, rv, mean.detach(), var.detach(), count, momentum)
    return (new_mean if running_mean is not None else None), (new_var if running_var is not None else None)


def _primal(t: Tensor | None) -> Tensor | None:
    # t without its forward-mode tangent (a view of the same memory); t itself when it has none
    if t is None:
        return None
    unpacked = _fwAD.unpack_dual(t)
    return t if unpacked.tangent is None else unpacked.primal


def write_running_stats(
    running_mean: Tensor | None, running_var: Tensor | None, new_mean: Tensor | None, new_var: Tensor | None
) -> None:
    """Copy new running statistics into their buffers: the one place bnkit mutates them."""
    if _fwAD._current_level >= 0 and not (new_mean is running_mean and new_var is running_var):
        # write the values only: a buffer's tangent stays as it was, as in torch
        running_mean, running_var = _primal(running_mean), _primal(running_var)
    if (
        running_mean is not None and running_var is not None and new_mean is not None and new_var is not None
        and not (running_mean.requires_grad or running_var.requires_grad
                 or new_mean.requires_grad or new_var.requires_grad)
        and autograd._eager(running_mean)
    ):
        # eager, and nothing here is tracked by autograd: copy without entering no_grad (the same writes)
        if new_mean is not running_mean:
            running_mean.copy_(new_mean)
        if new_var is not running_var:
            running_var.copy_(new_var)
        return
    with torch.no_grad():
        if running_mean is not None and new_mean is not None and new_mean is not running_mean:
            running_mean.copy_(new_mean)
        if running_var is not None and new_var is not None and new_var is not running_var:
            running_var.copy_(new_var)
