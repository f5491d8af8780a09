"""Backend dispatch: which implementation of the four primitives runs for a tensor.

The choice is explicit and visible:

* ``BNKIT_BACKEND=reference|cpu|triton|auto`` (read at call time, default ``auto``), or
  :func:`use_backend` as a context manager / :func:`set_backend` to override it in code;
* ``auto`` picks ``cpu`` (numba) for CPU tensors, ``triton`` for CUDA tensors when
  triton is installed, and ``reference`` otherwise or when the fast backend does not
  support the tensor (dtype, layout);
* :func:`last_backend` tells which backend ran most recently.

A backend that fails to load (numba or triton missing, compile error) falls back to the
reference with a single warning.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Callable, Iterator

from torch import Tensor

from bnkit.kernels.base import Backend
from bnkit.kernels.reference import ReferenceBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "available_backends",
    "backend_for",
    "get_backend",
    "last_backend",
    "set_backend",
    "use_backend",
]

BACKENDS = ("auto", "reference", "cpu", "triton")

# name -> "module:factory" for the lazily loaded fast backends.
_LOADERS: dict[str, str] = {
    "cpu": "bnkit.kernels.cpu:load_backend",
    "triton": "bnkit.kernels.triton:load_backend",
}

_reference = ReferenceBackend()
_loaded: dict[str, Backend | None] = {"reference": _reference}
_override: str | None = None
_last: str | None = None


def _requested() -> str:
    name = _override or os.environ.get("BNKIT_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"BNKIT_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def get_backend(name: str) -> Backend | None:
    """The backend called ``name``, loading it on first use; ``None`` if it cannot load."""
    if name in _loaded:
        return _loaded[name]
    if name not in _LOADERS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS[1:])}")
    module_name, factory = _LOADERS[name].split(":")
    backend: Backend | None
    try:
        loader: Callable[[], Backend] = getattr(importlib.import_module(module_name), factory)
        backend = loader()
    except Exception as exc:  # missing package or failed compile: one warning, then reference
        warnings.warn(
            f"bnkit: the {name!r} backend is unavailable ({type(exc).__name__}: {exc}); "
            "falling back to the reference implementation",
            RuntimeWarning,
            stacklevel=2,
        )
        backend = None
    _loaded[name] = backend
    return backend


def available_backends() -> list[str]:
    """Names of the backends that load on this machine."""
    return [n for n in BACKENDS[1:] if get_backend(n) is not None]


def _auto_name(x: Tensor) -> str:
    if x.device.type == "cpu":
        return "cpu"
    if x.device.type == "cuda":
        return "triton"
    return "reference"


def backend_for(x: Tensor) -> Backend:
    """The backend that will run for ``x`` under the current setting (and record it)."""
    global _last
    name = _requested()
    if name == "auto":
        name = _auto_name(x)
    backend = get_backend(name) if name != "reference" else _reference
    if backend is None or not backend.supports(x):
        backend = _reference
    _last = backend.name
    return backend


def last_backend() -> str | None:
    """Name of the backend that ran most recently (``None`` before the first call)."""
    return _last


def set_backend(name: str | None) -> None:
    """Override ``BNKIT_BACKEND`` in code; ``None`` returns control to the variable."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    _override = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with backend ``name`` (``reference``, ``cpu``, ``triton`` or ``auto``)."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous
