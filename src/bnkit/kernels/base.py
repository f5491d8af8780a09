"""The contract every backend implements: four per-channel primitives.

Autograd composes batch norm from these (see ``bnkit.autograd``); each backend may fuse
internally but must return exactly what is described here. Shapes: ``x``/``dy`` are
(N, C, *) tensors in any memory format the backend accepts (``supports``); every
per-channel vector has shape (C,) and the statistics dtype of
:func:`bnkit.reference.stats_dtype`. Outputs keep the input's dtype and memory format.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from bnkit import reference as ref


def is_running_vector(t: object, c: int, dtype: torch.dtype) -> bool:
    """Whether ``t`` is a running-statistics vector a backend may update through its raw memory: a
    contiguous CPU tensor of shape ``(c,)`` and ``dtype`` that needs no gradient."""
    return (
        isinstance(t, Tensor)
        and t.dtype is dtype
        and t.is_cpu
        and t.layout is torch.strided
        and t.shape == (c,)
        and t.is_contiguous()
        and not t.requires_grad
    )


class Backend(Protocol):
    name: str

    def supports(self, x: Tensor) -> bool:
        """Whether this backend can run on ``x`` (device, dtype, layout) as it is."""
        ...

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, var)``: batch statistics (var biased) and ``y = (x-mean)*invstd*w + b``."""
        ...

    def forward_eval(self, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``y = (x - mean[c]) * scale[c] + shift[c]`` in one pass."""
        ...

    def backward_reduce(self, dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        """``(sum(dy), sum(dy * (x - mean)))`` per channel, in one pass."""
        ...

    def backward_input(
        self, dy: Tensor, x: Tensor, mean: Tensor, a: Tensor, k: Tensor, c: Tensor
    ) -> Tensor:
        """``dx = a[c] * dy + k[c] * (x - mean[c]) + c[c]`` in one pass."""
        ...


# --- optional fused methods ---------------------------------------------------------------
#
# A backend MAY also define ``backward_train`` and ``backward_eval`` with the signatures below
# (e.g. to reduce and write ``dx`` while a channel is still in cache). The functions here are
# THE definition of what they return, composed from the four primitives; autograd calls them
# for a backend that lacks the fused method, so every backend gives the same results.


def backward_train(
    backend: Backend, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, sum_dy, sum_dy_xhat)`` of the training backward through ``backend``.

    ``dx = w*invstd * (dy - sum_dy/M - xhat*sum_dy_xhat/M)`` with ``xhat = (x - mean)*invstd``
    and ``M`` values per channel; ``dy`` has the layout of ``x``. Uses ``backend.backward_train``
    when the backend has it, else one reduction pass and one elementwise pass.
    """
    fused = getattr(backend, "backward_train", None)
    if fused is not None:
        return fused(dy, x, mean, invstd, weight)
    sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, mean)
    sum_dy_xhat = sum_dy_xmu * invstd
    m = ref.count_per_channel(x)
    a = invstd if weight is None else invstd * weight.to(invstd.dtype)
    k = -a * invstd * (sum_dy_xhat / m)
    c = -a * (sum_dy / m)
    return backend.backward_input(dy, x, mean, a, k, c), sum_dy, sum_dy_xhat


def backward_eval(
    backend: Backend, dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, sum_dy, sum_dy_xmu)`` of the eval backward: ``dx = scale[c] * dy`` plus both reductions.

    (``invstd`` is part of the signature for backends that scale inside; the result does not
    use it.) Uses ``backend.backward_eval`` when present, else two passes.
    """
    fused = getattr(backend, "backward_eval", None)
    if fused is not None:
        return fused(dy, x, mean, scale, invstd)
    zeros = torch.zeros_like(scale)
    dx = backend.forward_eval(dy, zeros, scale, zeros)
    sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, mean)
    return dx, sum_dy, sum_dy_xmu
