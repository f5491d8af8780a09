"""``bnkit.convert``: swap torch's batch-norm layers for bnkit's twins, and back.

The swap changes each layer's class in place (bnkit's classes subclass torch's and add
only ``forward`` and two options), so the very same parameters, buffers, hooks,
``training`` flag, device and dtype stay attached: an optimizer built before the
conversion keeps working, and nothing else in the model changes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

import bnkit.nn as bnn

__all__ = ["convert", "register_twin"]

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


def _to_bnkit(module: nn.Module) -> bool:
    target = _TO_BNKIT.get(type(module))
    if target is None:
        return False
    module.__class__ = target
    module._init_bnkit(channel_dim=1, nonfinite=None)
    return True


def _to_torch(module: nn.Module) -> bool:
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


def convert(
    model: nn.Module, to: str = "bnkit", sync: bool = False, process_group: Any | None = None
) -> nn.Module:
    """Replace every torch batch-norm layer in ``model`` with bnkit's twin (or back).

    ``to="bnkit"`` (default) converts ``torch.nn.BatchNorm1d/2d/3d`` to
    ``bnkit.nn.BatchNorm1d/2d/3d`` (and ``torch.nn.SyncBatchNorm`` to
    ``bnkit.nn.SyncBatchNorm``); ``to="torch"`` converts back. The model is changed
    in place and returned (also when ``model`` itself is a batch-norm layer).

    ``sync=True`` instead replaces every batch-norm layer, torch's or bnkit's, with
    :class:`bnkit.nn.SyncBatchNorm` synchronized over ``process_group`` (default: the whole
    world), as ``SyncBatchNorm.convert_sync_batchnorm`` does: the new layers share the old
    parameters and buffers, and a batch-norm ``model`` itself comes back as a new layer.
    """
    if to not in ("bnkit", "torch"):
        raise ValueError(f"to must be 'bnkit' or 'torch', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if sync:
        if to != "bnkit":
            raise ValueError(f"sync=True converts to bnkit.nn.SyncBatchNorm; it cannot be combined with to={to!r}")
        return bnn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    if process_group is not None:
        raise ValueError("process_group is only used with sync=True")
    swap = _to_bnkit if to == "bnkit" else _to_torch
    for module in model.modules():
        swap(module)
    return model
