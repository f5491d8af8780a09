"""Compile bnkit's CPU kernels ahead of time (``bnkit warmup``), for Docker images, CI and new machines.

numba compiles a kernel on its first call for each dtype and keeps it in its on-disk cache; a process that
finds the cache filled starts in well under a second. :func:`warmup` runs every path of the CPU kernels
once, through the public layers and the ``cpu`` backend's primitives, on inputs chosen so that each plan
(small inputs, serial and parallel; groups of short rows; short rows with and without tables; long rows,
fused or in parts; channels innermost: channels_last, ``(N, C)``, an ``(N, C, L)`` view; the fused
BN+activation kernels) runs in each mode (training forward and backward, eval, eval with a graph).
The calls go through the same plan functions as a user's, so the list follows the code: a new path is
compiled as soon as one of these inputs reaches it. It lives in ``utils`` because it drives the ``nn``
layers; the kernels package only announces a compile (:mod:`bnkit.kernels.compiling`).

numba compiles on one core, under one lock per process. With ``jobs > 1`` the steps run in that many worker
processes, in parts (a dtype's layer steps, its backend steps, its fused-activation steps), so two cores
compile two parts at once. A dtype's backend and activation parts start after its layer part: they run
drivers the layer steps compile, and two workers would otherwise each compile them. The workers share
numba's cache directory; numba saves an entry by reading the index file, adding the entry and writing it
back, so two processes saving entries of one kernel at once could each name the same data file. Each worker
therefore holds an exclusive lock on a file in the cache directory (``fcntl.flock``) while it saves; where
``fcntl`` is missing the steps run in this process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DTYPES", "WarmupReport", "warmup"]

DTYPES = ("float32", "float64", "bfloat16")

# name -> (shape, channels_last, (N, C, L) view of (N, L, C) memory): one input per plan of the kernels
# (the plan functions of bnkit.kernels.cpu.plan decide; these sizes land in each on any thread count >= 2)
_INPUTS: dict[str, tuple[tuple[int, ...], bool, bool]] = {
    "small": ((16, 16, 8, 8), False, False),
    "small, parallel": ((32, 32, 16, 16), False, False),
    "small, channels_last": ((16, 16, 8, 8), True, False),
    "groups of short rows": ((64, 64, 14, 14), False, False),
    "short rows, tables": ((1024, 64, 4, 4), False, False),
    "short rows": ((256, 64, 8, 8), False, False),
    "long rows": ((8, 16, 64, 128), False, False),
    "long rows in parts": ((2, 2, 512, 512), False, False),
    "channels_last": ((64, 64, 16, 16), True, False),
    "(N, C)": ((8192, 128), False, False),
    "(N, C, L) view": ((64, 128, 128), False, True),
    "(N, C, L)": ((64, 128, 128), False, False),
}


@dataclass(frozen=True)
class WarmupReport:
    """What :func:`warmup` did: the dtypes, the number of steps run, the time it took and in how many processes."""

    dtypes: tuple[str, ...]
    steps: int
    seconds: float
    compiled: tuple[str, ...]  # dtypes whose kernels had to compile (the others came from numba's cache)
    jobs: int = 1  # processes that ran the steps


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).strip(), None)
    if not isinstance(dt, torch.dtype) or dt not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"dtypes must be float32, float64, bfloat16 or float16, got {name!r}")
    return dt


def _input(name: str, dtype: torch.dtype) -> torch.Tensor:
    shape, channels_last, view = _INPUTS[name]
    if view:  # (N, C, L) view of (N, L, C) memory
        n, c, length = shape
        return torch.randn(n, length, c).to(dtype).transpose(1, 2)
    x = torch.randn(shape).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _layer_steps(x: torch.Tensor) -> None:
    """The module in every mode: training forward + backward, training without a graph, eval, eval + backward;
    with and without affine parameters."""
    from bnkit import nn as bnn

    cls = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d}[x.dim()]
    for affine in (True, False):
        m = cls(x.shape[1], affine=affine).to(x.dtype)
        xg = x.detach().requires_grad_()
        m(xg).sum().backward()
        with torch.no_grad():
            m(x)
        m.eval()
        with torch.no_grad():
            m(x)
        m(xg).sum().backward()


def _backend_steps(x: torch.Tensor) -> None:
    """The ``cpu`` backend's primitives (the road of calls the one-call path does not take)."""
    from bnkit import kernels
    from bnkit.reference import stats_dtype

    be = kernels.get_backend("cpu")
    if be is None or not be.supports(x):
        return
    sd = stats_dtype(x.dtype)
    c = x.shape[1]
    w, b = torch.rand(c, dtype=sd) + 0.5, torch.randn(c, dtype=sd)
    dy = torch.randn_like(x, dtype=torch.float32).to(x.dtype)
    for weight, bias in ((w, b), (None, None)):
        y, mean, var = be.forward_train(x, weight, bias, 1e-5)
        invstd = (var + 1e-5).rsqrt()
        scale = invstd if weight is None else invstd * weight
        shift = torch.zeros(c, dtype=sd) if bias is None else bias
        be.forward_eval(x, mean, scale, shift)
        running = getattr(be, "forward_eval_running", None)  # optional fused method (the cpu backend's)
        if running is not None:
            running(x, mean, var, weight, bias, 1e-5)
        be.backward_train(dy, x, mean, invstd, weight)
        be.backward_eval(dy, x, mean, scale, invstd)
    be.backward_reduce(dy, x, mean)
    be.backward_input(dy, x, mean, scale, invstd, shift)


def _act_steps(dtype: torch.dtype) -> None:
    """The fused BN+activation kernels (float32/float64): per channel and per row, standard and memory saving."""
    from bnkit.nn import BatchNormAct2d

    for shape in ((16, 16, 8, 8), (64, 2, 32, 32)):
        for activation, memory_saving in (("relu", False), ("leaky_relu", True), ("elu", True)):
            m = BatchNormAct2d(shape[1], activation=activation, memory_saving=memory_saving).to(dtype)
            x = torch.randn(shape, dtype=dtype, requires_grad=True)
            m(x).sum().backward()
            m.eval()
            m(x).sum().backward()


_PARTS = ("layers", "activation", "backend")


def _part_steps(dt: torch.dtype, part: str) -> list[tuple[str, Callable[[], None]]]:
    """The steps of one part of the warm-up for one dtype (a worker's unit of work)."""
    label = str(dt).replace("torch.", "")
    if part == "layers":
        return [(f"{label}: {n}", lambda n=n, d=dt: _layer_steps(_input(n, d))) for n in _INPUTS]
    if part == "backend":
        return [(f"{label}: {n}, backend", lambda n=n, d=dt: _backend_steps(_input(n, d))) for n in _INPUTS]
    if dt in (torch.float32, torch.float64):
        return [(f"{label}: batch norm + activation", lambda d=dt: _act_steps(d))]
    return []


def _steps(dtypes: Sequence[torch.dtype]) -> list[tuple[str, Callable[[], None]]]:
    return [step for dt in dtypes for part in _PARTS for step in _part_steps(dt, part)]


def _parts(dtypes: Sequence[torch.dtype]) -> list[tuple[str, str]]:
    # the order in which workers take the parts, longest first: every dtype's layer steps (float32 before
    # float64 before bfloat16), then the fused-activation steps, then the backend steps (their drivers are
    # compiled by then: a second or so each), which fill the end of the worker that is done first
    return [(str(dt).replace("torch.", ""), part) for part in _PARTS for dt in dtypes if _part_steps(dt, part)]


def _ready(part: tuple[str, str], done: set[tuple[str, str]]) -> bool:
    # a dtype's backend and activation steps run the drivers its layer steps compile (the planned paths,
    # the small kernels): they wait until those are in the cache rather than compile them a second time
    dtype, kind = part
    return kind == "layers" or (dtype, "layers") in done


def _run(steps: list[tuple[str, Callable[[], None]]], on_step: Callable[[int, int, str], None] | None,
         first: int = 0, total: int | None = None) -> None:
    import numba

    from bnkit.kernels import compiling

    threads = torch.get_num_threads()
    try:
        if threads < 2 <= numba.config.NUMBA_NUM_THREADS:
            torch.set_num_threads(2)  # the parallel kernels' plans need two threads
        with compiling.quiet(), torch.random.fork_rng():
            torch.manual_seed(0)
            for i, (label, step) in enumerate(steps):
                if on_step is not None:
                    on_step(first + i, total or len(steps), label)
                step()
    finally:
        torch.set_num_threads(threads)


def _lock_cache_saves(lock_path: str) -> None:
    """Make numba's cache saves in this process hold an exclusive lock on ``lock_path`` (see the module
    docstring: the read-modify-write of a kernel's index file)."""
    import fcntl

    from numba.core import caching

    save = caching.IndexDataCacheFile.save
    if getattr(save, "bnkit_lock", None) == lock_path:
        return  # a worker runs several parts: wrapped once

    def locked_save(self, key, data):
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return save(self, key, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    locked_save.bnkit_lock = lock_path
    caching.IndexDataCacheFile.save = locked_save


def _run_part(dtype: str, part: str, lock_path: str) -> tuple[list[str], list[str]]:
    """A worker's unit: run one part, return its step labels and the dtypes it had to compile."""
    from bnkit.kernels import compiling

    _lock_cache_saves(lock_path)
    steps = _part_steps(_dtype(dtype), part)
    _run(steps, None)
    return [label for label, _ in steps], sorted(compiling.compiled_dtypes())


def _exit_without_teardown() -> None:
    """A worker's initializer: at exit it ends the process at once (``os._exit``). The interpreter's teardown
    of everything numba built while compiling takes seconds, and a worker has nothing left to finish then:
    numba wrote and closed each cache file when it compiled, and the parent has every part's result."""
    import atexit
    import sys

    def end() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    atexit.register(end)


def _default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_in_workers(dts: Sequence[torch.dtype], jobs: int, on_step: Callable[[int, int, str], None] | None,
                    total: int) -> set[str]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from bnkit.kernels.cpu.cache import cache_dir, ensure_fresh

    ensure_fresh()  # once, here: no worker may find the cache stale while another fills it
    where = cache_dir()
    lock_path = str((where if where is not None else Path(os.getcwd())) / "bnkit-warmup.lock")
    compiled: set[str] = set()
    done = 0
    if on_step is not None:
        on_step(0, total, f"starting {jobs} worker processes")
    waiting, running, finished = _parts(dts), {}, set()
    # spawn, not fork: forking a process whose OpenMP and numba thread pools may already run is unsafe
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_exit_without_teardown) as pool:
        while waiting or running:
            for part in [p for p in waiting if _ready(p, finished)][: jobs - len(running)]:
                waiting.remove(part)
                running[pool.submit(_run_part, *part, lock_path)] = part
            ended, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in ended:
                finished.add(running.pop(future))
                labels, part_compiled = future.result()
                compiled.update(part_compiled)
                for label in labels:
                    done += 1
                    if on_step is not None and done < total:
                        on_step(done, total, label)
    return compiled


def warmup(
    dtypes: Sequence[str | torch.dtype] = DTYPES,
    on_step: Callable[[int, int, str], None] | None = None,
    jobs: int = 1,
) -> WarmupReport:
    """Compile (or load from numba's cache) every CPU kernel bnkit may run for ``dtypes`` on this machine.

    ``on_step(done, total, label)`` reports progress: ``done`` counts from 0 up to ``total``, ``label`` names
    the step that starts (in this process) or that a worker just finished, and a last call has
    ``done == total`` and ``label == "done"``. Kernels already in numba's cache only load; the report says
    which dtypes had to compile. ``jobs`` worker processes share the steps (``0``: one per CPU this process
    may run on; see the module docstring); with ``jobs=1`` everything runs in this process, whose
    dispatchers are then compiled too. Torch's thread count is raised to 2 for the duration where numba has
    2 threads, so the parallel kernels compile even on a process set to one thread.
    """
    from bnkit.kernels import compiling

    dts = [_dtype(d) for d in dtypes]
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 0:
        raise ValueError(f"jobs must be a non-negative int (0: one per CPU), got {jobs!r}")
    jobs = jobs or _default_jobs()
    steps = _steps(dts)
    try:
        import fcntl  # noqa: F401  (the workers' lock)
    except ImportError:
        jobs = 1
    jobs = min(jobs, len(_parts(dts)))
    before = compiling.compiled_dtypes()
    start = time.perf_counter()
    if jobs > 1:
        compiled = _run_in_workers(dts, jobs, on_step, len(steps))
    else:
        _run(steps, on_step)
        compiled = set(compiling.compiled_dtypes() - before)
    seconds = time.perf_counter() - start
    if on_step is not None:
        on_step(len(steps), len(steps), "done")
    return WarmupReport(tuple(str(d).replace("torch.", "") for d in dts), len(steps), seconds,
                        tuple(sorted(compiled)), jobs)
