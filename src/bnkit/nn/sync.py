"""``bnkit.nn.SyncBatchNorm``: batch norm with statistics over every process of a group.

Same constructor, parameters, buffers, ``state_dict`` keys and ``repr`` as
``torch.nn.SyncBatchNorm``, with bnkit's forward, so it runs wherever ``torch.distributed``
runs: gloo on CPU tensors as well as NCCL on CUDA (torch's own module refuses CPU tensors).

Why it subclasses ``torch.nn.modules.batchnorm._BatchNorm`` and not
``torch.nn.SyncBatchNorm``: ``DistributedDataParallel`` raises "SyncBatchNorm layers only
work with GPU modules" for any CPU model holding an ``isinstance(m, torch.nn.SyncBatchNorm)``
layer, which would make CPU training under DDP impossible. Every check for
``_BatchNorm`` (``convert``, ``swa_utils.update_bn``, timm, fvcore) still sees it; only an
``isinstance(m, torch.nn.SyncBatchNorm)`` check does not. The two torch-specific methods
(``_check_input_dim``, ``_check_non_zero_input_channels``) are torch's, unchanged.

When it synchronizes: in training mode when it normalizes with batch statistics and the
group (``process_group``, default the whole world) has more than one process. Otherwise,
i.e. in eval mode, when ``torch.distributed`` is not initialized, or with a group of one
process, it is exactly :class:`bnkit.nn.BatchNorm2d`'s forward and sends no message.

Synchronized, the statistics are those of the union of all processes' batches, exact for
uneven and empty local batches (Chan's formula, see :mod:`bnkit.distributed`), with one
collective in the forward and one in the backward. The running statistics use the
global count for the unbiased variance and are bitwise identical on every process.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit import reference as ref
from bnkit.distributed import sync_batch_norm, sync_group
from bnkit.functional import as_torch_layout
from bnkit.nn.batchnorm import _TORCH_TAKES_BIAS, BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormForward
from bnkit.nn.modes import resolve_mode
from bnkit.nn.tracing import fx_leaf

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNormForward, _BatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm`` that also works on CPU (gloo) and is exact.

    Input (N, C, *) with any number of spatial dims. Extra keyword-only options as in
    :class:`bnkit.nn.BatchNorm2d`: ``channel_dim`` and ``nonfinite``. ``mask`` works only
    when the layer does not synchronize.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
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
        _BatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        self.process_group = process_group
        self._init_bnkit(channel_dim, nonfinite)

    # torch.nn.SyncBatchNorm's input checks (any number of spatial dims, C > 0).
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def _where(self) -> str:
        name = getattr(self, "_bnkit_layer_name", None)
        layer = f"{type(self).__name__}({self.num_features})"
        return f"{layer} {name!r}" if name else layer

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if (node := fx_leaf(self, input, mask)) is not None:
            return node
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        use_batch_stats, update = resolve_mode(self)
        # No communication in eval mode (as torch), nor when there is no one to talk to.
        group = sync_group(self.process_group) if self.training and use_batch_stats else None
        if group is None:
            return super().forward(input, mask)
        if mask is not None:
            raise NotImplementedError(f"{self._where()}: mask is not supported while synchronizing statistics")
        try:  # torch's module counts the batch before these can raise (_count_failed_batch)
            self._check_channels(input)
            if not input.is_floating_point():
                raise NotImplementedError(f"SyncBatchNorm expects a floating-point input, got {input.dtype}")
            moved = self.channel_dim % input.dim() != 1
            x = input.movedim(self.channel_dim, 1) if moved else input
            y, mean, var, n = sync_batch_norm(x, self.weight, self.bias, self.eps, group, self._where())
        except Exception:
            self._count_failed_batch(update)
            raise
        if update:
            new_mean, new_var = self.running_mean, self.running_var
            if n > 0:  # an empty global batch leaves them unchanged, as in local batch norm
                new_mean, new_var = ref.update_running_stats(
                    self.running_mean, self.running_var, mean, var, n, self._momentum()
                )
            self._commit_running_stats(new_mean, new_var)
        return y.movedim(1, self.channel_dim) if moved else as_torch_layout(y)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any | None = None) -> nn.Module:
        """Replace every batch-norm layer of ``module`` (torch's or bnkit's) with this class.

        Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new layers share the
        old ones' parameters and buffers and keep ``training``; the model is changed in
        place and returned, except that a batch-norm ``module`` itself is returned as a new
        layer. bnkit's ``channel_dim``/``nonfinite`` options carry over, and each layer
        remembers its qualified name for error messages.

        Exact types only: ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` of torch and bnkit.
        A subclass with its own forward (a fused BN + activation, for instance) is left
        alone, where torch's converter would silently drop that forward.
        """
        return cls._convert(module, process_group, "")

    @classmethod
    def _convert(cls, module: nn.Module, process_group: Any | None, name: str) -> nn.Module:
        out = module
        if type(module) in CONVERTIBLE_TO_SYNC or type(module) is cls:
            out = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                channel_dim=getattr(module, "channel_dim", 1),
                nonfinite=getattr(module, "nonfinite", None),
                **({"bias": module.bias is not None} if _TORCH_TAKES_BIAS else {}),
            )
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
            if name:
                out._bnkit_layer_name = name
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            out.add_module(child_name, cls._convert(child, process_group, full))
        return out


# Layers whose forward is plain batch norm: replacing them loses nothing.
CONVERTIBLE_TO_SYNC: tuple[type, ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    SyncBatchNorm,
)
