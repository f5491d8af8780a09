"""``FrozenBatchNorm1d/2d/3d``: batch norm with fixed statistics and affine (torchvision/detectron2).

``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers (``state_dict``
keys as torchvision's ``FrozenBatchNorm2d``); the forward is batch norm's eval mode in
every mode, ``y = w * (x - running_mean) / sqrt(running_var + eps) + b``, and nothing is
ever updated. A ``num_batches_tracked`` entry in a loaded ``state_dict`` (from a regular
batch norm) is ignored, as torchvision does. Layers made by :func:`bnkit.freeze` may keep
``weight``/``bias`` as Parameters (``affine_trainable=True``) and an activation (frozen
``BatchNormAct``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnkit.functional import frozen_batch_norm
from bnkit.nn.tracing import fx_leaf

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _FrozenBatchNorm(nn.Module):
    _input_dims: tuple[int, ...] = (4,)

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._input_dims:
            dims = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(f"expected {dims} input (got {input.dim()}D input)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        if (node := fx_leaf(self, input)) is not None:
            return node
        self._check_input_dim(input)
        return frozen_batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
            activation=getattr(self, "activation", "identity"),
            activation_param=getattr(self, "activation_param", 0.01),
            channel_dim=getattr(self, "channel_dim", 1),
        )

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        activation = getattr(self, "activation", "identity")
        if activation != "identity":
            text += f", activation={activation!r}"
        return text


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm for (N, C) or (N, C, L) inputs."""

    _input_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm for (N, C, H, W) inputs (torchvision's ``FrozenBatchNorm2d``)."""

    _input_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm for (N, C, D, H, W) inputs."""

    _input_dims = (5,)
