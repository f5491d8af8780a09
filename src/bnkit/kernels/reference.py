"""The reference backend: the four primitives in plain torch ops (any device, any dtype)."""

from __future__ import annotations

import torch
from torch import Tensor

from bnkit import reference as ref


class ReferenceBackend:
    name = "reference"

    def supports(self, x: Tensor) -> bool:
        return x.is_floating_point()

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean, var = ref.batch_stats(x)
        y = ref.normalize(x, mean, ref.invstd(var, eps), weight, bias)
        return y, mean, var

    def forward_eval(self, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        shape = ref.channel_shape(x)
        dt = scale.dtype
        y = (x.to(dt) - mean.to(dt).view(shape)) * scale.view(shape) + shift.to(dt).view(shape)
        return y.to(x.dtype)

    def backward_reduce(self, dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        dims = ref.reduction_dims(x)
        dt = ref.stats_dtype(x.dtype)
        acc = torch.float64 if x.device.type in ("cpu", "cuda") else dt
        dya = dy.to(acc)
        xmu = x.to(acc) - mean.to(acc).view(ref.channel_shape(x))
        return dya.sum(dims).to(dt), (dya * xmu).sum(dims).to(dt)

    def backward_input(
        self, dy: Tensor, x: Tensor, mean: Tensor, a: Tensor, k: Tensor, c: Tensor
    ) -> Tensor:
        shape = ref.channel_shape(x)
        dt = a.dtype
        dx = a.view(shape) * dy.to(dt) + k.view(shape) * (x.to(dt) - mean.view(shape)) + c.view(shape)
        return dx.to(x.dtype)
