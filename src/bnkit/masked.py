"""Masked batch norm: statistics over the unmasked elements only (see issue: masks)."""

from __future__ import annotations

from torch import Tensor


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
    raise NotImplementedError("mask= is not implemented yet")
