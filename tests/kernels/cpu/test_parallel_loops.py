"""The parallel kernels whose one ``prange`` loop serves several kinds of task stay parallel.

numba runs a ``prange`` loop it cannot convert as a plain serial loop, and says so only when the whole
function has no parallel loop left. These kernels pick the task's kind inside one loop (each prange loop
compiles into a parallel function of its own, so fewer loops compile faster): each is compiled afresh here,
without the on-disk cache, and numba's own record of the parallel loops it made is counted.
"""

from __future__ import annotations

import numba
import numpy as np

from bnkit.kernels.cpu import drivers, passes


def _compile_afresh(kernel):
    """``kernel`` as a new dispatcher with its options, without the on-disk cache."""
    options = {k: v for k, v in kernel.targetoptions.items() if k in ("fastmath", "error_model")}
    return numba.njit(parallel=passes.PRANGE_ONLY, **options)(kernel.py_func)


def _parallel_loops(fresh) -> int:
    """How many parallel loops numba made of the one specialization of ``fresh``."""
    (compiled,) = fresh.overloads.values()
    return len(compiled.metadata["parfor_diagnostics"].initial_parfors)


def _addr(a: np.ndarray) -> int:
    return a.ctypes.data


def test_ncs_affine_is_one_parallel_loop():
    N, C, S = 2, 4, 9
    x = np.random.default_rng(0).standard_normal(N * C * S)
    a, mean, k, shift = (np.random.default_rng(i).standard_normal(C) for i in range(4))
    kernel = _compile_afresh(passes.ncs_affine)
    expect = (k[None, :, None] * (x.reshape(N, C, S) - mean[None, :, None]) + shift[None, :, None]).ravel()
    for Q in (1, 3):  # ranges of rows; segments of rows
        out = np.empty_like(x)
        kernel(x, x, out, N, C, S, 2, Q, False, a, mean, k, shift)
        np.testing.assert_allclose(out, expect, rtol=1e-12, atol=1e-12)
    assert _parallel_loops(kernel) == 1


def test_small_drivers_normalize_in_one_parallel_loop():
    # train_forward_par: the statistics loop and one normalize loop; eval_forward_par: one normalize loop
    like = np.float64(0.0)
    train, evaluate = _compile_afresh(drivers.train_forward_par), _compile_afresh(drivers.eval_forward_par)
    for N, C, S, L in ((2, 4, 9, 0), (6, 4, 1, 3)):  # (N, C, S) memory; an (N // L, C, L) view
        x = np.random.default_rng(0).standard_normal(N * C * S) * 3 + 1
        w, b = np.full(C, 2.0), np.full(C, 0.5)
        mean, var, y = np.empty(C), np.empty(C), np.empty_like(x)
        train(like, _addr(x), _addr(y), N, C, S, _addr(w), _addr(b), 0.0, _addr(mean), _addr(var), 0, 0, 0, 0,
              1.0, 0.0, 1.0, L, 2)  # fmt: skip
        rows = x.reshape(N // L, L, C).transpose(0, 2, 1) if L else x.reshape(N, C, S)
        expect = 2.0 * (rows - rows.mean(axis=(0, 2), keepdims=True)) / rows.std(axis=(0, 2), keepdims=True) + 0.5
        np.testing.assert_allclose(y, expect.ravel(), rtol=1e-10, atol=1e-10)
        rm, rv = mean.copy(), var.copy()
        y2 = np.empty_like(x)
        evaluate(like, _addr(x), _addr(y2), N, C, S, _addr(rm), _addr(rv), _addr(w), _addr(b), 0.0, L, 2)
        np.testing.assert_allclose(y2, expect.ravel(), rtol=1e-10, atol=1e-10)
    assert _parallel_loops(train) == 2
    assert _parallel_loops(evaluate) == 1
