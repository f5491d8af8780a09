"""bnkit's batch norm in ``torch.ao.quantization``: the fusions torch makes for its own batch norm.

torch's quantization flows fuse ``Conv + BatchNorm (+ ReLU)`` (and ``Linear + BatchNorm1d``,
``BatchNorm + ReLU``, ``ConvTranspose + BatchNorm``) before they quantize, and they match the
layers by *exact* type, so a bnkit layer in the same place is not fused and stays a float
batch norm between quantized layers. These two functions give them bnkit's classes too:

* eager mode: ``torch.ao.quantization.fuse_modules(model, [["conv", "bn", "relu"]],
  fuse_custom_config_dict={"additional_fuser_method_mapping": bnkit.utils.fuser_method_mapping()})``;
* FX mode: ``prepare_fx(model, qconfig_mapping, example_inputs,
  backend_config=bnkit.utils.quantization_backend_config())`` (and the same ``backend_config`` in
  ``convert_fx``).

Each fusion hands torch's own fuser a private copy of the bnkit layer with torch's class (the same
parameter and buffer tensors), so the fused modules are torch's (a folded ``Conv2d`` after
post-training fusion, ``ConvBn2d``/``ConvBnReLU2d`` for quantization-aware training) and the
quantized model is the one torch builds from its own batch norm. A layer with bnkit's
``channel_dim`` other than 1 cannot be fused (torch has no such option) and raises ``ValueError``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

import bnkit.nn as bnn
from bnkit.utils.convert import swap_to_torch

__all__ = ["fuser_method_mapping", "quantization_backend_config"]

_TWINS: dict[type, type] = {nn.BatchNorm1d: bnn.BatchNorm1d, nn.BatchNorm2d: bnn.BatchNorm2d,
                            nn.BatchNorm3d: bnn.BatchNorm3d}

# Every module pattern torch's eager fuse_modules knows that holds a batch norm.
_EAGER_PATTERNS: tuple[tuple[type, ...], ...] = (
    (nn.Conv1d, nn.BatchNorm1d), (nn.Conv1d, nn.BatchNorm1d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d), (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    (nn.Conv3d, nn.BatchNorm3d), (nn.Conv3d, nn.BatchNorm3d, nn.ReLU),
    (nn.Linear, nn.BatchNorm1d),
    (nn.BatchNorm2d, nn.ReLU), (nn.BatchNorm3d, nn.ReLU),
    (nn.ConvTranspose1d, nn.BatchNorm1d), (nn.ConvTranspose2d, nn.BatchNorm2d), (nn.ConvTranspose3d, nn.BatchNorm3d),
)


def _as_torch(module: Any) -> Any:
    """``module`` itself, or for a bnkit layer a shallow copy with torch's class (the same tensors)."""
    if type(module) not in _TWINS.values():
        return module
    twin = copy.copy(module)
    swap_to_torch(twin)
    return twin


def _with_torch_classes(fuser: Callable) -> Callable:
    def fuse(is_qat: bool, *modules: Any) -> nn.Module:
        return fuser(is_qat, *(_as_torch(m) for m in modules))

    fuse.__name__ = f"bnkit_{getattr(fuser, '__name__', 'fuser')}"
    return fuse


def _bnkit_pattern(pattern: Any) -> Any:
    """``pattern`` with each torch batch-norm class replaced by bnkit's twin."""
    if isinstance(pattern, tuple):
        return tuple(_bnkit_pattern(p) for p in pattern)
    return _TWINS.get(pattern, pattern)


def fuser_method_mapping() -> dict[tuple[type, ...], Callable]:
    """``additional_fuser_method_mapping`` for ``torch.ao.quantization.fuse_modules``: torch's fusions
    of its batch norm, for bnkit's ``BatchNorm1d/2d/3d`` in the same places."""
    from torch.ao.quantization.fuser_method_mappings import get_fuser_method

    return {_bnkit_pattern(p): _with_torch_classes(get_fuser_method(p)) for p in _EAGER_PATTERNS}


def quantization_backend_config(base: Any | None = None) -> Any:
    """A ``BackendConfig`` for FX-mode quantization: ``base`` (torch's native one by default) plus, for
    each of its fusion patterns with torch's batch norm, the same pattern with bnkit's class."""
    import torch.ao.quantization  # noqa: F401  (loads the backend_config helpers it needs)
    from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig, get_native_backend_config

    config = base if base is not None else get_native_backend_config()
    extra = []
    for pattern_config in config.configs:
        pattern = pattern_config.pattern
        if not isinstance(pattern, tuple) or pattern_config.fuser_method is None:
            continue  # only fusions: a lone bnkit layer is not quantized, as any unknown module
        twin_pattern = _bnkit_pattern(pattern)
        if twin_pattern == pattern:
            continue
        entry = pattern_config.to_dict()
        entry["pattern"] = twin_pattern
        entry["fuser_method"] = _with_torch_classes(pattern_config.fuser_method)
        extra.append(BackendPatternConfig.from_dict(entry))
    return BackendConfig(config.name).set_backend_pattern_configs([*config.configs, *extra])
