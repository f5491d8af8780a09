"""``BatchRenorm1d/2d/3d`` and ``GhostBatchNorm1d/2d/3d``: torch's classes, a variant's math.

Both subclass the ``torch.nn.BatchNorm*`` twin (same parameters, buffers and
``state_dict`` keys; eval mode is batch norm's eval mode) and override only the pure
function behind bnkit's forward. The math is documented in
:func:`bnkit.functional.batch_renorm_pure` and :func:`bnkit.functional.ghost_batch_norm_pure`.
"""

from __future__ import annotations

from torch import Tensor, nn

from bnkit.functional import (
    GHOST_RUNNING_STATS_UPDATES,
    batch_renorm_pure,
    check_renorm_limits,
    ghost_batch_norm_pure,
    renorm_limits,
)
from bnkit.nn.batchnorm import _BatchNormForward

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
]


def _no_mask(module: nn.Module, mask: Tensor | None) -> None:
    if mask is not None:
        raise NotImplementedError(f"{type(module).__name__} does not take a mask")


# --- batch renormalization ----------------------------------------------------------------


class _BatchRenormForward(_BatchNormForward):
    r_max: float = 3.0
    d_max: float = 5.0
    r_max_warmup: tuple[int, int] | None = None
    d_max_warmup: tuple[int, int] | None = None

    def current_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` for the next training step (``num_batches_tracked`` counts steps)."""
        if self.r_max_warmup is None and self.d_max_warmup is None:
            return self.r_max, self.d_max
        step = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0
        return renorm_limits(step, self.r_max, self.d_max, self.r_max_warmup, self.d_max_warmup)

    def _batch_norm_pure(self, input: Tensor, running_mean, running_var, weight, bias, training, momentum, eps,
                         *, mask: Tensor | None = None, channel_dim: int = 1):
        _no_mask(self, mask)
        r_max, d_max = self.current_limits() if training else (self.r_max, self.d_max)
        return batch_renorm_pure(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                 r_max=r_max, d_max=d_max, channel_dim=channel_dim)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"
        if self.r_max_warmup is not None:
            text += f", r_max_warmup={self.r_max_warmup}"
        if self.d_max_warmup is not None:
            text += f", d_max_warmup={self.d_max_warmup}"
        return text


def _check_warmup(name: str, warmup) -> tuple[int, int] | None:
    if warmup is None:
        return None
    if (not isinstance(warmup, tuple | list) or len(warmup) != 2
            or not all(isinstance(s, int) and s >= 0 for s in warmup) or warmup[1] < warmup[0]):
        raise ValueError(f"{name} must be None or (start_step, end_step) with 0 <= start <= end, got {warmup!r}")
    return int(warmup[0]), int(warmup[1])


def _make_renorm_init(torch_cls: type):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        r_max: float = 3.0,
        d_max: float = 5.0,
        *,
        r_max_warmup: tuple[int, int] | None = None,
        d_max_warmup: tuple[int, int] | None = None,
        channel_dim: int = 1,
        nonfinite: str | None = None,
    ) -> None:
        check_renorm_limits(r_max, d_max)
        torch_cls.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_bnkit(channel_dim, nonfinite)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.r_max_warmup = _check_warmup("r_max_warmup", r_max_warmup)
        self.d_max_warmup = _check_warmup("d_max_warmup", d_max_warmup)

    return __init__


_RENORM_DOC = """Batch renormalization (Ioffe 2017), a drop-in for ``torch.nn.{torch}``.

    ``r_max``/``d_max`` clip the correction factors; ``r_max_warmup``/``d_max_warmup``
    (``(start_step, end_step)``) ramp them from plain batch norm (1, 0) to their values,
    as in the paper (``(5000, 40000)`` and ``(5000, 25000)``); steps are counted by
    ``num_batches_tracked``. Formulas: :func:`bnkit.functional.batch_renorm_pure`.
    """


class BatchRenorm1d(_BatchRenormForward, nn.BatchNorm1d):
    __doc__ = _RENORM_DOC.format(torch="BatchNorm1d")
    __init__ = _make_renorm_init(nn.BatchNorm1d)


class BatchRenorm2d(_BatchRenormForward, nn.BatchNorm2d):
    __doc__ = _RENORM_DOC.format(torch="BatchNorm2d")
    __init__ = _make_renorm_init(nn.BatchNorm2d)


class BatchRenorm3d(_BatchRenormForward, nn.BatchNorm3d):
    __doc__ = _RENORM_DOC.format(torch="BatchNorm3d")
    __init__ = _make_renorm_init(nn.BatchNorm3d)


# --- ghost batch norm -------------------------------------------------------------------


class _GhostBatchNormForward(_BatchNormForward):
    virtual_batch_size: int = 1
    running_stats_update: str = "per_virtual_batch"

    def _batch_norm_pure(self, input: Tensor, running_mean, running_var, weight, bias, training, momentum, eps,
                         *, mask: Tensor | None = None, channel_dim: int = 1):
        _no_mask(self, mask)
        return ghost_batch_norm_pure(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            virtual_batch_size=self.virtual_batch_size, running_stats_update=self.running_stats_update,
            channel_dim=channel_dim,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"
        if self.running_stats_update != "per_virtual_batch":
            text += f", running_stats_update={self.running_stats_update!r}"
        return text


def _make_ghost_init(torch_cls: type):
    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        running_stats_update: str = "per_virtual_batch",
        channel_dim: int = 1,
        nonfinite: str | None = None,
    ) -> None:
        if not isinstance(virtual_batch_size, int) or isinstance(virtual_batch_size, bool) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
        if momentum is None:
            raise ValueError("GhostBatchNorm needs a float momentum: momentum=None (cumulative average) "
                             "is not defined per virtual batch")
        if running_stats_update not in GHOST_RUNNING_STATS_UPDATES:
            raise ValueError(f"running_stats_update must be one of {', '.join(GHOST_RUNNING_STATS_UPDATES)}, "
                             f"got {running_stats_update!r}")
        torch_cls.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_bnkit(channel_dim, nonfinite)
        self.virtual_batch_size = virtual_batch_size
        self.running_stats_update = running_stats_update

    return __init__


_GHOST_DOC = """Ghost batch norm (Hoffer et al. 2017), a drop-in for ``torch.nn.{torch}``.

    Training normalizes each virtual batch of ``virtual_batch_size`` samples with its own
    statistics (the last one is smaller when N is not a multiple). The running statistics
    take one moving-average step per virtual batch (``running_stats_update=
    "per_virtual_batch"``) or one step with the averaged statistics (``"averaged"``,
    Keras); ``num_batches_tracked`` counts forward calls, as in torch. Details:
    :func:`bnkit.functional.ghost_batch_norm_pure`.
    """


class GhostBatchNorm1d(_GhostBatchNormForward, nn.BatchNorm1d):
    __doc__ = _GHOST_DOC.format(torch="BatchNorm1d")
    __init__ = _make_ghost_init(nn.BatchNorm1d)


class GhostBatchNorm2d(_GhostBatchNormForward, nn.BatchNorm2d):
    __doc__ = _GHOST_DOC.format(torch="BatchNorm2d")
    __init__ = _make_ghost_init(nn.BatchNorm2d)


class GhostBatchNorm3d(_GhostBatchNormForward, nn.BatchNorm3d):
    __doc__ = _GHOST_DOC.format(torch="BatchNorm3d")
    __init__ = _make_ghost_init(nn.BatchNorm3d)
