r"""Batch norm over ``torch.distributed``: exact global statistics, one collective per direction.

This is the autograd layer of :class:`bnkit.nn.SyncBatchNorm` (it sits beside
:mod:`bnkit.autograd` and imports only :mod:`bnkit.reference` and :mod:`bnkit.kernels`).
Symbols are those of :mod:`bnkit.reference` and ``docs/math.md``; ``r`` indexes the
processes of the group and ``n = sum_r n_r`` is the global count per channel.

Forward (one ``all_gather`` of a stacked per-channel tensor)::

    each process:   n_r, mean_r, M2_r = n_r * var_r     (backend.forward_train on the local batch)
    all_gather:     [n_hi, n_lo, mean_r[0..C), M2_r[0..C)]  from every process
    every process:  n    = sum_r n_r
                    mean = sum_r n_r * mean_r / n
                    M2   = sum_r M2_r + sum_r n_r * (mean_r - mean)**2
                    var  = M2 / n                       (biased; running_var gets M2 / (n - 1))
    y = (x - mean) * invstd * w + b                     (backend.forward_eval)

The combination is Chan's parallel formula (:func:`bnkit.reference.merge_stats`) applied to
all processes at once, so uneven batches and empty ones (``n_r = 0``) are exact; it never
averages per-process means, and never forms ``E[x^2] - E[x]^2``. Every process merges the
same gathered tensor in the same order, so the statistics (and thus the running
statistics) are bitwise identical on every process. Counts travel as two floats
(``n = n_hi * 2**24 + n_lo``) so they stay exact in float32.

Backward (one ``all_reduce`` of ``cat([sum_dy, sum_dy_xhat])``), with the global sums::

    c1 = sum(dy) / n          c2 = sum(dy * xhat) / n         (summed over all processes)
    dx = w * invstd * (dy - c1 - xhat * c2)                    (backend.backward_input)
    dw = sum(dy * xhat),  db = sum(dy)                          (LOCAL sums)

The parameter gradients are the local sums, as torch's ``SyncBatchNorm`` returns them: the
data-parallel wrapper (DDP) sums them over processes like every other parameter gradient.
The all_reduce is skipped when no input gradient is needed (as torch does).

Bounded waits: every collective runs under the process group's timeout; a failure (a peer
exited, or did not arrive in time) is re-raised as :class:`SyncBatchNormError` naming the
layer and the collective. With NCCL the watchdog enforces the timeout
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default) by tearing the process down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from bnkit import reference as ref
from bnkit.autograd import _like
from bnkit.kernels import backend_for

__all__ = [
    "SyncBatchNormError",
    "gather_global_stats",
    "merge_stats_many",
    "sync_batch_norm",
    "sync_group",
]

# Counts travel as (hi, lo) with n = hi * _COUNT_SPLIT + lo: both parts are < 2**24, exact in float32.
_COUNT_SPLIT = 2**24


class SyncBatchNormError(RuntimeError):
    """A collective of a synchronized batch norm failed (a peer exited or timed out)."""


def sync_group(process_group: Any | None) -> Any | None:
    """The group to synchronize over, or ``None`` when there is nothing to synchronize.

    ``None`` when ``torch.distributed`` is unavailable or not initialized, when the group
    has one process, or when this process is not a member of ``process_group``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:  # -1 for a non-member
        return None
    return group


def _acc_dtype(t: Tensor) -> torch.dtype:
    # float64 where the device has it (the numerics policy of bnkit.reference).
    return torch.float64 if t.device.type in ("cpu", "cuda") else t.dtype


def merge_stats_many(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's formula over K disjoint sets at once: (counts (K,), means (K, C), M2s (K, C)).

    Equal to folding :func:`bnkit.reference.merge_stats` over the K sets (tested), in one
    vectorized step: ``mean = sum_k n_k mean_k / n`` and
    ``M2 = sum_k M2_k + sum_k n_k (mean_k - mean)**2``. Sets with ``n_k = 0`` contribute
    nothing; when every set is empty the result is ``(0, 0, 0)``.
    """
    n = counts.sum()
    w = counts.unsqueeze(1)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    mean = (w * means).sum(0) / safe_n
    m2 = m2s.sum(0) + (w * (means - mean).square()).sum(0)
    return n, mean, m2


def _run_collective(where: str, what: str, group: Any, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as exc:  # gloo/nccl raise RuntimeError or DistBackendError; wrap with context
        size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        raise SyncBatchNormError(
            f"{where}: the {what} failed on rank {rank} of a process group of {size} (global rank {dist.get_rank()}) "
            f"(a process exited, or did not reach this layer within the group's timeout): {exc}"
        ) from exc


def gather_global_stats(
    mean: Tensor, var: Tensor, count: int, group: Any, where: str = "SyncBatchNorm"
) -> tuple[Tensor, Tensor, int]:
    """Global ``(mean, var, n)`` from this process's ``(mean, var, count)``: one all_gather.

    ``mean``/``var`` are this process's per-channel statistics (var biased; ignored when
    ``count`` is 0). Returns the statistics of the union of every process's batch, in the
    dtype of ``mean``, and the global count ``n`` as an int.
    """
    c = mean.shape[0]
    head = torch.tensor([count // _COUNT_SPLIT, count % _COUNT_SPLIT], dtype=mean.dtype, device=mean.device)
    if count > 0:
        local = torch.cat([head, mean, var * count])
    else:  # an empty batch sends zeros: its weight n_r = 0 removes it from the merge
        local = torch.cat([head, mean.new_zeros((2 * c,))])
    size = dist.get_world_size(group)
    gathered = mean.new_empty((size, 2 + 2 * c))
    what = "forward all_gather of (count, mean, M2)"
    if mean.device.type == "cpu":
        # gloo (any torch version) takes a list of outputs; views of one buffer avoid a copy.
        _run_collective(where, what, group, lambda: dist.all_gather(list(gathered.unbind(0)), local, group=group))
    else:
        # NCCL & co.: one flat output buffer (all_gather_single replaces all_gather_into_tensor in torch >= 2.13).
        gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        _run_collective(where, what, group, lambda: gather_flat(gathered.view(-1), local, group=group))
    acc = gathered.to(_acc_dtype(gathered))
    counts = acc[:, 0] * _COUNT_SPLIT + acc[:, 1]
    n, g_mean, g_m2 = merge_stats_many(counts, acc[:, 2 : 2 + c], acc[:, 2 + c :])
    n_int = int(n.item())
    g_var = g_m2 / max(n_int, 1)
    return g_mean.to(mean.dtype), g_var.to(mean.dtype), n_int


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = (x - mean) * invstd * w + b`` with global (mean, invstd) and the global backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, inv, count, group, where):
        scale = inv if weight is None else inv * weight.to(inv.dtype)
        shift = torch.zeros_like(scale) if bias is None else bias.to(inv.dtype)
        y = backend_for(x).forward_eval(x, mean, scale, shift) if x.numel() else torch.empty_like(x)
        ctx.save_for_backward(x, weight, mean, inv)
        ctx.count = count
        ctx.group = group
        ctx.where = where
        ctx.param_dtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, inv = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        local = x.numel() > 0
        if local:
            dy = _like(dy, x)
            backend = backend_for(x)
            sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, mean)
            sum_dy_xhat = sum_dy_xmu * inv
        else:
            sum_dy, sum_dy_xhat = torch.zeros_like(mean), torch.zeros_like(mean)
        dx = None
        if need_x:
            both = torch.cat([sum_dy, sum_dy_xhat])
            _run_collective(ctx.where, "backward all_reduce of cat([sum_dy, sum_dy_xhat])", ctx.group,
                            lambda: dist.all_reduce(both, group=ctx.group))
            g_sum_dy, g_sum_dy_xhat = both.chunk(2)
            if local:
                n = ctx.count
                a = inv if weight is None else inv * weight.to(inv.dtype)
                k = -a * inv * (g_sum_dy_xhat / n)
                c = -a * (g_sum_dy / n)
                dx = backend.backward_input(dy, x, mean, a, k, c)
            else:
                dx = torch.zeros_like(x)
        dw = sum_dy_xhat.to(ctx.param_dtype) if need_w else None
        db = sum_dy.to(ctx.param_dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None


def sync_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    group: Any,
    where: str = "SyncBatchNorm",
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Training-mode batch norm of ``x`` (N, C, *) with statistics over every process of ``group``.

    Returns ``(y, mean, var, n)``: the output (differentiable with respect to ``x``,
    ``weight`` and ``bias``), the global per-channel mean and *biased* variance (detached,
    statistics dtype) and the global count per channel. Raises ``ValueError`` (on every
    process alike) when the global batch has a single value per channel, as torch does.
    """
    sd = ref.stats_dtype(x.dtype)
    count = ref.count_per_channel(x)
    if count > 0:
        _y, mean_l, var_l = backend_for(x).forward_train(x.detach(), None, None, eps)
    else:
        mean_l = var_l = x.new_zeros((x.shape[1],), dtype=sd)
    mean, var, n = gather_global_stats(mean_l.to(sd), var_l.to(sd), count, group, where)
    if n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got a global batch of {n} "
                         f"value per channel over the process group ({where})")
    inv = ref.invstd(var, eps)
    y = _SyncBatchNormFunction.apply(x, weight, bias, mean, inv, n, group, where)
    return y, mean, var, n
