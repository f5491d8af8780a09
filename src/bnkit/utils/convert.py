"""``bnkit.convert``: swap torch's batch-norm layers for bnkit's twins, and back.

The swap changes each layer's class in place (bnkit's classes subclass torch's and add
only ``forward`` and two options), so the very same parameters, buffers, hooks,
``training`` flag, device and dtype stay attached: an optimizer built before the
conversion keeps working, and nothing else in the model changes.

Only exact classes are swapped. A batch-norm layer left as it is (a subclass of torch's
class, such as timm's ``BatchNormAct2d`` with its own forward, or a bnkit variant with no
torch twin) is named in a warning, and in the report ``return_report=True`` returns.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnkit.nn as bnn
from bnkit.nn.batchnorm import _BatchNormForward
from bnkit.nn.frozen import _FrozenBatchNorm
from bnkit.nn.kinds import unknown_forward
from bnkit.nn.sync import CONVERTIBLE_TO_SYNC
from bnkit.utils.fuse_activations import fuse_activations as fuse_batch_norm_activations
from bnkit.utils.report import Skipped, ToolReport

__all__ = ["ConvertReport", "Skipped", "convert", "register_twin"]


class ConvertReport(ToolReport):
    """The qualified names of the layers :func:`convert` swapped, plus ``skipped``: every batch-norm
    layer it left as it was, with the reason. With ``fuse_activations=True``, ``fused`` lists the
    :class:`bnkit.utils.fuse_activations.FusedPair` made, and ``skipped`` also holds the batch norms
    followed by an activation that were not fused."""

    def __init__(self) -> None:
        super().__init__()
        self.fused: list = []

# torch class -> bnkit class. Exact types only: a user's subclass of a torch layer has
# its own forward that a swap would silently drop.
_TO_BNKIT: dict[type, type] = {
    nn.BatchNorm1d: bnn.BatchNorm1d,
    nn.BatchNorm2d: bnn.BatchNorm2d,
    nn.BatchNorm3d: bnn.BatchNorm3d,
    nn.SyncBatchNorm: bnn.SyncBatchNorm,
}


def register_twin(torch_cls: type, bnkit_cls: type) -> None:
    """Declare that ``bnkit_cls`` replaces ``torch_cls`` in :func:`convert`."""
    _TO_BNKIT[torch_cls] = bnkit_cls


def swap_to_bnkit(module: nn.Module) -> bool:
    """Swap ``module``'s class for its bnkit twin in place if it is a torch class that has one."""
    target = _TO_BNKIT.get(type(module))
    if target is None:
        return False
    module.__class__ = target
    module._init_bnkit(channel_dim=1, nonfinite=None)
    return True


def has_bnkit_twin(module: nn.Module) -> bool:
    """Whether :func:`swap_to_bnkit` would swap ``module``."""
    return type(module) in _TO_BNKIT


def swap_to_torch(module: nn.Module) -> bool:
    """Swap a bnkit layer's class back to its torch twin in place if it has one."""
    back = {v: k for k, v in _TO_BNKIT.items()}
    target = back.get(type(module))
    if target is None:
        return False
    if getattr(module, "channel_dim", 1) != 1:
        raise ValueError(f"cannot convert {module!r} to torch: torch has no channel_dim option")
    module.__class__ = target
    for name in ("channel_dim", "nonfinite"):
        module.__dict__.pop(name, None)
    return True


def _left_alone(module: nn.Module, to: str, sync: bool) -> str | None:
    """Why :func:`convert` does not swap ``module`` (a batch-norm layer it cannot swap), else ``None``."""
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if to == "torch":
        if isinstance(module, (_BatchNormForward, _FrozenBatchNorm)) and cls not in _TO_BNKIT.values():
            return f"{name} has no torch twin"
        return None
    if not isinstance(module, _BatchNorm):
        return None
    if sync:
        if cls in CONVERTIBLE_TO_SYNC:
            return None
    elif cls in _TO_BNKIT or isinstance(module, _BatchNormForward):
        return None  # a torch layer bnkit swaps, or already bnkit's
    target = "bnkit.nn.SyncBatchNorm" if sync else "a bnkit twin"
    why = unknown_forward(module) or f"{name} is a subclass of a torch batch-norm class"
    return f"{why}; only exact classes are swapped for {target}, which would drop what the subclass adds"


def convert(
    model: nn.Module,
    to: str = "bnkit",
    sync: bool = False,
    process_group: Any | None = None,
    *,
    fuse_activations: bool = False,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ConvertReport]:
    """Replace every torch batch-norm layer in ``model`` with bnkit's twin (or back).

    ``to="bnkit"`` (default) converts ``torch.nn.BatchNorm1d/2d/3d`` to
    ``bnkit.nn.BatchNorm1d/2d/3d`` (and ``torch.nn.SyncBatchNorm`` to
    ``bnkit.nn.SyncBatchNorm``); ``to="torch"`` converts back. The model is changed
    in place and returned (also when ``model`` itself is a batch-norm layer).

    ``sync=True`` instead replaces every batch-norm layer, torch's or bnkit's, with
    :class:`bnkit.nn.SyncBatchNorm` synchronized over ``process_group`` (default: the whole
    world), as ``SyncBatchNorm.convert_sync_batchnorm`` does: the new layers share the old
    parameters and buffers, and a batch-norm ``model`` itself comes back as a new layer.

    Batch-norm layers that are not swapped (see :func:`_left_alone`: subclasses with a forward
    of their own, bnkit variants without a torch twin) stay as they are, named in one
    ``UserWarning``. With ``return_report=True`` the call returns ``(model, report)``, a
    :class:`ConvertReport` of the swapped layers' names and ``report.skipped``.

    ``fuse_activations=True`` (with ``to="bnkit"``) then turns each batch norm and the activation after
    it into one ``BatchNormAct*`` layer (:mod:`bnkit.utils.fuse_activations`): the returned model is
    then a ``torch.fx.GraphModule`` sharing every parameter and buffer with ``model``, and
    ``report.fused`` lists the pairs (and, in ``report.fused.skipped``, those it left and why).
    """
    if to not in ("bnkit", "torch"):
        raise ValueError(f"to must be 'bnkit' or 'torch', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if sync and to != "bnkit":
        raise ValueError(f"sync=True converts to bnkit.nn.SyncBatchNorm; it cannot be combined with to={to!r}")
    if process_group is not None and not sync:
        raise ValueError("process_group is only used with sync=True")
    if fuse_activations and (to != "bnkit" or sync):
        raise ValueError("fuse_activations=True fuses into bnkit's BatchNormAct layers: it needs to='bnkit' "
                         "and sync=False")
    report = ConvertReport()
    for name, module in model.named_modules():
        reason = _left_alone(module, to, sync)
        if reason is not None:
            report.skipped.append(Skipped(name or "<model>", reason))
    if sync:
        report.extend(name or "<model>" for name, m in model.named_modules() if type(m) in CONVERTIBLE_TO_SYNC)
        model = bnn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    else:
        swap = swap_to_bnkit if to == "bnkit" else swap_to_torch
        report.extend(name or "<model>" for name, module in model.named_modules() if swap(module))
    if report.skipped:
        listed = "; ".join(f"{s.name}: {s.reason}" for s in report.skipped[:5])
        more = f" (and {len(report.skipped) - 5} more)" if len(report.skipped) > 5 else ""
        warnings.warn(
            f"bnkit.convert swapped {len(report)} batch-norm layer(s) and left {len(report.skipped)} as they were: "
            f"{listed}{more}",
            UserWarning,
            stacklevel=2,
        )
    if fuse_activations:
        model, report.fused = fuse_batch_norm_activations(model)
    return (model, report) if return_report else model
