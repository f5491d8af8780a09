"""The ``cpu`` backend: numba kernels, in modules split by role.

* :mod:`~bnkit.kernels.cpu.plan`: thread counts, memory layouts, the plan of a call and its thresholds;
* :mod:`~bnkit.kernels.cpu.backend`: :class:`~bnkit.kernels.cpu.backend.CpuBackend`, the launcher
  (the checked road and the one-call road);
* :mod:`~bnkit.kernels.cpu.passes`: the kernels of every pass (statistics, normalize, reductions,
  the running-statistics update) on numpy arrays;
* :mod:`~bnkit.kernels.cpu.drivers`: the small kernels and the one-call drivers on raw addresses;
* :mod:`~bnkit.kernels.cpu.half`: the bfloat16/float16 loads, stores and 16-wide loops;
* :mod:`~bnkit.kernels.cpu.act`: fused batch norm + activation kernels on raw addresses;
* :mod:`~bnkit.kernels.cpu.cache`: the check that keeps numba's on-disk cache of these modules fresh.

Importing a kernel module does not load the backend; :func:`load_backend` does (for
:func:`bnkit.kernels.get_backend`).
"""

from __future__ import annotations

from bnkit.kernels.base import Backend

__all__ = ["load_backend"]


def load_backend() -> Backend:
    """The ``cpu`` backend, its threading layer started (:func:`bnkit.kernels.cpu.backend.load_backend`)."""
    from bnkit.kernels.cpu.backend import load_backend as load

    return load()
