"""``BatchNormAct1d/2d/3d``: batch norm fused with an activation, optionally memory-saving.

Each class subclasses its ``torch.nn.BatchNorm*`` twin (and bnkit's forward), so a plain
batch norm's ``state_dict`` loads unchanged and ``isinstance(m, _BatchNorm)`` holds; only
the pure function behind the forward differs (:func:`bnkit.functional.batch_norm_act_pure`).
The math, the memory-saving mode and its limits are described in :mod:`bnkit.fused`.
"""

from __future__ import annotations

from torch import Tensor, nn

from bnkit.functional import batch_norm_act_pure
from bnkit.fused import check_activation
from bnkit.nn.batchnorm import _BatchNormForward
from bnkit.nn.modes import resolve_mode
from bnkit.nn.tracing import fx_leaf

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]


class _BatchNormActForward(_BatchNormForward):
    activation: str = "relu"
    activation_param: float = 0.01
    memory_saving: bool = False
    inplace: bool = False
    _inplace_now: bool = False

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if (node := fx_leaf(self, input, mask)) is not None:
            return node
        if self.inplace or self._inplace_now:
            # "eval but keep updating" reads the input twice: never overwrite it there. (Asked and set only
            # where it can change: nn.Module.__setattr__ costs microseconds on every forward.)
            use_batch_stats, update = resolve_mode(self)
            inplace_now = self.inplace and not (update and not use_batch_stats)
            if inplace_now is not self._inplace_now:
                self._inplace_now = inplace_now
        return super().forward(input, mask)

    def _batch_norm_pure(self, input: Tensor, running_mean, running_var, weight, bias, training, momentum, eps,
                         *, mask: Tensor | None = None, channel_dim: int = 1):
        if mask is not None:
            raise NotImplementedError(f"{type(self).__name__} does not take a mask")
        return batch_norm_act_pure(
            input, running_mean, running_var, weight, bias, training, momentum, eps, activation=self.activation,
            activation_param=self.activation_param, memory_saving=self.memory_saving, inplace=self._inplace_now,
            channel_dim=channel_dim,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation in ("leaky_relu", "elu"):
            text += f", activation_param={self.activation_param}"
        if self.memory_saving:
            text += ", memory_saving=True"
        if self.inplace:
            text += ", inplace=True"
        return text


def _make_init(torch_cls: type):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "relu",
        activation_param: float = 0.01,
        memory_saving: bool = False,
        device=None,
        dtype=None,
        *,
        inplace: bool = False,
        channel_dim: int = 1,
        nonfinite: str | None = None,
    ) -> None:
        check_activation(activation, activation_param, memory_saving)
        if inplace and not memory_saving:
            raise ValueError("inplace=True needs memory_saving=True: the standard backward reads the input")
        torch_cls.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_bnkit(channel_dim, nonfinite)
        self.activation = activation
        self.activation_param = float(activation_param)
        self.memory_saving = bool(memory_saving)
        self.inplace = bool(inplace)

    return __init__


class BatchNormAct1d(_BatchNormActForward, nn.BatchNorm1d):
    """``act(BatchNorm1d(x))`` in one op; input (N, C) or (N, C, L)."""

    __init__ = _make_init(nn.BatchNorm1d)


class BatchNormAct2d(_BatchNormActForward, nn.BatchNorm2d):
    """``act(BatchNorm2d(x))`` in one op; input (N, C, H, W)."""

    __init__ = _make_init(nn.BatchNorm2d)


class BatchNormAct3d(_BatchNormActForward, nn.BatchNorm3d):
    """``act(BatchNorm3d(x))`` in one op; input (N, C, D, H, W)."""

    __init__ = _make_init(nn.BatchNorm3d)
