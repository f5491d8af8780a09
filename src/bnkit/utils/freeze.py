"""``bnkit.freeze`` / ``bnkit.unfreeze``: batch-norm layers to frozen batch norm, and back.

:func:`freeze` changes every batch-norm layer of a model (any ``torch.nn.modules.batchnorm
._BatchNorm``: torch's, ``SyncBatchNorm``, bnkit's and its variants) *in place* into
:class:`bnkit.nn.FrozenBatchNorm1d/2d/3d` by swapping its class, so hooks, the parent's
reference and the tensors themselves stay; a frozen ``BatchNormAct`` keeps its activation. A
layer whose forward bnkit does not know (:func:`bnkit.nn.kinds.unknown_forward`) is refused.
It records what it changed on the layer, and :func:`unfreeze` restores exactly that: the
original class, the very same ``weight``/``bias`` Parameter objects (so an optimizer built
before freezing still holds them, with any values loaded while frozen) and
``num_batches_tracked``.

What changes while frozen: ``weight``/``bias`` become buffers (``affine_trainable=False``,
the default, as torchvision/detectron2) or stay Parameters (``affine_trainable=True``);
``num_batches_tracked`` leaves the ``state_dict`` (torchvision's keys); a layer without
affine (``affine=False``) gets buffers of ones/zeros, removed again by :func:`unfreeze`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from bnkit.nn.kinds import unknown_forward

__all__ = ["freeze", "unfreeze"]

_STASH = "_bnkit_unfreeze"


def _frozen_class(module: nn.Module) -> type:
    if isinstance(module, nn.BatchNorm1d):
        return FrozenBatchNorm1d
    if isinstance(module, nn.BatchNorm3d):
        return FrozenBatchNorm3d
    return FrozenBatchNorm2d  # BatchNorm2d, SyncBatchNorm (as detectron2), other _BatchNorm


def _check_freezable(name: str, module: nn.Module) -> None:
    where = name or type(module).__name__
    unknown = unknown_forward(module)
    if unknown is not None:
        raise TypeError(
            f"cannot freeze {where}: {unknown}, and a frozen batch norm would run batch norm alone. "
            "Freeze it with its own library's tool (timm: freeze_batch_norm_2d), or replace it with "
            "bnkit.nn.BatchNormAct* first"
        )
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"cannot freeze {where}: it is an uninitialized lazy layer (run a batch through it first)")
    if module.running_mean is None or module.running_var is None:
        raise ValueError(f"cannot freeze {where}: it has no running statistics (track_running_stats=False)")


def _freeze_one(module: nn.Module, affine_trainable: bool) -> None:
    stash: dict = {"cls": type(module), "params": {}}
    rm = module.running_mean
    for name, fill in (("weight", 1.0), ("bias", 0.0)):
        p = module._parameters.pop(name, None)
        stash["params"][name] = p
        if p is None:
            module._buffers.pop(name, None)
            module.register_buffer(name, torch.full_like(rm, fill))
        elif affine_trainable:
            module.register_parameter(name, p)
        else:
            module.register_buffer(name, p.detach())  # shares storage with the Parameter
    stash["num_batches_tracked"] = module._buffers.pop("num_batches_tracked", None)
    module.__class__ = _frozen_class(module)
    module.__dict__[_STASH] = stash


def freeze(model: nn.Module, affine_trainable: bool = False) -> nn.Module:
    """Turn every batch-norm layer of ``model`` into frozen batch norm, in place; returns ``model``.

    Raises (before changing anything) when a layer cannot be frozen: ``TypeError`` for a layer
    whose forward does more than batch norm as far as bnkit knows (a subclass with a forward of
    its own, such as timm's ``BatchNormAct2d``: freezing it would drop its activation),
    ``ValueError`` for one without running statistics or an uninitialized lazy layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze expects an nn.Module, got {type(model).__name__}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    for name, module in targets:
        _check_freezable(name, module)
    for _, module in targets:
        _freeze_one(module, bool(affine_trainable))
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze` on every layer it converted, in place; returns ``model``.

    Layers built directly as ``FrozenBatchNorm*`` (not by :func:`freeze`) stay as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfreeze expects an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        stash = module.__dict__.pop(_STASH, None)
        if stash is None:
            continue
        module.__class__ = stash["cls"]
        for name, p in stash["params"].items():
            current = module._buffers.pop(name, None)
            if current is None:
                current = module._parameters.pop(name, None)
            if p is not None and current is not None and current is not p:
                with torch.no_grad():
                    p.data = current.detach()  # follow .to()/.half() applied while frozen
            module.register_parameter(name, p)
        nbt = stash["num_batches_tracked"]
        if nbt is not None:
            module.register_buffer("num_batches_tracked", nbt.to(module.running_mean.device))
    return model
