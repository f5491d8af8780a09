"""Says when a call has to compile CPU kernels, once per dtype, instead of stalling silently.

numba compiles a kernel on its first call for a new dtype unless its on-disk cache has it; on 2 cores
that takes seconds per kernel. :func:`announce_compiles` (called by :mod:`bnkit.kernels.cpu.half`, which every
kernel module imports first) registers a listener on numba's ``numba:compile`` event, which numba raises
only when the cache misses. The first miss of a bnkit kernel for a dtype logs one line on the ``bnkit``
logger::

    bnkit: compiling CPU kernels for float32 (one time, ~5 s per kernel; cached on disk, ...)

Logging rather than :mod:`warnings`: the message is news, not a problem with the caller's code, so it must
not turn into an error under ``-W error`` or ``filterwarnings=error`` (test suites), and it must show without
configuration: it is logged at WARNING, which Python prints to stderr when no handler is set up.
``logging.getLogger("bnkit").setLevel(logging.ERROR)`` silences it; :func:`quiet` does for a block
(``bnkit warmup`` shows a progress bar instead).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["SECONDS_PER_KERNEL", "announce_compiles", "compiled_dtypes", "quiet"]

_log = logging.getLogger("bnkit")

# A kernel's compile time on a cold cache on 2 cores (1-7 s each, most near 5).
SECONDS_PER_KERNEL = 5
_PACKAGE = __name__.rpartition(".")[0] + "."  # "bnkit.kernels."
# numba scalar type name -> torch dtype name (16-bit data arrives as raw bits)
_DTYPES = {"float32": "float32", "float64": "float64", "uint16": "bfloat16", "int16": "float16"}

_compiled: set[str] = set()  # dtypes whose kernels this process compiled
_announced: set[str] = set()  # dtypes it said so for
_quiet = 0
_registered = False


def _dtype_of(args) -> str | None:
    """The data dtype a compile is for: that of the first array or float (or 16-bit) scalar argument."""
    from numba.core import types

    for a in args:
        t = a.dtype if isinstance(a, types.Array) else a
        if isinstance(t, types.Float) or (isinstance(t, types.Integer) and t.bitwidth == 16):
            return _DTYPES.get(str(t))
        if isinstance(a, types.Array):
            return None
    return None


def _on_compile(dispatcher, args) -> None:
    if not getattr(getattr(dispatcher, "py_func", None), "__module__", "").startswith(_PACKAGE):
        return
    dtype = _dtype_of(args)
    if dtype is None:
        return
    _compiled.add(dtype)
    if not _quiet and dtype not in _announced:
        _announced.add(dtype)
        _log.warning(
            "bnkit: compiling CPU kernels for %s (one time, ~%d s per kernel; cached on disk, and "
            "`bnkit warmup` compiles them all ahead of time)",
            dtype,
            SECONDS_PER_KERNEL,
        )


def announce_compiles() -> None:
    """Register the listener (once per process)."""
    global _registered
    if _registered:
        return
    from numba.core import event

    class _Notice(event.Listener):
        # Only a compile that no other compile is under: its helpers compile with their own argument
        # types (float64 sums of float32 data). numba holds one global lock over every compile.
        depth = 0

        def on_start(self, ev) -> None:
            if self.depth == 0:
                data = ev.data or {}
                _on_compile(data.get("dispatcher"), data.get("args", ()))
            self.depth += 1

        def on_end(self, ev) -> None:
            self.depth -= 1

    event.register("numba:compile", _Notice())
    _registered = True


def compiled_dtypes() -> frozenset[str]:
    """The dtypes whose kernels this process has compiled (not loaded from the cache) so far."""
    return frozenset(_compiled)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Compile without the notice inside the block (the caller reports progress itself, or the compile is a
    probe of a second); a later compile for the same dtype still says so."""
    global _quiet
    _quiet += 1
    try:
        yield
    finally:
        _quiet -= 1
