r"""numba kernels of the ``cpu`` backend: the four primitives as parallel loops.

Memory model. Every tensor the backend accepts (see :mod:`bnkit.kernels.cpu.backend`) is a
dense buffer seen as a 3-d array ``(N, C, S)`` (``S`` = product of the spatial dims) in one
of two orders, so one kernel serves every shape of that order and only the dtype makes a
new specialization:

* ``ncs`` -- channel-major (contiguous ``(N, C, *)``): element ``(n, c, s)`` sits at
  ``(n*C + c)*S + s``. A channel is ``N`` rows of ``S`` contiguous values; index ``j`` in
  ``[0, N*S)`` along a channel means ``n = j // S``, ``s = j % S``.
* ``nsc`` -- channel-minor (channels_last ``(N, *, C)``, ``(N, C)``, and an ``(N, C, L)``
  view of ``(N, L, C)`` memory): ``R = N*S`` rows of ``C`` contiguous values; the inner
  loops run over ``c`` so they vectorize across channels.

dtypes. Data arrays arrive as float32, float64, uint16 (the bits of bfloat16) or int16 (the
bits of float16); :func:`load` widens an element to the compute dtype (float64 for float64,
float32 otherwise) and :func:`store` rounds back to nearest-even exactly as torch does (both in
:mod:`bnkit.kernels.cpu.half`). Per-channel vectors (``mean``, ``scale``, ...) come in the statistics
dtype. Every normalize loop that 16-bit data can take is one :func:`bnkit.kernels.cpu.half.affine` call
(the 16-wide vector code for 16-bit data on CPUs with AVX-512, a plain loop otherwise; the float-only forms,
folded or transposed, keep their own loops); the sums of 16-bit data take the 16-wide code wherever
:func:`simd16` holds.

Numerics policy (the same as :mod:`bnkit.reference`): statistics are accumulated in float64 and
``E[x^2] - E[x]^2`` of the raw data never appears. Memory is read once, with the "shifted data"
algorithm: with a shift ``K`` near the data (the mean of a first block, then the mean so far;
a single value of the channel only where the sums are float64),
``sum(x - K)`` and ``sum((x - K)**2)`` are sums of values of the order of the spread, not of the
offset, so a channel with mean 1e4 and std 1e-2 loses nothing to the offset; then
``mean = K + S1/n`` and ``M2 = S2 - S1**2/n``. Long contiguous runs (:func:`_seg_stats`) sum
blocks of ``SBLOCK`` values in float32 lanes (they vectorize 8 wide) and add the block sums in
float64; short rows (:func:`ncs_row_stats`) and channels-innermost rows (:func:`nsc_stats`, in
blocks of ``NSC_SBLOCK`` rows) likewise; partial results are merged in float64 with Chan's
formula (:func:`chan_merge`). The normalization uses the float64 mean and
``scale = w / sqrt(var + eps)`` and rounds each output once: ``y = (x - mean) * scale + shift``
(float32 channels-innermost memory as ``x * scale + (shift - mean * scale)``, see :func:`folds_mean`).
For bfloat16/float16 data the launcher hands the normalization float32 arrays instead (the
*normalization dtype*): the output's own rounding (2**-9 or 2**-12 relative) dwarfs float32's, and
float64 lanes made that pass compute-bound.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.core.cpu import ParallelOptions
from numba.extending import overload

from bnkit.kernels.cpu.half import (
    _FAST,
    affine,
    block_sums,
    column_sums,
    dot_block,
    has_row_lanes,
    load,
    nsc_tile,
    row_lanes,
    row_lanes_type,
    simd16,
    simd16_type,
    store,
    to_acc,
)

__all__ = [
    "backward_coeffs",
    "chan_merge",
    "finish_stats",
    "load",
    "ncs_affine",
    "ncs_affine_any",
    "ncs_affine_short",
    "ncs_backward_rows",
    "ncs_backward_train",
    "ncs_reduce",
    "ncs_row_stats",
    "ncs_train",
    "ncs_train_all",
    "ncs_train_groups",
    "ncs_train_groups_all",
    "ncs_train_rows",
    "nsc_affine",
    "nsc_backward_train",
    "nsc_reduce",
    "nsc_stats",
    "nsc_train",
    "store",
    "update_running",
]

# Values per float32 partial sum in the backward reductions (then merged in float64).
RBLOCK = 256
# Values per float32 block of the forward statistics' shifted sums (ncs): the vectorized loop
# keeps 32 partial sums, so each adds up SBLOCK / 32 values before the block goes to float64.
SBLOCK = 256
# The same for 16-bit data on the SIMD path (statistics and backward reductions; its 8-bit or 11-bit
# mantissas leave the float32 sums plenty of room): at 256 the per-block horizontal sums cost more than
# the adds.
SBLOCK16 = 1024
# Rows per block of the float32 sums in channels-innermost memory (statistics and backward
# reductions): there each channel's sums are one sequential chain (the lanes run across
# channels), so blocks stay short.
NSC_SBLOCK = 64
# Short rows (at most ROW_LANES_MAX_S values) of the training backward's reduction add into 16 float32
# lanes per channel, flushed to float64 after about ROW_LANES_VALUES values per lane (a 16-bit block of
# SBLOCK16 values holds 32 per lane), see _ncs_reduce_lanes. LANES is half.row_lanes' vector width.
ROW_LANES_MAX_S = 256
ROW_LANES_VALUES = 64
LANES = 16

_JIT = {"cache": True, "fastmath": _FAST}
# parallel kernels: their explicit prange loops only (numba's conversion of numpy calls, array
# expressions and setitems into parfors is off: it only adds analysis and inner loops to compile)
PRANGE_ONLY = ParallelOptions({"comprehension": False, "reduction": False, "inplace_binop": False, "setitem": False,
                               "numpy": False, "stencil": False, "fusion": True, "prange": True})
# Largest |mean * scale| of a channel for the folded normalize (see folds_mean).
FOLD_MAX = float(2**24)


# --- shared math --------------------------------------------------------------------------------------


@njit(**_JIT)
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan, Golub, LeVeque (1979): (count, mean, M2) of the union of two disjoint sets."""
    n = n_a + n_b
    if n == 0.0:
        return 0.0, 0.0, 0.0
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@njit(**_JIT)
def _seg_stats(xs, n, cnt, mu, m2):
    # Merge the n contiguous values of xs into (cnt, mu, m2), reading each value once.
    # Shifted data: with a shift K near the data's mean, sum(x - K) and sum((x - K)**2) are
    # small, well-conditioned sums. They run in the data's compute dtype (float32 lanes vectorize
    # 8 wide) over blocks of SBLOCK values, each block summed into float64; then mean = K + S1/n
    # and M2 = S2 - S1**2/n, merged with Chan's formula. K is the mean so far or, for the first
    # segment, the mean of its first block (one more read of values still in L1): a single value
    # as K could be an outlier, and the float32 sums would then cancel badly.
    if n == 0:
        return cnt, mu, m2
    sb = SBLOCK16 if simd16(xs) else SBLOCK
    if cnt > 0.0:
        k = to_acc(xs, mu)
    else:
        n0 = min(n, sb)
        k = to_acc(xs, 0.0)
        for i in range(n0):
            k += load(xs, i)
        k = to_acc(xs, k / n0)
    if not np.isfinite(k):  # an inf or NaN shift would turn finite values into NaN
        k = to_acc(xs, 0.0)
    s1 = 0.0
    s2 = 0.0
    for b0 in range(0, n, sb):
        # a sub-slice indexed from 0: numba can then prove the index is non-negative and drops the
        # per-element wraparound check (`for i in range(b0, b1)` kept it and ran compute-bound)
        ts, tq = block_sums(xs[b0 : min(b0 + sb, n)], k)
        s1 += ts
        s2 += tq
    nb = float(n)
    m2b = s2 - s1 * (s1 / nb)
    if m2b < 0.0:  # rounding; written so that NaN passes through
        m2b = 0.0
    return chan_merge(cnt, mu, m2, nb, float(k) + s1 / nb, m2b)


@njit(**_JIT)
def _ncs_chunk_stats(x, c, C, S, j0, j1):
    # (count, mean, M2) in float64 of channel c over channel indices [j0, j1), row segment by row segment.
    cnt = 0.0
    mu = 0.0
    m2 = 0.0
    for n in range(j0 // S, (j1 - 1) // S + 1):
        base = (n * C + c) * S
        lo = max(j0 - n * S, 0)
        hi = min(j1 - n * S, S)
        cnt, mu, m2 = _seg_stats(x[base + lo : base + hi], hi - lo, cnt, mu, m2)
    return cnt, mu, m2


@njit(**_JIT)
def _ncs_chunk_affine(u, x, out, c, C, S, j0, j1, has_u, a, m, k, sh):
    # out = a*u + k*(x - m) + sh over channel c's indices [j0, j1) (the u term only when has_u).
    for n in range(j0 // S, (j1 - 1) // S + 1):
        base = (n * C + c) * S
        lo = max(j0 - n * S, 0)
        hi = min(j1 - n * S, S)
        _affine_run(u, x, out, base + lo, base + hi, has_u, a, m, k, sh)


def folds_mean(x, k):
    """Whether the channels-innermost normalize of ``x`` with coefficients ``k`` runs as
    ``x * k + (shift - mean * k)`` (a compile-time constant in jitted code): for float32 data with
    float64 coefficients (the training forward).

    That saves a subtraction per value, a gain on channels-innermost memory only (the channel-major
    loops, with scalar coefficients per row, run alike with and without), and float64 keeps it exact
    enough: its absolute error is at most about
    ``2**-52 * (|x * k| + |shift - mean * k|)``, and a call folds only when every channel has
    ``|mean * k| <= FOLD_MAX`` (``2**24``: a mean up to 2**24 of its standard deviations away from 0, e.g.
    1e4 with std 1e-2 is 2**20), so the error stays below about ``2**-27``, a sixteenth of float32's
    unit at 1 (each output of order 1 is still rounded once from a value far closer than its last bit;
    outputs near 0 lose relative precision below that absolute level, where torch's float32 form
    ``x * alpha + beta`` loses it at ``2**-24 * |mean * alpha|``). float32 coefficients (16-bit data,
    the eval forward) and float64 data keep ``(x - mean) * k + shift``.
    """
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(folds_mean, inline="always")
def _folds_mean_impl(x, k):
    kt = k.dtype if isinstance(k, types.Array) else k
    v = x.dtype == types.float32 and kt == types.float64
    return lambda x, k: v


@njit(**_JIT)
def _var_scale(cnt, m2, w, eps):
    # biased variance and scale = w / sqrt(var + eps) of a channel, in float64. A scalar helper: the
    # stores stay in the caller's loop over c, where numba knows c >= 0. A helper that took c and
    # the arrays kept a negative-index check on each store, which dominated finish_stats.
    v = m2 / cnt
    return v, w / np.sqrt(v + eps)


@njit(**_JIT)
def _part(total, parts, p):
    # [lo, hi) of part p when [0, total) is cut into `parts` nearly equal pieces.
    return (total * p) // parts, (total * (p + 1)) // parts


# --- channel-major (N, C, S) kernels ------------------------------------------------------------------


@njit(parallel=PRANGE_ONLY, **_JIT)
def ncs_train(
    x, y, N, C, S, P, fuse, weight, bias, eps, mean_out, var_out, nmean, scale, shift, part_n, part_mu, part_m2
):
    """Training forward on ``(N, C, S)`` memory; one task per (channel, part).

    ``fuse`` (needs ``P == 1``): each task owns a whole channel: it computes its statistics, then
    normalizes it, ``y = (x - mean) * scale + shift``, while its data is still in cache, and
    writes ``mean_out``/``var_out`` and ``nmean``/``scale``/``shift`` (normalization dtype). Otherwise (e.g.
    ``P > 1``, few channels) each task only writes the (count, mean, M2) of its part to
    ``part_*[p, c]``; the caller merges them (:func:`finish_stats`) and normalizes with
    :func:`ncs_affine`.
    """
    M = N * S
    for t in prange(C * P):
        c = t // P
        p = t % P
        j0, j1 = _part(M, P, p)
        cnt, mu, m2 = _ncs_chunk_stats(x, c, C, S, j0, j1)
        if fuse:
            # mean and biased var go out in the statistics dtype; the normalization gets the float64
            # mean and scale in the normalization dtype (float64, so each float32/float64 output is
            # rounded once; float32 for 16-bit data)
            v, sc = _var_scale(cnt, m2, float(weight[c]), eps)
            mean_out[c] = mu
            var_out[c] = v
            nmean[c] = mu
            scale[c] = sc
            shift[c] = bias[c]
            _ncs_chunk_affine(x, x, y, c, C, S, 0, M, False, scale[c], nmean[c], scale[c], shift[c])
        else:
            part_n[p, c] = cnt
            part_mu[p, c] = mu
            part_m2[p, c] = m2


@njit(**_JIT)
def finish_stats(part_n, part_mu, part_m2, weight, bias, eps, mean_out, var_out, nmean, scale, shift):
    """Merge per-part (count, mean, M2) rows ``part_*[p, c]`` into mean, var, scale, shift.

    All parts at once (the parallel form of Chan's formula): ``mean = mu_0 + sum(n_p (mu_p -
    mu_0)) / n`` (deviations from part 0's mean keep offset data exact), then ``M2 = sum(M2_p +
    n_p (mu_p - mean)**2)``. Loops run over channels innermost (they vectorize) and make one
    division per channel instead of three per part. ``mean_out``/``var_out`` are in the statistics
    dtype; ``nmean``/``scale``/``shift`` (what the normalization uses) in the normalization dtype.
    """
    P, C = part_mu.shape
    cnt = np.zeros(C)
    dev = np.zeros(C)
    for p in range(P):
        for c in range(C):
            cnt[c] += part_n[p, c]
            dev[c] += part_n[p, c] * (part_mu[p, c] - part_mu[0, c])
    mu = np.empty(C)
    for c in range(C):
        mu[c] = part_mu[0, c] + (dev[c] / cnt[c] if cnt[c] > 0.0 else 0.0)
    m2 = np.zeros(C)
    for p in range(P):
        for c in range(C):
            d = part_mu[p, c] - mu[c]
            m2[c] += part_m2[p, c] + part_n[p, c] * d * d
    for c in range(C):  # the stores of ncs_train's fused channel
        v, sc = _var_scale(cnt[c], m2[c], float(weight[c]), eps)
        mean_out[c] = mu[c]
        var_out[c] = v
        nmean[c] = mu[c]
        scale[c] = sc
        shift[c] = bias[c]


@njit(parallel=PRANGE_ONLY, **_JIT)
def ncs_row_stats(x, N, C, S, T, part_n, part_mu, part_m2):
    """Per-part statistics of ``(N, C, S)`` memory read in memory order (for short rows ``S``).

    ``T`` tasks each stream a range of rows ``r = n*C + c``, reading each value once. Per
    channel a task shifts by ``K`` (the first finite value it meets in that channel) and adds
    ``sum(x - K)`` and ``sum((x - K)**2)`` over each row into float64 totals: no division per
    row, and the shifted sums stay well-conditioned unless the data spreads over many orders of
    magnitude more than its standard deviation. At the end ``mean = K + S1/n`` and
    ``M2 = S2 - S1**2/n`` go to ``part_*[t, c]``; :func:`ncs_train_rows` then merges the parts
    (:func:`finish_stats`) and normalizes (:func:`ncs_affine_any`).
    """
    R = N * C
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        k = np.zeros(C)
        s1 = np.zeros(C)
        s2 = np.zeros(C)
        cnt = np.zeros(C)
        c = r0 % C  # counted along the rows, not divided out of r per row
        for r in range(r0, r1):
            xs = x[r * S : (r + 1) * S]
            if cnt[c] == 0.0:
                k[c] = _first_shift(xs)
            a, q = _row_sums(xs, S, k[c])
            s1[c] += a
            s2[c] += q
            cnt[c] += S
            c += 1
            if c == C:
                c = 0
        for ch in range(C):
            n = cnt[ch]
            part_n[t, ch] = n
            part_mu[t, ch], part_m2[t, ch] = _shifted_moments(n, k[ch], s1[ch], s2[ch])


@njit(inline="always", **_JIT)
def _first_shift(xs):
    # the shift K of a channel's shifted sums: its first value (0 if that is not finite)
    k0 = float(load(xs, 0))
    return k0 if np.isfinite(k0) else 0.0


@njit(inline="always", **_JIT)
def _row_sums(xs, S, kc):
    # sum(x - K) and sum((x - K)**2) of one short row, in float64
    a = 0.0
    q = 0.0
    for i in range(S):
        d = load(xs, i) - kc
        a += d
        q += d * d
    return a, q


@njit(inline="always", **_JIT)
def _shifted_moments(n, kc, s1, s2):
    # (mean, M2) of n values from their shifted sums around K; M2 clamped at 0 (rounding), NaN kept
    if n == 0.0:
        return 0.0, 0.0
    m2 = s2 - s1 * (s1 / n)
    return kc + s1 / n, (m2 if not m2 < 0.0 else 0.0)


@njit(parallel=PRANGE_ONLY, **_JIT)
def ncs_train_groups(x, y, N, C, S, G, weight, bias, eps, mean_out, var_out, nmean, scale, shift):
    """Training forward on ``(N, C, S)`` memory with short rows, one task per group of ``G`` channels.

    A group's rows of one sample are adjacent in memory (``G*S`` values), so the task reads them as
    one run per sample, takes each channel's shifted sums as :func:`ncs_row_stats` does (one task
    holds the whole channel: ``K`` is its first value), then normalizes the group while its
    ``G*N*S`` values are still in cache (the launcher sizes ``G`` for that). Short rows read one
    channel at a time are too scattered for the prefetcher, so without groups they take two passes
    over memory (:func:`ncs_row_stats`, then :func:`ncs_affine`).
    """
    M = float(N * S)
    for g in prange((C + G - 1) // G):
        c0 = g * G
        gc = min(G, C - c0)
        k = np.empty(gc)
        s1 = np.zeros(gc)
        s2 = np.zeros(gc)
        for j in range(gc):
            k[j] = _first_shift(x[(c0 + j) * S : (c0 + j + 1) * S])
        for n in range(N):
            base = (n * C + c0) * S
            for j in range(gc):
                a, q = _row_sums(x[base + j * S : base + (j + 1) * S], S, k[j])
                s1[j] += a
                s2[j] += q
        for j in range(gc):
            c = c0 + j
            mu, m2 = _shifted_moments(M, k[j], s1[j], s2[j])
            v, sc = _var_scale(M, m2, float(weight[c]), eps)
            mean_out[c] = mu
            var_out[c] = v
            nmean[c] = mu
            scale[c] = sc
            shift[c] = bias[c]
        for n in range(N):
            base = (n * C + c0) * S
            for j in range(gc):
                c = c0 + j
                _affine_run(x, x, y, base + j * S, base + (j + 1) * S, False, scale[c], nmean[c], scale[c], shift[c])


@njit(parallel=PRANGE_ONLY, **_JIT)
def ncs_affine(u, x, out, N, C, S, T, Q, has_u, a, mean, k, shift):
    """``out = a[c]*u + k[c]*(x - mean[c]) + shift[c]`` on ``(N, C, S)`` memory, one pass.

    Eval forward is ``has_u=False`` (``k`` = scale); the backward input pass is ``has_u=True``
    with ``u = dy``. Tasks walk memory in order: with ``Q == 1`` each of the ``T`` tasks streams
    a range of rows ``r = n*C + c`` (the channel counted along, not divided out per row); with
    ``Q > 1`` (too few rows to fill the threads) each task is one of the ``Q`` segments of a row.
    Not one task per row: on short rows the per-task scheduling and divisions cost more than the values.
    """
    R = N * C
    # one loop for both kinds of task: each prange loop compiles into a parallel function of its own. Its
    # count is a variable: numba makes no parallel loop of a prange over a conditional expression.
    tasks = R * Q if Q > 1 else T
    for t in prange(tasks):
        if Q > 1:  # segment t % Q of row t // Q
            r0 = t // Q
            r1 = r0 + 1
            s0, s1 = _part(S, Q, t % Q)
        else:  # a range of whole rows
            r0, r1 = _part(R, T, t)
            s0, s1 = 0, S
        c = r0 % C
        for r in range(r0, r1):
            _affine_run(u, x, out, r * S + s0, r * S + s1, has_u, a[c], mean[c], k[c], shift[c])
            c += 1
            if c == C:
                c = 0


@njit(inline="always", **_JIT)
def _affine_run(u, x, out, i0, i1, has_u, ac, m, kc, sh):
    # out[i] = ac*u[i] + kc*(x[i] - m) + sh on [i0, i1), over slices indexed from 0
    affine(u[i0:i1], x[i0:i1], out[i0:i1], i1 - i0, has_u, ac, m, kc, sh)


@njit(parallel=PRANGE_ONLY, **_JIT)
def ncs_affine_short(u, x, out, N, C, S, Q, has_u, a, mean, k, shift, tab):
    """:func:`ncs_affine` for very short rows (``S <= SHORT_ROW_S`` of the launcher, e.g. 4x4):
    one loop over a sample's ``C*S`` values.

    A row of 16 values is less than one vector loop iteration; here the per-channel constants are
    first repeated over one sample (``tab``: 4 rows of ``C*S`` values of their dtype, built once
    per call, small enough to stay in cache), so each of the ``N*Q`` tasks (sample ``n``, segment
    ``q`` of its ``C*S`` values) is one long loop that vectorizes. From about 25 values per row
    (5x5) :func:`ncs_affine`'s ranges of rows are faster.
    """
    CS = C * S
    for c in range(C):
        for i in range(S):
            j = c * S + i
            tab[0, j] = a[c]
            tab[1, j] = mean[c]
            tab[2, j] = k[c]
            tab[3, j] = shift[c]
    ta, tm, tk, tsh = tab[0], tab[1], tab[2], tab[3]
    for t in prange(N * Q):
        n = t // Q
        j0, j1 = _part(CS, Q, t % Q)
        xs = x[n * CS + j0 : n * CS + j1]
        os = out[n * CS + j0 : n * CS + j1]
        ma, mm, mk, msh = ta[j0:j1], tm[j0:j1], tk[j0:j1], tsh[j0:j1]
        affine(u[n * CS + j0 : n * CS + j1], xs, os, j1 - j0, has_u, ma, mm, mk, msh)


@njit(parallel=PRANGE_ONLY, **_JIT)
def ncs_reduce(dy, x, N, C, S, T, mean, sum_dy, sum_dy_xmu, write, dx, scale):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per channel on ``(N, C, S)`` memory, one pass.

    With ``write`` it also stores ``dx = scale[c] * dy`` in the same read (eval-mode backward).

    ``T`` tasks each stream a range of rows ``r = n*C + c`` in memory order (prefetch-friendly
    even when ``S`` is small), the channel counted along (no division per row), each row summed
    like every reduction here (:func:`_dot_sums`: float32 lanes in blocks of ``RBLOCK`` values,
    float64 across blocks) into the task's per-channel float64 accumulators, summed at the end
    (float64 row sums and a modulo per row made short rows compute-bound). Rows of at most
    ``ROW_LANES_MAX_S`` values on the SIMD path take :func:`_ncs_reduce_lanes` instead.
    """
    if not write and _takes_lanes(dy, mean, S):
        _lanes_only(dy, x, N, C, S, T, mean, sum_dy, sum_dy_xmu)
        return
    R = N * C
    acc0 = np.zeros((T, C))
    acc1 = np.zeros((T, C))
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        c = r0 % C
        a0 = acc0[t]
        a1 = acc1[t]
        for r in range(r0, r1):
            gs = dy[r * S : (r + 1) * S]
            xs = x[r * S : (r + 1) * S]
            if write:
                s0, s1 = _dot_sums(gs, xs, mean[c], S, dx[r * S : (r + 1) * S], scale[c])
            else:
                s0, s1 = _dot_sums(gs, xs, mean[c], S)
            a0[c] += s0
            a1[c] += s1
            c += 1
            if c == C:
                c = 0
    _sum_tasks(acc0, acc1, sum_dy, sum_dy_xmu)


@njit(parallel=PRANGE_ONLY, **_JIT)
def _ncs_reduce_lanes(dy, x, N, C, S, T, mean, sum_dy, sum_dy_xmu):
    """:func:`ncs_reduce` (without ``write``) for short rows on the SIMD path: each row adds into its
    channel's 16 float32 lanes (:func:`row_lanes`), with no horizontal sum per row; a channel's lanes go
    to its float64 total after ``ROW_LANES_VALUES`` values per lane: on short rows a horizontal sum per row
    costs more than the row's values."""
    R = N * C
    W = LANES
    flush = _lane_flush_rows(S)
    acc0 = np.zeros((T, C))
    acc1 = np.zeros((T, C))
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        l0 = np.zeros(C * W, np.float32)
        l1 = np.zeros(C * W, np.float32)
        rows = np.zeros(C, np.int64)
        a0 = acc0[t]
        a1 = acc1[t]
        c = r0 % C
        for r in range(r0, r1):
            row_lanes(dy[r * S : (r + 1) * S], x[r * S : (r + 1) * S], S, mean[c], l0, l1, c * W)
            rows[c] += 1
            if rows[c] == flush:
                rows[c] = 0
                _flush_lanes(l0, l1, c, a0, a1)
            c += 1
            if c == C:
                c = 0
        for ch in range(C):
            _flush_lanes(l0, l1, ch, a0, a1)
    _sum_tasks(acc0, acc1, sum_dy, sum_dy_xmu)


def _lanes_only(dy, x, N, C, S, T, mean, sum_dy, sum_dy_xmu):
    """:func:`_ncs_reduce_lanes` where the data takes the lanes (:func:`bnkit.kernels.cpu.half.has_row_lanes`),
    else nothing: a compile-time choice, so data without lanes (float64) does not compile that kernel
    (:func:`ncs_reduce` calls it only where :func:`_takes_lanes` holds)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(_lanes_only, inline="always")
def _lanes_only_impl(dy, x, N, C, S, T, mean, sum_dy, sum_dy_xmu):
    if row_lanes_type(dy, mean):
        return lambda dy, x, N, C, S, T, mean, sum_dy, sum_dy_xmu: _ncs_reduce_lanes(
            dy, x, N, C, S, T, mean, sum_dy, sum_dy_xmu
        )
    return lambda dy, x, N, C, S, T, mean, sum_dy, sum_dy_xmu: None


@njit(inline="always", **_JIT)
def _takes_lanes(dy, mean, S):
    # whether a reduction over rows of S values runs in per-channel lanes (row_lanes; the SIMD path only)
    return 0 < S <= ROW_LANES_MAX_S and has_row_lanes(dy, mean)


@njit(inline="always", **_JIT)
def _lane_flush_rows(S):
    # rows of S values per flush of a channel's lanes: about ROW_LANES_VALUES values per lane
    return max(1, ROW_LANES_VALUES // max(1, (S + LANES - 1) // LANES))


@njit(inline="always", **_JIT)
def _flush_lanes(l0, l1, c, a0, a1):
    # channel c's LANES lanes added into its float64 totals, and cleared
    s0 = 0.0
    s1 = 0.0
    for i in range(c * LANES, c * LANES + LANES):
        s0 += l0[i]
        s1 += l1[i]
        l0[i] = 0.0
        l1[i] = 0.0
    a0[c] += s0
    a1[c] += s1


@njit(**_JIT)
def _sum_tasks(acc0, acc1, sum_dy, sum_dy_xmu):
    # The reductions' per-task rows acc[t, c], added up per channel (serial, after the prange).
    T, C = acc0.shape
    for c in range(C):
        tot0 = 0.0
        tot1 = 0.0
        for t in range(T):
            tot0 += acc0[t, c]
            tot1 += acc1[t, c]
        sum_dy[c] = tot0
        sum_dy_xmu[c] = tot1


@njit(**_JIT)
def _dot_sums(gs, xs, m, n, ds=None, sc=0.0):
    # (sum(g), sum(g * (x - m))) over n values: float32 lanes within blocks of RBLOCK values (they
    # vectorize 8 wide; a block's rounding error stays ~1e-7 relative), blocks summed in float64.
    # With ``ds`` also ds = sc * g in the same read (the eval-mode backward's dx); numba decides
    # ``ds is None`` when it compiles, so the plain sums carry no store.
    s0 = 0.0
    s1 = 0.0
    rb = SBLOCK16 if simd16(gs) else RBLOCK
    for b0 in range(0, n, rb):
        b1 = min(b0 + rb, n)
        gb = gs[b0:b1]  # sub-slices indexed from 0 (see _seg_stats)
        xb = xs[b0:b1]
        if ds is None:
            t0, t1 = dot_block(gb, xb, m)
            s0 += t0
            s1 += t1
            continue
        db = ds[b0:b1]
        t0 = to_acc(gs, 0.0)
        t1 = t0
        for i in range(gb.shape[0]):
            g = load(gb, i)
            t0 += g
            t1 += g * (load(xb, i) - m)
            store(db, i, sc * g)
        s0 += t0
        s1 += t1
    return s0, s1


@njit(**_JIT)
def backward_coeffs(sum_dy, sum_dy_xmu, invstd, weight, M, sum_dy_xhat, a, k, cc):
    """Per-channel coefficients of the training backward from the two reductions.

    ``sum_dy_xhat = sum_dy_xmu * invstd``; ``dx = a*dy + k*(x - mean) + cc`` with ``a = invstd*w``,
    ``k = -a*invstd*sum_dy_xhat/M`` and ``cc = -a*sum_dy/M`` (symbols of :mod:`bnkit.autograd`),
    each rounded to the statistics dtype of the output arrays.
    """
    for c in range(sum_dy.shape[0]):
        _coeffs_channel(c, sum_dy[c], sum_dy_xmu[c], invstd, weight, M, sum_dy, sum_dy_xhat, a, k, cc)


@njit(**_JIT)
def _coeffs_channel(c, s0, s1, invstd, weight, M, sum_dy, sum_dy_xhat, a, k, cc):
    sum_dy[c] = s0
    sum_dy_xhat[c] = s1 * invstd[c]
    a[c] = invstd[c] * weight[c]
    k[c] = -a[c] * invstd[c] * (sum_dy_xhat[c] / M)
    cc[c] = -a[c] * (sum_dy[c] / M)


@njit(parallel=PRANGE_ONLY, **_JIT)
def ncs_backward_train(dy, x, dx, N, C, S, G, mean, invstd, weight, sum_dy, sum_dy_xhat, a, k, cc):
    """Fused training backward on ``(N, C, S)`` memory, one task per group of ``G`` channels.

    Each task reduces ``sum(dy)`` and ``sum(dy * (x - mean))`` over its channels, forms the
    coefficients (:func:`backward_coeffs`), then writes ``dx = a*dy + k*(x - mean) + cc`` while
    the channels' ``dy`` and ``x`` are still in cache: memory is read about once. Long rows take
    ``G = 1``; short ones a group whose rows of one sample are adjacent in memory (see
    :func:`ncs_train_groups`). Rows of at most ``ROW_LANES_MAX_S`` values on the SIMD path are reduced
    in per-channel lanes as in :func:`_ncs_reduce_lanes` (for the same reason).
    """
    M = float(N * S)
    lanes = _takes_lanes(dy, mean, S)
    flush = _lane_flush_rows(S)
    for g in prange((C + G - 1) // G):
        c0 = g * G
        gc = min(G, C - c0)
        s0 = np.zeros(gc)
        s1 = np.zeros(gc)
        if lanes:  # short rows: each channel's 16 float32 lanes, as in _ncs_reduce_lanes
            l0 = np.zeros(gc * LANES, np.float32)
            l1 = np.zeros(gc * LANES, np.float32)
            for n in range(N):
                base = (n * C + c0) * S
                for j in range(gc):
                    lo = base + j * S
                    row_lanes(dy[lo : lo + S], x[lo : lo + S], S, mean[c0 + j], l0, l1, j * LANES)
                if (n + 1) % flush == 0 or n == N - 1:
                    for j in range(gc):
                        _flush_lanes(l0, l1, j, s0, s1)
        else:
            for n in range(N):
                base = (n * C + c0) * S
                for j in range(gc):
                    lo = base + j * S
                    r0, r1 = _dot_sums(dy[lo : lo + S], x[lo : lo + S], mean[c0 + j], S)
                    s0[j] += r0
                    s1[j] += r1
        for j in range(gc):
            _coeffs_channel(c0 + j, s0[j], s1[j], invstd, weight, M, sum_dy, sum_dy_xhat, a, k, cc)
        for n in range(N):
            base = (n * C + c0) * S
            for j in range(gc):
                c = c0 + j
                lo = base + j * S
                _affine_run(dy, x, dx, lo, lo + S, True, a[c], mean[c], k[c], cc[c])


# --- channel-minor (R, C) kernels ---------------------------------------------------------------------


@njit(parallel=PRANGE_ONLY, **_JIT)
def nsc_stats(x, R, C, T, part_n, part_mu, part_m2):
    """Per-part statistics of ``(R, C)`` memory (channels innermost): ``T`` row ranges in parallel.

    Each part reads its rows once, ``NSC_SBLOCK`` rows at a time: per channel, the block is shifted
    by ``K``, the part's mean so far (for its first block, that block's own mean, from one more
    read of rows still in cache), and ``sum(x - K)``, ``sum((x - K)**2)`` run in the compute dtype across
    channels (they vectorize; 16-bit and float32 data on AVX-512 in :func:`column_sums`, the sums in
    registers); the block's (mean, M2) is merged in float64 into the part's (count, mean, M2),
    ``part_*[t, c]`` (Chan). The caller merges the parts
    (:func:`finish_stats`) and normalizes with :func:`nsc_affine`.
    """
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        zero = to_acc(x, 0.0)
        k = np.full(C, zero)
        ts = np.full(C, zero)
        tq = np.full(C, zero)
        mu = np.zeros(C)
        m2 = np.zeros(C)
        cnt = 0.0
        for b0 in range(r0, r1, NSC_SBLOCK):
            b1 = min(b0 + NSC_SBLOCK, r1)
            if cnt == 0.0:  # the first block's own mean (one more read, in cache): never one value
                for c in range(C):
                    k[c] = zero
                for r in range(b0, b1):
                    xr = x[r * C : (r + 1) * C]
                    for c in range(C):
                        k[c] += load(xr, c)
                for c in range(C):
                    k[c] = k[c] / (b1 - b0)
            else:  # the mean so far
                for c in range(C):
                    k[c] = mu[c]
            for c in range(C):
                if not np.isfinite(k[c]):
                    k[c] = zero
                ts[c] = 0.0
                tq[c] = 0.0
            if not column_sums(x, b0, b1, C, k, ts, tq):
                for r in range(b0, b1):
                    xr = x[r * C : (r + 1) * C]
                    for c in range(C):
                        d = load(xr, c) - k[c]
                        ts[c] += d
                        tq[c] += d * d
            nb = float(b1 - b0)
            inv_nb = 1.0 / nb
            n = cnt + nb
            w_b = nb / n
            w_ab = cnt * nb / n
            for c in range(C):
                s1 = float(ts[c])
                m2b = float(tq[c]) - s1 * s1 * inv_nb
                if m2b < 0.0:
                    m2b = 0.0
                delta = float(k[c]) + s1 * inv_nb - mu[c]
                mu[c] += delta * w_b
                m2[c] += m2b + delta * delta * w_ab
            cnt = n
        for c in range(C):
            part_n[t, c] = cnt
            part_mu[t, c] = mu[c]
            part_m2[t, c] = m2[c]


@njit(parallel=PRANGE_ONLY, **_JIT)
def nsc_affine(u, x, out, R, C, T, has_u, a, mean, k, shift):
    """``out = a[c]*u + k[c]*(x - mean[c]) + shift[c]`` on ``(R, C)`` memory, one pass.

    16-bit data on the SIMD path: the coefficients are first repeated over ``q`` rows (``q*C`` about
    ``NSC_TILE`` values), so each task runs one long loop per ``q`` rows: one loop per row costs a fixed
    time per row beyond its values, which short 16-bit rows feel. float32/float64 data (float64
    coefficients, twice the bytes, compute-heavier lanes) ran slower with tables, and keeps one loop per row.
    """
    q = max(1, nsc_tile(x) // C)
    if q > 1:
        _tables16(u, x, out, R, C, T, has_u, a, mean, k, shift, q)
        return
    fold, sh2 = _folded_shift(folds_mean(x, k) and not has_u, mean, k, shift)
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        for r in range(r0, r1):
            xr = x[r * C : (r + 1) * C]
            orow = out[r * C : (r + 1) * C]
            if fold:
                for c in range(C):
                    store(orow, c, load(xr, c) * k[c] + sh2[c])
            else:
                affine(u[r * C : (r + 1) * C], xr, orow, C, has_u, a, mean, k, shift)


def _tables16(u, x, out, R, C, T, has_u, a, mean, k, shift, q):
    """:func:`_nsc_affine_tables` where ``x`` takes the 16-wide SIMD code, else nothing (a compile-time
    choice: :func:`nsc_affine` reaches it only there, and float data then does not compile its tables)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(_tables16, inline="always")
def _tables16_impl(u, x, out, R, C, T, has_u, a, mean, k, shift, q):
    if simd16_type(x):
        return lambda u, x, out, R, C, T, has_u, a, mean, k, shift, q: _nsc_affine_tables(
            u, x, out, R, C, T, has_u, a, mean, k, shift, q
        )
    return lambda u, x, out, R, C, T, has_u, a, mean, k, shift, q: None


@njit(parallel=PRANGE_ONLY, **_JIT)
def _nsc_affine_tables(u, x, out, R, C, T, has_u, a, mean, k, shift, q):
    # nsc_affine of 16-bit data on the SIMD path: coefficients repeated over q rows, one loop per q rows
    tab = np.empty((4, q * C), a.dtype)
    for j in range(q):
        for c in range(C):
            tab[0, j * C + c] = a[c]
            tab[1, j * C + c] = mean[c]
            tab[2, j * C + c] = k[c]
            tab[3, j * C + c] = shift[c]
    ta, tm, tk, tsh = tab[0], tab[1], tab[2], tab[3]
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        for r in range(r0, r1, q):
            i0 = r * C
            m = (min(r + q, r1) - r) * C
            affine(u[i0 : i0 + m], x[i0 : i0 + m], out[i0 : i0 + m], m, has_u, ta[:m], tm[:m], tk[:m], tsh[:m])



@njit(inline="always", **_JIT)
def _folded_shift(fold, mean, k, shift):
    # (fold, shift - mean * k) of the folded normalize x * k + (shift - mean * k) (see folds_mean): it
    # folds only when asked and every channel has |mean * k| <= FOLD_MAX (inf and NaN too keep the unfolded
    # form); unfolded, the shift comes back as it is
    sh2 = np.empty(shift.shape[0], shift.dtype) if fold else shift
    if fold:
        for c in range(shift.shape[0]):
            p = mean[c] * k[c]
            if not abs(p) <= FOLD_MAX:
                fold = False
            sh2[c] = shift[c] - p
    return fold, (sh2 if fold else shift)


# rows per tile of nsc_tile_to_ncs (64 rows of 128 float32 channels: 32 KB)
NSC_TO_NCS_ROWS = 64


@njit(inline="always", **_JIT)
def nsc_to_ncs_tiles(B, L):
    """How many tiles of :func:`nsc_tile_to_ncs` cover ``B`` samples of ``L`` rows."""
    return B * ((L + NSC_TO_NCS_ROWS - 1) // NSC_TO_NCS_ROWS)


@njit(inline="always", **_JIT)
def nsc_tile_to_ncs(x, out, L, C, tt, fold, mean, k, shift):
    """Tile ``tt`` of an ``(N, C, L)`` view of ``(B, L, C)`` memory normalized into ``(B, C, L)`` memory, the
    contiguous output torch gives that view: ``out[b, c, l] = (x[b, l, c] - mean[c]) * k[c] + shift[c]``,
    or ``x * k[c] + shift[c]`` with ``fold`` (``shift`` then holds :func:`_folded_shift`'s). A tile is
    ``NSC_TO_NCS_ROWS`` rows of one sample, read once (contiguous) and kept in cache while each
    channel's run of up to that many outputs is written (a normalize pass then torch's transposing
    ``.contiguous()`` reads and writes everything twice)."""
    tiles = (L + NSC_TO_NCS_ROWS - 1) // NSC_TO_NCS_ROWS
    b = tt // tiles
    l0 = (tt % tiles) * NSC_TO_NCS_ROWS
    n = min(NSC_TO_NCS_ROWS, L - l0)
    xs = x[(b * L + l0) * C : (b * L + l0 + n) * C].reshape(n, C)
    for c in range(C):
        os = out[(b * C + c) * L + l0 : (b * C + c) * L + l0 + n]
        kc = k[c]
        shc = shift[c]
        if fold:
            for i in range(n):
                os[i] = xs[i, c] * kc + shc
        else:
            mc = mean[c]
            for i in range(n):
                os[i] = (xs[i, c] - mc) * kc + shc


@njit(parallel=PRANGE_ONLY, **_JIT)
def nsc_affine_to_ncs(x, out, B, L, C, T, mean, k, shift):
    """:func:`nsc_affine`'s normalize of float32/float64 data (no ``u`` term, the same arithmetic: folded as
    there) of an ``(N, C, L)`` view of ``(B, L, C)`` memory, written contiguous ``(B, C, L)``
    (:func:`nsc_tile_to_ncs`), ``T`` tasks over the tiles."""
    fold, sh = _folded_shift(folds_mean(x, k), mean, k, shift)
    R = nsc_to_ncs_tiles(B, L)
    for t in prange(T):
        t0, t1 = _part(R, T, t)
        for tt in range(t0, t1):
            nsc_tile_to_ncs(x, out, L, C, tt, fold, mean, k, sh)


@njit(parallel=PRANGE_ONLY, **_JIT)
def nsc_reduce(dy, x, R, C, T, mean, sum_dy, sum_dy_xmu, write, dx, scale):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per channel on ``(R, C)`` memory, one pass.

    With ``write`` it also stores ``dx = scale[c] * dy`` in the same read (eval-mode backward).
    Each task sums blocks of ``NSC_SBLOCK`` rows in the data's compute dtype, vectorized across
    channels, and adds the block sums into float64 (the numerics of every reduction here):
    float64 accumulators across all rows were compute-bound, well behind two ``Tensor.sum`` calls.
    """
    acc0 = np.zeros((T, C))
    acc1 = np.zeros((T, C))
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        zero = to_acc(x, 0.0)
        m = np.empty(C, mean.dtype)
        for c in range(C):
            m[c] = mean[c]
        t0 = np.full(C, zero)
        t1 = np.full(C, zero)
        a0 = acc0[t]
        a1 = acc1[t]
        for b0 in range(r0, r1, NSC_SBLOCK):
            b1 = min(b0 + NSC_SBLOCK, r1)
            for c in range(C):
                t0[c] = zero
                t1[c] = zero
            for r in range(b0, b1):
                gr = dy[r * C : (r + 1) * C]
                xr = x[r * C : (r + 1) * C]
                if write:
                    dr = dx[r * C : (r + 1) * C]
                    for c in range(C):
                        g = load(gr, c)
                        t0[c] += g
                        t1[c] += g * (load(xr, c) - m[c])
                        store(dr, c, scale[c] * g)
                else:
                    for c in range(C):
                        g = load(gr, c)
                        t0[c] += g
                        t1[c] += g * (load(xr, c) - m[c])
            for c in range(C):
                a0[c] += t0[c]
                a1[c] += t1[c]
    _sum_tasks(acc0, acc1, sum_dy, sum_dy_xmu)


@njit(cache=True)
def run_time(flag):
    """``flag`` as a run-time bool. A kernel called from compiled code with a literal ``True``/``False`` compiles
    a specialization for that literal beside the one Python's calls get (``bool``); the drivers pass their
    flags through this so that every caller shares one compiled kernel per dtype."""
    return bool(flag)  # bool() of a literal is typed as a plain bool; `return flag` would keep the literal


# --- whole passes in one compiled call ---------------------------------------------------------------
# The launcher's Python between two kernels runs with cold caches after a pass over megabytes (each small
# step costs several times its warm time there): calling the passes from one jitted function keeps that
# out, with the same numbers bit for bit.


@njit(inline="always", **_JIT)
def ncs_affine_any(u, x, out, N, C, S, T, Q, has_u, a, mean, k, shift, tab):
    """:func:`ncs_affine_short` when ``tab`` has columns (``4 x C*S``), else :func:`ncs_affine`."""
    if tab.shape[1] > 0:
        ncs_affine_short(u, x, out, N, C, S, Q, has_u, a, mean, k, shift, tab)
    else:
        ncs_affine(u, x, out, N, C, S, T, Q, has_u, a, mean, k, shift)


# fastmath=False spelled out: a callee that sets no fastmath inherits its caller's (the drivers')
@njit(cache=True, fastmath=False)
def update_running(mean, var, running):
    """The running statistics after a batch, in the statistics dtype: ``new_mean = rm*keep + mean*take``,
    ``new_var = rv*keep + (var*ratio)*take``, for ``running = (rm, rv, new_mean, new_var, ratio, keep,
    take)`` (``new_*`` may be ``rm``/``rv`` themselves; empty vectors: no update).

    The one compiled running-statistics update: every training driver ends with it (the small
    kernels' and each planned path's). The float operations of
    :func:`bnkit.reference.update_running_stats`, each rounded to the statistics dtype (no fastmath:
    ``contract`` would fuse a product and the sum into one FMA); ``tests/kernels/cpu/test_backend.py`` holds
    it to the reference bit for bit. In place, each channel's mean is written before its variance is
    read, as torch's kernel does (one buffer passed as both gets torch's numbers).
    """
    rm, rv, nm, nv, ratio, keep, take = running
    for c in range(rm.shape[0]):
        nm[c] = rm[c] * keep + mean[c] * take
        nv[c] = rv[c] * keep + (var[c] * ratio) * take


@njit(inline="always", **_JIT)
def ncs_train_rows(x, y, N, C, S, T, part_n, part_mu, part_m2, weight, bias, eps, mean_out, var_out, nmean, scale,
                   shift, TA, Q, tab, running):
    """Training forward on ``(N, C, S)`` memory in two streaming passes: :func:`ncs_row_stats` (``T``
    tasks), :func:`finish_stats`, then :func:`ncs_affine_any` (``TA``, ``Q``, ``tab``); then
    :func:`update_running`."""
    ncs_row_stats(x, N, C, S, T, part_n, part_mu, part_m2)
    finish_stats(part_n, part_mu, part_m2, weight, bias, eps, mean_out, var_out, nmean, scale, shift)
    ncs_affine_any(x, x, y, N, C, S, TA, Q, run_time(False), scale, nmean, scale, shift, tab)
    update_running(mean_out, var_out, running)


@njit(inline="always", **_JIT)
def ncs_train_all(x, y, N, C, S, P, fuse, weight, bias, eps, mean_out, var_out, nmean, scale, shift, part_n, part_mu,
                  part_m2, TA, Q, tab, running):
    """Training forward on ``(N, C, S)`` memory with long rows: :func:`ncs_train` (``fuse``: each channel
    normalized from cache), else its parts merged by :func:`finish_stats` and normalized by
    :func:`ncs_affine_any` (``TA``, ``Q``, ``tab``); then :func:`update_running`."""
    ncs_train(x, y, N, C, S, P, fuse, weight, bias, eps, mean_out, var_out, nmean, scale, shift, part_n, part_mu,
              part_m2)
    if not fuse:
        finish_stats(part_n, part_mu, part_m2, weight, bias, eps, mean_out, var_out, nmean, scale, shift)
        ncs_affine_any(x, x, y, N, C, S, TA, Q, run_time(False), scale, nmean, scale, shift, tab)
    update_running(mean_out, var_out, running)


@njit(inline="always", **_JIT)
def ncs_train_groups_all(x, y, N, C, S, G, weight, bias, eps, mean_out, var_out, nmean, scale, shift, running):
    """:func:`ncs_train_groups`, then :func:`update_running`."""
    ncs_train_groups(x, y, N, C, S, G, weight, bias, eps, mean_out, var_out, nmean, scale, shift)
    update_running(mean_out, var_out, running)


@njit(inline="always", **_JIT)
def ncs_backward_rows(dy, x, dx, N, C, S, T, mean, invstd, weight, M, sum_dy, sum_dy_xhat, a, k, cc, TA, Q, tab):
    """Training backward on ``(N, C, S)`` memory in two streaming passes: :func:`ncs_reduce`,
    :func:`backward_coeffs`, then ``dx`` (:func:`ncs_affine_any`)."""
    ncs_reduce(dy, x, N, C, S, T, mean, sum_dy, sum_dy_xhat, run_time(False), dy, mean)
    backward_coeffs(sum_dy, sum_dy_xhat, invstd, weight, M, sum_dy_xhat, a, k, cc)
    ncs_affine_any(dy, x, dx, N, C, S, TA, Q, run_time(True), a, mean, k, cc, tab)


@njit(inline="always", **_JIT)
def nsc_train(x, y, R, C, T, part_n, part_mu, part_m2, weight, bias, eps, mean_out, var_out, nmean, scale, shift,
              running):
    """Training forward on ``(R, C)`` memory: :func:`nsc_stats`, :func:`finish_stats`, :func:`nsc_affine`,
    :func:`update_running`."""
    nsc_stats(x, R, C, T, part_n, part_mu, part_m2)
    finish_stats(part_n, part_mu, part_m2, weight, bias, eps, mean_out, var_out, nmean, scale, shift)
    nsc_affine(x, x, y, R, C, T, run_time(False), scale, nmean, scale, shift)
    update_running(mean_out, var_out, running)


@njit(inline="always", **_JIT)
def nsc_train_to_ncs(x, y, B, L, C, T, part_n, part_mu, part_m2, weight, bias, eps, mean_out, var_out, nmean, scale,
                     shift, running):
    """:func:`nsc_train` of an ``(N, C, L)`` view of ``(B, L, C)`` float32/float64 memory, ``y`` written
    contiguous ``(B, C, L)`` (:func:`nsc_affine_to_ncs`): the same statistics and the same output values."""
    nsc_stats(x, B * L, C, T, part_n, part_mu, part_m2)
    finish_stats(part_n, part_mu, part_m2, weight, bias, eps, mean_out, var_out, nmean, scale, shift)
    nsc_affine_to_ncs(x, y, B, L, C, T, nmean, scale, shift)
    update_running(mean_out, var_out, running)


@njit(inline="always", **_JIT)
def nsc_backward_train(dy, x, dx, R, C, T, mean, invstd, weight, M, sum_dy, sum_dy_xhat, a, k, cc):
    """Training backward on ``(R, C)`` memory: :func:`nsc_reduce`, :func:`backward_coeffs`, then
    ``dx = a*dy + k*(x - mean) + cc`` (:func:`nsc_affine`)."""
    # sum(dy * (x - mean)) goes to sum_dy_xhat, which backward_coeffs scales in place by invstd
    nsc_reduce(dy, x, R, C, T, mean, sum_dy, sum_dy_xhat, run_time(False), dy, mean)
    backward_coeffs(sum_dy, sum_dy_xhat, invstd, weight, M, sum_dy_xhat, a, k, cc)
    nsc_affine(dy, x, dx, R, C, T, run_time(True), a, mean, k, cc)


@njit(parallel=PRANGE_ONLY, cache=True)
def probe(a):
    """``a += 1`` in a parallel loop: the least kernel that needs a working numba and its threading layer."""
    for i in prange(a.shape[0]):
        a[i] += 1.0


# --- eval-mode coefficients ----------------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def eval_coeffs(running_var, weight, bias, eps, one, scale, shift):
    """``scale = (1 / sqrt(running_var + eps)) * weight`` and ``shift = bias`` per channel, in one call.

    The IEEE operations of autograd's torch ops (``rsqrt(running_var + eps) * weight``: torch's CPU
    rsqrt is a correctly rounded ``1 / sqrt``), in the same dtype and order, so the results are
    equal bit for bit. Hence no fastmath (``arcp`` may turn ``1 / sqrt`` into an approximate
    reciprocal square root) and numpy's error model (``1 / 0`` is ``inf``, not an exception).
    ``eps`` and ``one`` come as scalars of the statistics dtype so the arithmetic stays in it.
    """
    for c in range(scale.shape[0]):
        scale[c] = (one / np.sqrt(running_var[c] + eps)) * weight[c]
        shift[c] = bias[c]
