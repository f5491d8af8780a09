"""The contract every backend implements: four per-channel primitives.

Autograd composes batch norm from these (see ``bnkit.autograd``); each backend may fuse
internally but must return exactly what is described here. Shapes: ``x``/``dy`` are
(N, C, *) tensors in any memory format the backend accepts (``supports``); every
per-channel vector has shape (C,) and the statistics dtype of
:func:`bnkit.reference.stats_dtype`. Outputs keep the input's dtype and memory format.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


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
