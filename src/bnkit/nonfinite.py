"""What happens to running statistics when a training batch has non-finite statistics.

torch folds a NaN/inf batch statistic into the running statistics, which then stay
non-finite forever (``nan * (1 - momentum) + ...`` is ``nan``): one bad batch poisons a
model for good, silently. bnkit modules take ``nonfinite=``:

* ``"propagate"`` (the default): torch's behaviour, bit for bit;
* ``"skip"``: a batch whose new running statistics would not be finite leaves
  ``running_mean``, ``running_var`` *and* ``num_batches_tracked`` untouched and issues a
  ``RuntimeWarning`` naming the layer (Python's warning filter shows each distinct
  message once per process by default);
* ``"raise"``: raise ``FloatingPointError`` naming the layer, before anything is written.

The output of the batch is computed either way (it is the caller's loss that decides
what to do with a NaN output); only the running statistics are guarded. A module whose
option is ``None`` follows the process-wide default set by :func:`set_nonfinite_policy`
or, for a block of code, :func:`nonfinite_policy`. Only bnkit's layers are guarded: run
``bnkit.convert(model)`` first for a model built from ``torch.nn`` layers.

Layers are named in warnings and errors by their qualified name in a model (e.g.
``layer1.0.bn2``) once :func:`name_layers` has seen the model (``nonfinite_policy(...,
model=model)`` does it for you); otherwise by their class and size.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

__all__ = [
    "NONFINITE_POLICIES",
    "check_policy",
    "get_nonfinite_policy",
    "layer_label",
    "name_layers",
    "nonfinite_policy",
    "set_nonfinite_policy",
]

NONFINITE_POLICIES = ("propagate", "skip", "raise")
_default = "propagate"

# Attribute under which name_layers stores a layer's qualified name (a plain attribute,
# not a buffer: state_dict keys stay torch's).
_NAME_ATTR = "_bnkit_name"


def check_policy(policy: str | None) -> str | None:
    """Return ``policy`` if it is one of :data:`NONFINITE_POLICIES` or ``None``, else raise ``ValueError``."""
    if policy is not None and policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)} or None, got {policy!r}")
    return policy


def get_nonfinite_policy() -> str:
    """The process-wide default policy for modules created with ``nonfinite=None``."""
    return _default


def set_nonfinite_policy(policy: str) -> None:
    """Set the process-wide default policy (``"propagate"``, ``"skip"`` or ``"raise"``)."""
    global _default
    if policy is None:
        raise ValueError("the process-wide nonfinite policy cannot be None; use 'propagate' for torch's behaviour")
    check_policy(policy)
    _default = policy


def _is_guarded(module: nn.Module) -> bool:
    # bnkit's batch-norm modules (duck-typed: nonfinite lives below nn in the dependency order).
    return hasattr(module, "_commit_running_stats") and hasattr(module, "nonfinite")


def name_layers(model: nn.Module, prefix: str = "") -> list[str]:
    """Record each bnkit batch-norm layer's qualified name so warnings and errors can use it.

    Returns the names recorded. Calling it again (e.g. after wrapping the model) renames.
    Warns when the model holds torch batch-norm layers, which no policy can guard.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"name_layers expects an nn.Module, got {type(model).__name__}")
    names, unguarded = [], []
    for name, module in model.named_modules(prefix=prefix):
        if _is_guarded(module):
            setattr(module, _NAME_ATTR, name or type(module).__name__)
            names.append(name)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            unguarded.append(name or type(module).__name__)
    if unguarded:
        shown = ", ".join(unguarded[:5]) + (", ..." if len(unguarded) > 5 else "")
        warnings.warn(f"{len(unguarded)} batch-norm layer(s) are torch's and not guarded by the nonfinite "
                      f"policy ({shown}); call bnkit.convert(model) first", UserWarning, stacklevel=2)
    return names


def layer_label(module: nn.Module) -> str:
    """How warnings and errors name a layer: ``'layer1.bn (BatchNorm2d(64))'`` or ``'BatchNorm2d(64)'``."""
    what = f"{type(module).__name__}({getattr(module, 'num_features', '?')})"
    name = getattr(module, _NAME_ATTR, None)
    return f"{name} ({what})" if name else what


@contextlib.contextmanager
def nonfinite_policy(policy: str, model: nn.Module | None = None) -> Iterator[None]:
    """Use ``policy`` as the default inside a block (modules with an explicit option keep it).

    With ``model``, its bnkit layers are also named (see :func:`name_layers`) so that a
    warning or error says which layer of the model saw the bad batch.
    """
    global _default
    check_policy(policy)
    if model is not None:
        name_layers(model)
    previous = _default
    set_nonfinite_policy(policy)
    try:
        yield
    finally:
        _default = previous
