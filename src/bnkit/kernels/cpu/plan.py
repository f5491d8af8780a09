"""How the ``cpu`` backend cuts the work: thread counts, memory layouts, and the plan of a call.

A plan names the path the kernels take (``bnkit.kernels.last_plan()`` reports it as ``"<pass>/<path>"``):
the small kernels (:func:`one_call_path`) or, for larger inputs and 16-bit data, a planned path of
:func:`train_plan` / :func:`backward_plan` (``groups``, ``rows``, ``long``, ``nsc``, ``fused``), with the
parameters its kernels take (tasks, parts, groups, normalize tables). The thresholds are module
constants, the plan's decisions; :func:`bnkit.kernels.forced_road` forces a road without them. Pure
Python, no kernels: editing a plan never invalidates numba's cache. ``docs/design.md`` lists the plans
and what picks them.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch
from torch import Tensor

from bnkit import kernels as _dispatch

__all__ = [
    "BACKWARD_FUSED_MIN_S",
    "FUSE_NCS",
    "GROUP_BYTES",
    "GROUP_MAX_S",
    "GROUP_RUN_BYTES",
    "MIN_TASK",
    "ONE_CALL_NUMEL",
    "ROW_STATS_MAX_S",
    "SERIAL_NUMEL",
    "SHORT_ROW_S",
    "SHORT_ROW_TABLE",
    "SMALL_GRAD_NUMEL",
    "SMALL_NUMEL",
    "SMALL_SERIAL_NUMEL",
    "TASKS_PER_THREAD",
    "backward_plan",
    "channel_group",
    "layout_of",
    "one_call_path",
    "threads",
    "train_plan",
]


# dtype -> (dtype of the raw view handed to numba, statistics dtype as numpy)
_VIEW: dict[torch.dtype, tuple[torch.dtype, type]] = {
    torch.float32: (torch.float32, np.float32),
    torch.float64: (torch.float64, np.float64),
    torch.bfloat16: (torch.uint16, np.float32),
    torch.float16: (torch.int16, np.float32),
}


# dtype -> numpy dtype of the per-channel mean/scale/shift the normalization uses: float64, so a
# float32/float64 output is rounded once; float32 for 16-bit data (see bnkit.kernels.cpu)
_NORM: dict[torch.dtype, type] = {
    torch.float32: np.float64,
    torch.float64: np.float64,
    torch.bfloat16: np.float32,
    torch.float16: np.float32,
}


# Below this many elements one thread beats waking the others.
SERIAL_NUMEL = 1 << 15


# Aim for this many parallel tasks per thread (load balance on a shared machine).
TASKS_PER_THREAD = 4


# Do not cut work finer than this many elements per task.
MIN_TASK = 4096


# Channel-major training forward: normalize each channel right after its statistics, while
# it is in cache (True), or in a second streaming pass in memory order (False).
FUSE_NCS = True


# Channel-major rows shorter than this are read in memory order for the statistics (short
# scattered rows defeat the prefetcher), then normalized in a second streaming pass; the training
# backward reduces and writes each channel from cache from BACKWARD_FUSED_MIN_S values per row on
# (the crossovers measured between 14x14 and 28x28 rows; benchmarks/results/decisions.md).
ROW_STATS_MAX_S = 256
BACKWARD_FUSED_MIN_S = 128


# float32/float64 channel-major rows of SHORT_ROW_S < S < GROUP_MAX_S values: the training forward
# takes groups of channels (ncs_train_groups) when a group's values fit in GROUP_BYTES (a fifth of
# the 2 MB L2, which also takes the output) and its rows of one sample make runs of at least
# GROUP_RUN_BYTES (shorter runs defeat the prefetcher as single rows do). Shorter runs keep the old
# paths, and so does 16-bit data (its old paths sum in 16-wide vector code, which groups would lose).
GROUP_MAX_S = 512
GROUP_BYTES = 400 * 1024
GROUP_RUN_BYTES = 4096


# Channel-major rows of at most this many values are normalized by ncs_affine_short (one loop per
# sample over constants repeated per position) when a sample's C*S values are at most
# SHORT_ROW_TABLE (the four repeated tables stay in cache): faster than ncs_affine's row ranges on rows
# of 16 values, slower from 49 on.
SHORT_ROW_S = 16
SHORT_ROW_TABLE = 1 << 15
_numba_state = threading.local()


def layout_of(x: Tensor) -> tuple[str, int, int, int] | None:
    """``(order, N, C, S)`` when ``x`` is a dense buffer the kernels can index, else ``None``.

    ``order`` is ``"ncs"`` (contiguous ``(N, C, *)``) or ``"nsc"`` (channels innermost:
    channels_last, ``(N, C)``, or an ``(N, C, L)`` view of ``(N, L, C)`` memory). The answer
    depends on the shape and strides only; it is remembered per ``(shape, strides)`` (a call
    on a small tensor costs microseconds, and the same shapes come back every step).
    """
    key = (x.shape, x.stride())
    try:
        lay = _LAYOUTS.get(key, _UNKNOWN)
    except TypeError:  # symbolic sizes do not hash
        return _layout_uncached(x)
    if lay is _UNKNOWN:
        lay = _layout_uncached(x)
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            _LAYOUTS.clear()
        _LAYOUTS[key] = lay
    return lay


_LAYOUTS: dict = {}
_LAYOUTS_MAX = 1024
_UNKNOWN = object()


def _layout_uncached(x: Tensor) -> tuple[str, int, int, int] | None:
    if x.dim() < 2 or x.numel() == 0:
        return None
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    # With S == 1 (or C == 1) both orders describe the same memory; prefer the one that vectorizes.
    orders = ("nsc", "ncs") if s == 1 else ("ncs", "nsc")
    for order in orders:
        if order == "ncs" and x.is_contiguous():
            return order, n, c, s
        if order == "nsc" and x.movedim(1, -1).is_contiguous():
            return order, n, c, s
    return None


# torch dtype -> numpy dtype, for the dtypes numpy has
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def threads(numel: int) -> int:
    """Set numba's thread count for this launch: torch's count, or one for small inputs."""
    nt = 1 if numel < SERIAL_NUMEL else max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    # numba.get_num_threads() costs several microseconds; remember what this thread last set
    # (numba's count is per thread). Code that calls numba.set_num_threads itself is not seen.
    if getattr(_numba_state, "nt", None) != nt:
        numba.set_num_threads(nt)
        _numba_state.nt = nt
    return nt


def _ncs_parts(nt: int, c: int, m: int) -> int:
    """How many parts to cut each channel into so ``c * parts`` tasks fill ``nt`` threads."""
    if nt == 1 or c >= TASKS_PER_THREAD * nt:
        return 1
    return max(1, min(-(-TASKS_PER_THREAD * nt // c), m // MIN_TASK))


def channel_group(nt: int, n: int, c: int, s: int, itemsize: int) -> int:
    """Channels per task of :func:`bnkit.kernels.cpu.passes.ncs_train_groups`, or 0 to keep the other paths."""
    if s >= GROUP_MAX_S or s <= SHORT_ROW_S:
        return 0
    g = min(GROUP_BYTES // (n * s * itemsize), c // (TASKS_PER_THREAD * nt) if nt > 1 else c)
    return g if g >= 1 and g * s * itemsize >= GROUP_RUN_BYTES else 0


# The training forward's paths (train_plan): groups of channels, short rows streamed twice, channels
# innermost, long rows (fused per channel, or channels cut in parts). The names are those that
# bnkit.kernels.last_plan() reports after "train/".
PATH_GROUPS, PATH_ROWS, PATH_NSC, PATH_LONG = "groups", "rows", "nsc", "long"


def train_plan(nt: int, order: str, n: int, c: int, s: int, dtype: torch.dtype) -> tuple:
    """``(path, G, P, fuse, TA, Q, tab)`` of the training forward on ``(order, n, c, s)`` memory with ``nt``
    threads: which kernel runs (``PATH_*``), its channels per group ``G``, parts ``P`` and ``fuse``
    flag, and the normalize plan of :func:`_ncs_affine_plan` (``TA``, ``Q``, ``tab``; unused ones
    ``(0, 1, no table)``). One decision for :meth:`CpuBackend.forward_train` and the one-call road."""
    norm = _NORM[dtype]
    none = (0, 1, np.empty((4, 0), norm))
    if order == "ncs":
        g = channel_group(nt, n, c, s, dtype.itemsize) if dtype in _NUMPY_DTYPES else 0
        if g:
            return (PATH_GROUPS, g, 1, False, *none)
        if s < ROW_STATS_MAX_S:  # short rows: stream them in memory order, twice
            return (PATH_ROWS, 0, _nsc_parts(nt, n * c, s), False, *_ncs_affine_plan(nt, n, c, s, norm))
        p = _ncs_parts(nt, c, n * s)
        fuse = p == 1 and FUSE_NCS  # else few channels cut in parts: merged, then normalized
        return (PATH_LONG, 0, p, fuse, *(none if fuse else _ncs_affine_plan(nt, n, c, s, norm)))
    return (PATH_NSC, 0, _nsc_parts(nt, n * s, c), False, *none)


# The training backward's paths other than PATH_NSC (backward_plan): each channel (or group of channels)
# reduced and written from cache, or short rows in two streaming passes
PATH_FUSED = "fused"


def backward_plan(nt: int, order: str, n: int, c: int, s: int, dtype: torch.dtype) -> tuple:
    """``(path, G, T, TA, Q, tab)`` of the training backward on ``(order, n, c, s)`` memory: ``PATH_FUSED``
    (channels per task ``G``), ``PATH_ROWS`` (``T`` row ranges for the reduction, then the normalize
    plan ``TA``, ``Q``, ``tab``) or ``PATH_NSC`` (``T`` row ranges). One decision for
    :meth:`CpuBackend.backward_train` and the one-call road."""
    sd = _VIEW[dtype][1]
    none = (0, 1, np.empty((4, 0), sd))
    if order == "nsc":
        return (PATH_NSC, 1, _nsc_parts(nt, n * s, c), *none)
    # groups of short rows as in the forward, sized for two tensors (dy and x)
    g = channel_group(nt, n, c, s, 2 * dtype.itemsize) if dtype in _NUMPY_DTYPES else 0
    if g or (s >= BACKWARD_FUSED_MIN_S and _ncs_parts(nt, c, n * s) == 1):
        return (PATH_FUSED, max(g, 1), 1, *none)
    return (PATH_ROWS, 1, _nsc_parts(nt, n * c, s), *_ncs_affine_plan(nt, n, c, s, sd))


# path -> the plan name bnkit.kernels.last_plan() reports for it
_TRAIN_NAMES = {p: "train/" + p for p in (PATH_GROUPS, PATH_ROWS, PATH_NSC, PATH_LONG)}
_BACKWARD_NAMES = {p: "backward/" + p for p in (PATH_FUSED, PATH_ROWS, PATH_NSC)}


def _ncs_affine_plan(nt: int, n: int, c: int, s: int, dtype) -> tuple[int, int, np.ndarray]:
    """``(T, Q, tab)`` of :func:`bnkit.kernels.cpu.passes.ncs_affine_any` for ``(n, c, s)`` memory: the constant
    tables of ``ncs_affine_short`` (rows of at most SHORT_ROW_S values), or none (ranges of rows)."""
    if s <= SHORT_ROW_S and c * s <= SHORT_ROW_TABLE:
        return 0, _row_segments(nt, n, c * s), np.empty((4, c * s), dtype)
    return _nsc_parts(nt, n * c, s), _row_segments(nt, n * c, s), np.empty((4, 0), dtype)


def _row_segments(nt: int, rows: int, s: int) -> int:
    """How many segments to cut each of ``rows`` contiguous rows of ``s`` values into."""
    if nt == 1 or rows >= TASKS_PER_THREAD * nt:
        return 1
    return max(1, min(-(-TASKS_PER_THREAD * nt // rows), s // MIN_TASK))


def _nsc_parts(nt: int, r: int, c: int) -> int:
    """How many row ranges to cut ``r`` rows of ``c`` channels into."""
    if nt == 1:
        return 1
    return max(1, min(r, TASKS_PER_THREAD * nt, (r * c) // MIN_TASK))


# Inputs of at most SMALL_NUMEL elements take the small kernels; calls that record a graph (a backward
# follows) only up to SMALL_GRAD_NUMEL: above it the planned paths' in-cache fused backward wins. Up to
# ONE_CALL_NUMEL elements (every size) calls take the one-call road at all (check). Up to SMALL_SERIAL_NUMEL
# elements the small kernels run serially (waking a second thread costs more than it saves); above, their
# parallel twins take TASKS_PER_THREAD ranges of rows per thread.
SMALL_NUMEL = 1 << 20
SMALL_GRAD_NUMEL = 1 << 19
ONE_CALL_NUMEL = 1 << 62
SMALL_SERIAL_NUMEL = 1 << 15


def one_call_path(dtype: torch.dtype, numel: int, graph: bool) -> str:
    """``"small"`` when a one-call pass on ``numel`` elements of ``dtype`` takes the small kernels, else
    ``"planned"`` (the path of :func:`train_plan` / :func:`backward_plan`): 16-bit data, or more than
    ``SMALL_NUMEL`` elements (``SMALL_GRAD_NUMEL`` when a graph is recorded), or inside
    ``bnkit.kernels.forced_road("planned")``."""
    if dtype in _RAW16 or _dispatch._road == "planned" or numel > (SMALL_GRAD_NUMEL if graph else SMALL_NUMEL):
        return "planned"
    return "small"


# 16-bit dtype -> a zero of the raw type its kernels read (as the checked road's views)
_RAW16 = {torch.bfloat16: np.uint16(0), torch.float16: np.int16(0)}
