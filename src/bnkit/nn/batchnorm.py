"""``bnkit.nn.BatchNorm1d/2d/3d`` and their lazy forms: torch's classes, bnkit's forward.

Each class subclasses its ``torch.nn`` twin, so parameters, buffers, ``state_dict`` keys,
``repr``, ``reset_*``, legacy-checkpoint loading and every ``isinstance(m, _BatchNorm)``
check in the ecosystem (``swa_utils.update_bn``, ``convert_sync_batchnorm``, timm,
detectron2, fvcore) work unchanged. Only ``forward`` is bnkit's, plus two keyword-only
options that default to torch's behaviour: ``channel_dim`` and ``nonfinite``.

The four modes (``training`` x ``track_running_stats``), as in torch:

=============  =====================  ==========================================
training       track_running_stats    normalizes with / updates running stats
=============  =====================  ==========================================
True           True                   batch statistics / yes
True           False                  batch statistics / no (there are none)
False          True                   running statistics / no
False          False                  batch statistics / no
=============  =====================  ==========================================
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import Tensor, nn

from bnkit.autograd import _eager
from bnkit.functional import batch_norm_pure, write_running_stats
from bnkit.nn.modes import resolve_mode
from bnkit.nn.tracing import fx_leaf
from bnkit.nonfinite import check_policy, get_nonfinite_policy, layer_label

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]

# torch >= 2.9 added ``bias=`` to the constructors; pass it only where torch takes it.
_TORCH_TAKES_BIAS = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters
_TORCH_LAZY_TAKES_BIAS = "bias" in inspect.signature(nn.LazyBatchNorm2d.__init__).parameters


# 1 as a 0-d int64 tensor, added to num_batches_tracked each training step (only read).
_ONE = torch.ones((), dtype=torch.long)


class _BatchNormForward:
    """bnkit's forward for any subclass of ``torch.nn.modules.batchnorm._NormBase``."""

    channel_dim: int = 1
    nonfinite: str | None = None
    # bnkit.batch_stats's overrides (see bnkit.nn.modes); set per layer, None means torch's rule.
    # Class defaults so that reading them never falls through to nn.Module.__getattr__.
    _bnkit_normalize_with: str | None = None
    _bnkit_update_running_stats: bool | None = None

    def _init_bnkit(self, channel_dim: int, nonfinite: str | None) -> None:
        if not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
        self.channel_dim = channel_dim
        self.nonfinite = check_policy(nonfinite)

    def _check_channels(self, input: Tensor) -> None:
        # torch reports a channel mismatch from its kernel; bnkit says it before any work.
        if not -input.dim() <= self.channel_dim < input.dim():
            return  # the functional raises the out-of-range error
        dim = self.channel_dim % input.dim()
        if self.num_features and input.shape[dim] != self.num_features:
            for name in ("running_mean", "weight"):
                t = getattr(self, name, None)
                if t is not None:
                    raise RuntimeError(f"{name} should contain {input.shape[dim]} elements not {t.numel()}")

    def _momentum(self) -> float | Tensor:
        # torch's exponential_average_factor, as a tensor for momentum=None so that
        # torch.compile keeps the whole step in one graph (torch's own module breaks it).
        if self.momentum is not None:
            return self.momentum
        if resolve_mode(self)[1] and self.num_batches_tracked is not None:
            return 1.0 / (self.num_batches_tracked + 1).to(torch.float64)
        return 0.0

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if (node := fx_leaf(self, input, mask)) is not None:
            return node
        self._check_input_dim(input)
        use_batch_stats, update = resolve_mode(self)
        try:
            self._check_channels(input)
            y, new_mean, new_var = self._outputs(input, mask, use_batch_stats, update)
        except Exception:
            self._count_failed_batch(update)
            raise
        if update:
            self._commit_running_stats(new_mean, new_var)
        return y

    def _outputs(
        self, input: Tensor, mask: Tensor | None, use_batch_stats: bool, update: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(y, new_running_mean, new_running_var)`` of one forward; nothing is written yet."""
        # each buffer read through nn.Module.__getattr__ once
        running_mean, running_var = self.running_mean, self.running_var
        has_running = running_mean is not None and running_var is not None
        if update and not use_batch_stats and has_running:
            # "eval but keep updating": normalize with the running statistics as they
            # were, then fold this batch into them.
            y, _, _ = self._batch_norm_pure(input, running_mean, running_var, self.weight, self.bias,
                                            False, 0.0, self.eps, mask=mask, channel_dim=self.channel_dim)
            with torch.no_grad():
                _, new_mean, new_var = batch_norm_pure(
                    input.detach(), running_mean, running_var, None, None, True, self._momentum(),
                    self.eps, mask=mask, channel_dim=self.channel_dim)
            return y, new_mean, new_var
        keep = has_running and (update or not use_batch_stats)
        return self._batch_norm_pure(
            input,
            running_mean if keep else None,
            running_var if keep else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self._momentum(),
            self.eps,
            mask=mask,
            channel_dim=self.channel_dim,
        )

    def _batch_norm_pure(self, input: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The pure function that makes the output (``batch_norm_pure``'s signature).

        Variants (``bnkit.nn.act``, ``bnkit.nn.variants``) override only this and reuse the
        mode logic of :meth:`forward` and the buffer writes of :meth:`_commit_running_stats`.
        """
        return batch_norm_pure(input, *args, **kwargs)

    def _count_failed_batch(self, update: bool) -> None:
        """torch's module adds the batch to ``num_batches_tracked`` before ``F.batch_norm`` runs, so a
        training forward that raises there (one value per channel, a non-positive ``eps``, a channel
        mismatch) still counts it; bnkit's forward, which counts at the end, does the same on the way
        out (not under a non-finite policy of bnkit's own: those leave the counter to the policy)."""
        num_batches_tracked = self.num_batches_tracked
        if update and num_batches_tracked is not None and (self.nonfinite or get_nonfinite_policy()) == "propagate":
            with torch.no_grad():
                num_batches_tracked.add_(1)

    def _commit_running_stats(self, new_mean: Tensor | None, new_var: Tensor | None) -> None:
        """The one place a module mutates its buffers (after the non-finite policy)."""
        policy = self.nonfinite or get_nonfinite_policy()
        if policy != "propagate" and new_mean is not None and new_var is not None:
            finite = bool(torch.isfinite(new_mean).all() and torch.isfinite(new_var).all())
            if not finite:
                where = layer_label(self)
                message = (
                    f"{where}: batch statistics are not finite; running statistics and "
                    "num_batches_tracked were left unchanged (nonfinite='skip')"
                )
                if policy == "raise":
                    raise FloatingPointError(f"{where}: batch statistics are not finite (nonfinite='raise')")
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                return
        num_batches_tracked = self.num_batches_tracked
        if num_batches_tracked is not None:
            if num_batches_tracked.dtype == torch.long and _eager(num_batches_tracked):
                # the same increment, without wrapping the Python 1 in a new tensor each step
                num_batches_tracked.add_(_ONE)
            else:
                with torch.no_grad():
                    num_batches_tracked.add_(1)
        write_running_stats(self.running_mean, self.running_var, new_mean, new_var)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.channel_dim != 1:
            text += f", channel_dim={self.channel_dim}"
        if self.nonfinite is not None:
            text += f", nonfinite={self.nonfinite!r}"
        return text


def _make_init(torch_cls: type):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        channel_dim: int = 1,
        nonfinite: str | None = None,
    ) -> None:
        extra = {"bias": bias} if _TORCH_TAKES_BIAS else {}
        if not bias and not _TORCH_TAKES_BIAS:
            raise TypeError("bias=False needs torch >= 2.9")
        torch_cls.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        self._init_bnkit(channel_dim, nonfinite)

    return __init__


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d``: input (N, C) or (N, C, L)."""

    __init__ = _make_init(nn.BatchNorm1d)


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d``: input (N, C, H, W)."""

    __init__ = _make_init(nn.BatchNorm2d)


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d``: input (N, C, D, H, W)."""

    __init__ = _make_init(nn.BatchNorm3d)


def _make_lazy_init(torch_cls: type):
    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        channel_dim: int = 1,
        nonfinite: str | None = None,
    ) -> None:
        extra = {"bias": bias} if _TORCH_LAZY_TAKES_BIAS else {}
        if not bias and not _TORCH_LAZY_TAKES_BIAS:
            raise TypeError("bias=False needs torch >= 2.9")
        torch_cls.__init__(self, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        self._init_bnkit(channel_dim, nonfinite)

    return __init__


class _LazyChannels:
    def initialize_parameters(self, input: Tensor) -> None:
        # torch reads the channel count from dim 1; bnkit honours channel_dim.
        if self.has_uninitialized_params():
            moved = input.movedim(self.channel_dim, 1) if self.channel_dim != 1 else input
            super().initialize_parameters(moved)


class LazyBatchNorm1d(_LazyChannels, _BatchNormForward, nn.LazyBatchNorm1d):
    """Drop-in for ``torch.nn.LazyBatchNorm1d``; becomes :class:`BatchNorm1d`."""

    cls_to_become = BatchNorm1d
    __init__ = _make_lazy_init(nn.LazyBatchNorm1d)


class LazyBatchNorm2d(_LazyChannels, _BatchNormForward, nn.LazyBatchNorm2d):
    """Drop-in for ``torch.nn.LazyBatchNorm2d``; becomes :class:`BatchNorm2d`."""

    cls_to_become = BatchNorm2d
    __init__ = _make_lazy_init(nn.LazyBatchNorm2d)


class LazyBatchNorm3d(_LazyChannels, _BatchNormForward, nn.LazyBatchNorm3d):
    """Drop-in for ``torch.nn.LazyBatchNorm3d``; becomes :class:`BatchNorm3d`."""

    cls_to_become = BatchNorm3d
    __init__ = _make_lazy_init(nn.LazyBatchNorm3d)
