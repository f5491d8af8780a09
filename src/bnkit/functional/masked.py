r"""Masked batch norm: statistics over the unmasked elements only.

Padded sequences and ragged images carry positions that are not data. A boolean
``mask`` says which positions are data (``True``) and which are padding (``False``);
only the data feeds the statistics. Symbols as in :mod:`bnkit.reference`, plus::

    m        mask broadcast to (N, 1, *spatial): 1 where an element counts, 0 where not
    n        number of unmasked elements per channel = sum(m)   (the same for every channel,
             because the mask has no channel dim)
    mean     sum(m * x) / n
    var      sum(m * (x - mean)**2) / n          (biased; normalizes the output)
    running  (1 - momentum) * running + momentum * var * n / (n - 1)   (unbiased with n)

Alignment of the mask (exact, no guessing): the mask has one dim per input dim *except
the channel dim*, in the input's order. For ``(N, C, L)`` it is ``(N, L)``; for
``(N, C, H, W)`` it is ``(N, H, W)``; for ``(N, L, C)`` with ``channel_dim=-1`` it is
``(N, L)``. Each mask dim equals the input's size or is 1 (broadcast), so ``(N, 1)``
masks whole samples and ``(1, H, W)`` shares one spatial mask across the batch. A mask
with fewer dims is rejected rather than right-aligned by broadcasting: a per-sample
``(N,)`` mask would otherwise silently line up with the *last* spatial dim.

Output: *every* position, masked or not, is normalized with the same statistics
``y = w * (x - mean) * invstd + b``; padding comes out transformed like data, and the
caller discards it (or not). In eval mode the mask changes nothing (the running
statistics normalize everything) but is still validated.

Gradients (autograd through the plain ops below; derived in ``docs/beyond.md``): with
``U`` the unmasked set, ``xhat = (x - mean) * invstd`` at every position,
``c1 = sum_all(dy) / n`` and ``c2 = sum_all(dy * xhat) / n`` (sums over *all* positions,
because masked outputs also depend on the statistics)::

    dx_i = w * invstd * (dy_i - c1 - xhat_i * c2)     for i in U
    dx_i = w * invstd * dy_i                          for i not in U (they do not feed the stats)
    dw = sum_all(dy * xhat),  db = sum_all(dy)

When the loss ignores the padding (``dy = 0`` there), this is exactly plain batch norm's
gradient on the unmasked elements alone. Values at masked positions never reach the
statistics (they are selected away with ``torch.where``, so NaN padding is harmless to
them), but they are normalized like the rest: non-finite padding gives non-finite outputs
there and, through ``0 * inf`` in ``dw``, can poison gradients; pad with finite values.

Numerics: the reference's policy (two passes; float64 accumulation on CPU/CUDA;
statistics in :func:`bnkit.reference.stats_dtype`). No fast kernel: this is plain torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnkit import autograd
from bnkit import reference as ref
from bnkit.functional.running import updated_running_stats

__all__ = ["check_mask", "masked_batch_norm_pure", "masked_batch_stats"]


def check_mask(x: Tensor, mask: Tensor) -> Tensor:
    """Validate ``mask`` against ``x`` (channels in dim 1); return it shaped (N, 1, *spatial).

    The returned view broadcasts against ``x``; nothing is copied.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of dtype torch.bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = counts towards the statistics), got {mask.dtype}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but the input is on {x.device}")
    target = (x.shape[0], *x.shape[2:])
    if mask.dim() != len(target) or any(m not in (1, t) for m, t in zip(mask.shape, target, strict=False)):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match the input of shape {tuple(x.shape)} "
            f"(channels in dim 1 here): expected the input's shape without the channel dim, {target}, "
            "with any dim allowed to be 1"
        )
    return mask.unsqueeze(1)


def masked_count(x: Tensor, m: Tensor) -> int:
    """n: unmasked elements per channel (the mask ``m`` of :func:`check_mask`, broadcast)."""
    return int(m.expand(x.shape[0], 1, *x.shape[2:]).sum().item())


def masked_batch_stats(x: Tensor, m: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Per-channel ``mean`` and *biased* ``var`` over the elements where ``m`` is True.

    Two passes in the reference's accumulation dtype; masked elements are *selected away*
    (``torch.where``), not multiplied by 0, so NaN/inf padding cannot leak in.
    Differentiable by autograd. Returns tensors of shape (C,) in the statistics dtype.
    """
    dims = ref.reduction_dims(x)
    shape = ref.channel_shape(x)
    xa = x.to(ref._accumulation_dtype(x))
    zero = xa.new_zeros(())
    mean = torch.where(m, xa, zero).sum(dims) / n
    var = torch.where(m, xa - mean.view(shape), zero).square().sum(dims) / n
    out = ref.stats_dtype(x.dtype)
    return mean.to(out), var.to(out)


def masked_batch_norm_pure(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    mask: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Batch norm whose statistics see only the unmasked elements (``x`` has channels in dim 1).

    Returns ``(y, new_running_mean, new_running_var)`` like
    :func:`bnkit.functional.batch_norm_pure`; nothing is mutated. Raises ``ValueError``
    in training when fewer than 2 elements per channel are unmasked.
    """
    m = check_mask(x, mask)
    if not training:
        if x.numel() == 0:
            return ref.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
        return autograd.evaluate(x, running_mean, running_var, weight, bias, eps), running_mean, running_var
    if x.shape[1] == 0:
        return ref.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    n = masked_count(x, m)
    if n < 2:
        raise ValueError(
            f"Expected more than 1 unmasked value per channel when training, got {n} "
            f"(input size {tuple(x.shape)} with channels in dim 1, mask size {tuple(mask.shape)})"
        )
    mean, var = masked_batch_stats(x, m, n)
    y = ref.normalize(x, mean, ref.invstd(var, eps), weight, bias)
    return (y, *updated_running_stats(running_mean, running_var, mean, var, n, momentum))
