"""Backend dispatch: which implementation of the four primitives runs for a tensor.

The choice is explicit and visible:

* ``BNKIT_BACKEND=reference|cpu|triton|auto`` (read at call time, default ``auto``), or
  :func:`use_backend` as a context manager / :func:`set_backend` to override it in code;
* ``auto`` picks ``cpu`` (numba) for CPU tensors, ``triton`` for CUDA tensors when
  triton is installed, and ``reference`` otherwise or when the fast backend does not
  support the tensor (dtype, layout);
* :func:`last_backend` tells which backend ran most recently, and :func:`last_plan` which plan
  (named path: ``"train/small"``, ``"train/rows"``, ``"backward/fused"``, ``"eval/small"``, ...) the
  ``cpu`` backend ran; :func:`recorded_plans` collects every plan run inside a block;
* :func:`forced_road` runs a block on one road of the ``cpu`` backend whatever the plan would pick
  (the checked methods, or the one-call road without the small kernels), for tests and benchmarks
  that compare the roads.

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
    "ROADS",
    "Backend",
    "available_backends",
    "backend_for",
    "forced_road",
    "get_backend",
    "last_backend",
    "last_plan",
    "recorded_plans",
    "runs_cpu_backend",
    "set_backend",
    "use_backend",
]

BACKENDS = ("auto", "reference", "cpu", "triton")
# the roads forced_road may force (docs/design.md, "The road of a tensor")
ROADS = ("checked", "planned")

# name -> "module:factory" for the lazily loaded fast backends.
_LOADERS: dict[str, str] = {
    "cpu": "bnkit.kernels.cpu:load_backend",
    "triton": "bnkit.kernels.triton:load_backend",
}

_reference = ReferenceBackend()
_loaded: dict[str, Backend | None] = {"reference": _reference}
_override: str | None = None
_last: str | None = None
_plan: str | None = None
_plan_log: list[str] | None = None
# the road forced_road holds (None: the plan picks); read by the cpu backend's check and its plan's
# one_call_path, so that a call pays one module attribute read for it
_road: str | None = None


# os.environ's own dict (bytes keys on POSIX): a lookup there costs 0.05 us, os.environ.get 0.9,
# which is a tenth of a small eval call. os.environ keeps it current; where it is missing, get().
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("BNKIT_BACKEND") if hasattr(os.environ, "encodekey") else None
# raw setting -> backend name, for the settings seen so far (invalid ones are never stored)
_PARSED: dict[str, str] = {}


def _env_setting() -> str:
    if isinstance(_ENV_DATA, dict) and _ENV_KEY is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        return "auto" if raw is None else os.environ.decodevalue(raw)
    return os.environ.get("BNKIT_BACKEND", "auto")


def _requested() -> str:
    raw = _override or _env_setting()
    name = _PARSED.get(raw)
    if name is None:
        name = raw.strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"BNKIT_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
        if len(_PARSED) < 64:
            _PARSED[raw] = name
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


def runs_cpu_backend() -> bool:
    """Whether the current setting runs the ``cpu`` backend on CPU tensors (recorded if so).

    For the cpu backend's one-call road (:func:`bnkit.autograd.one_call`), which runs its kernels
    directly once :meth:`~bnkit.kernels.cpu.backend.CpuBackend.check` has checked the tensors.
    """
    global _last
    name = _requested()
    if name not in ("auto", "cpu") or get_backend("cpu") is None:
        return False
    _last = "cpu"
    return True


def last_backend() -> str | None:
    """Name of the backend that ran most recently (``None`` before the first call)."""
    return _last


def last_plan() -> str | None:
    """Name of the plan the ``cpu`` backend ran most recently (``None`` before the first call).

    A plan is ``"<pass>/<path>"``: the pass (``train``, ``backward``, ``eval``, ``eval_backward``,
    ``reduce``, ``affine``; ``act_forward``, ``act_backward`` for the fused activations) and the path its
    kernels took (``small``, ``small_parallel``, ``rows``, ``groups``, ``long``, ``nsc``, ``fused``,
    ``half``, ``ncs``, ``channels``, ...). ``docs/design.md`` lists what picks each.
    """
    return _plan


@contextlib.contextmanager
def recorded_plans() -> Iterator[list[str]]:
    """Collect the name of every plan the ``cpu`` backend runs inside the block (see :func:`last_plan`)."""
    global _plan_log
    previous = _plan_log
    log: list[str] = []
    _plan_log = log
    try:
        yield log
    finally:
        _plan_log = previous
        if previous is not None:
            previous.extend(log)


@contextlib.contextmanager
def forced_road(road: str | None) -> Iterator[None]:
    """Run a block on one road of the ``cpu`` backend, whatever the plan would pick for its inputs.

    * ``"checked"``: the one-call road declines every call; each takes the checked methods
      (``forward_train``, ``backward_train``, ...) behind the autograd Functions.
    * ``"planned"``: the one-call road takes the calls it accepts at every size, never on the small
      kernels, with a graph or without: training runs a planned path (``train/rows``, ``backward/fused``,
      ...), the eval forward its one kernel (``eval/small``, ``eval/half``) and the eval backward
      the backend's (``eval_backward/ncs``, ...).
    * ``None``: the road around the block (outside any ``forced_road``, the one the plan picks), so that a
      parametrized test may pass its default as a value.

    The numbers of each road are the ones it gives when the plan picks it; :func:`last_plan` and
    :func:`recorded_plans` name what ran. Blocks nest, and each restores the road before it on exit,
    also when the block raises. Not thread-safe: the setting is process-wide, so calls that other threads
    make during the block take its road too, and blocks that two threads open at once may restore each
    other's road. Raises ``ValueError`` for another value.
    """
    global _road
    if road is not None and road not in ROADS:
        raise ValueError(f"road must be one of {', '.join(ROADS)} or None, got {road!r}")
    previous = _road
    if road is not None:
        _road = road
    try:
        yield
    finally:
        _road = previous


def ran_plan(name: str) -> None:
    """Record that the ``cpu`` backend ran plan ``name`` (called by the backend, once per pass)."""
    global _plan
    _plan = name
    if _plan_log is not None:
        _plan_log.append(name)


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
