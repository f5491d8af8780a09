"""What a batch-norm layer's forward does: plain batch norm, batch norm then an activation, or unknown.

Model tools that replace or rewrite a layer (``fold``, ``freeze``, ``convert``) may only do so
when they know everything its forward computes. A subclass of torch's batch norm with a
forward of its own (timm's ``BatchNormAct2d`` adds ``drop`` and ``act``; a user's layer may
do anything) is not plain batch norm, however much it looks like one: a tool that treats it
as one silently drops the rest. The forwards named here are the ones bnkit knows; any other
forward is unknown, and the tools skip or refuse such a layer with the reason.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.nn.act import _BatchNormActForward
from bnkit.nn.batchnorm import _BatchNormForward
from bnkit.nn.frozen import _FrozenBatchNorm
from bnkit.nn.sync import SyncBatchNorm

__all__ = ["activation_module", "unknown_forward"]

# Forwards that compute batch norm and nothing else (bnkit's variants, renorm and ghost, differ only
# in training; in eval they are plain batch norm too).
_PLAIN_FORWARDS = frozenset({_BatchNorm.forward, nn.SyncBatchNorm.forward, _BatchNormForward.forward,
                             SyncBatchNorm.forward})
# Forwards that compute batch norm followed by ``module.activation`` (identity included).
_ACTIVATION_FORWARDS = frozenset({_BatchNormActForward.forward, _FrozenBatchNorm.forward})
# Frozen batch norms of other libraries that are plain batch norm with fixed statistics.
_PLAIN_FOREIGN = frozenset({"torchvision.ops.misc.FrozenBatchNorm2d", "detectron2.layers.batch_norm.FrozenBatchNorm2d"})


def unknown_forward(module: nn.Module) -> str | None:
    """Why ``module``'s forward may do more than batch norm (and bnkit's activations), or ``None``.

    ``None`` for torch's and bnkit's batch-norm classes, their subclasses that keep the forward,
    bnkit's fused and frozen layers, and the frozen batch norms of torchvision and detectron2.
    """
    cls = type(module)
    forward = getattr(cls, "forward", None)
    if forward in _PLAIN_FORWARDS or forward in _ACTIVATION_FORWARDS:
        return None
    if f"{cls.__module__}.{cls.__qualname__}" in _PLAIN_FOREIGN:
        return None
    return (f"{cls.__module__}.{cls.__qualname__} has a forward of its own, which may do more than batch norm "
            "(an activation, dropout, ...)")


_ACTIVATIONS = {
    "relu": lambda p: nn.ReLU(),
    "leaky_relu": lambda p: nn.LeakyReLU(p),
    "elu": lambda p: nn.ELU(p),
    "silu": lambda p: nn.SiLU(),
    "gelu": lambda p: nn.GELU(),
}


def activation_module(module: nn.Module) -> nn.Module | None:
    """The activation ``module`` applies after batch norm, as a new torch module; ``None`` for none.

    bnkit's ``BatchNormAct*`` and frozen layers made from them carry it as ``activation`` (a name in
    :data:`bnkit.fused.ACTIVATIONS`) and ``activation_param``; plain batch norm has none.
    """
    if type(module).forward not in _ACTIVATION_FORWARDS:
        return None
    name = getattr(module, "activation", "identity")
    if name == "identity":
        return None
    return _ACTIVATIONS[name](float(getattr(module, "activation_param", 0.01)))
