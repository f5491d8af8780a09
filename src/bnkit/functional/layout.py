"""Where the channels are: moving them to dim 1 and back, and the output's memory format.

Every functional batch norm computes with its channels in dim 1; ``channel_dim`` says where the
caller keeps them, and the output comes back in the memory format torch's batch norm gives.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_torch_layout", "from_channels_first", "to_channels_first"]


def _check_channel_dim(input: Tensor, channel_dim: int) -> int:
    """``channel_dim`` as a non-negative dim of ``input``; torch's IndexError when out of range."""
    if isinstance(channel_dim, bool) or not hasattr(type(channel_dim), "__index__"):
        raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
    channel_dim = channel_dim.__index__()
    ndim = input.dim()
    if not -ndim <= channel_dim < ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], "
                         f"but got {channel_dim}): channel_dim for an input of shape {tuple(input.shape)}")
    return channel_dim % ndim


def to_channels_first(input: Tensor, channel_dim: int) -> tuple[Tensor, int]:
    """``input`` with its channels in dim 1 (a view, never a copy), and ``channel_dim`` checked.

    (N, L, C) becomes an (N, C, L) view of channels-last memory, the fast kernels' layout.
    """
    if channel_dim == 1 and type(channel_dim) is int:
        return input, 1
    channel_dim = _check_channel_dim(input, channel_dim)
    return input.movedim(channel_dim, 1), channel_dim


def from_channels_first(y: Tensor, channel_dim: int) -> Tensor:
    """Undo :func:`to_channels_first` on an output."""
    return y if channel_dim == 1 else y.movedim(1, channel_dim)


# torch's batch norm allocates its output in the input's suggested memory format: channels-last for a 4-d
# (5-d) channels-last input, contiguous for everything else. bnkit's kernels write the input's own layout,
# which differs for an (N, C, L) view of (N, L, C) memory, a transposed (N, C) input and other permuted
# strides, where code written for torch may then `.view()` the output.
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def as_torch_layout(y: Tensor) -> Tensor:
    """``y`` in the memory format torch's batch norm gives its output (a copy only when ``y``'s differs)."""
    if y.is_contiguous():
        return y
    fmt = _CHANNELS_LAST.get(y.dim())
    if fmt is not None and y.is_contiguous(memory_format=fmt):
        return y
    return y.contiguous()
