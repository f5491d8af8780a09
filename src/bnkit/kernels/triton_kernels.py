r"""Triton kernels for batch norm (imported only by :func:`bnkit.kernels.triton.load_backend`).

Every kernel sees the input through one three-dimensional view ``(Np, C, Sp)`` with strides
``(sN, sC, sS)`` chosen by the launcher (:mod:`bnkit.kernels.triton`):

* contiguous ``(N, C, *spatial)``: ``Np = N``, ``Sp = prod(spatial)``, ``sS = 1`` (``CL = False``);
* channels-inner (channels_last, channels_last_3d, ``(N, C)``, or the ``(N, C, L)`` view of an
  ``(N, L, C)`` tensor): ``Np = 1``, ``Sp = N * prod(spatial)`` rows, ``sS = C``, ``sC = 1`` (``CL = True``).

A program works on tiles of shape ``[BLOCK_C, BLOCK_S]`` (channels x positions). Tile ``t`` of a
channel block covers positions ``(t % n_sb) * BLOCK_S + arange(BLOCK_S)`` of sample ``t // n_sb``,
so the tiles of one channel block are numbered ``0 .. Np * n_sb - 1``. The fast-moving axis of a
tile is the one with unit stride (``s`` for NCHW, ``c`` for channels-inner): loads are coalesced in
both layouts, never one program per channel with strided loads.

Numerics (the policy of :mod:`bnkit.reference`, with float32 accumulators for 16/32-bit inputs and
float64 ones for float64): statistics are never ``E[x^2] - E[x]^2``. Each lane of a tile keeps a
Welford triple ``(n, mean, M2)``; lanes, then programs (split reduction), are merged with Chan's
formula (Chan, Golub, LeVeque 1979), see :func:`welford_combine` and :func:`merge_lanes`.
Symbols as in ``docs/math.md``: ``mean``, ``var`` (biased), ``invstd = 1/sqrt(var + eps)``, ``scale = w * invstd``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ruff: noqa: N803  (kernel arguments use the capitalised pointer names of Triton's tutorials)


@triton.jit
def welford_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's formula: ``(n, mean, M2)`` of the union of two disjoint sets (either may be empty).

    ``n = n_a + n_b``, ``delta = mean_b - mean_a``, ``mean = mean_a + delta * n_b / n``,
    ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``.
    """
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)  # counts are whole numbers: n == 0 only when both sides are empty
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def merge_lanes(n, mean, m2, AXIS: tl.constexpr):
    """Chan's formula for many disjoint sets at once (the lanes along ``AXIS``)::

        n = sum(n_l),  mean = sum(n_l * mean_l) / n,  M2 = sum(M2_l + n_l * (mean_l - mean)**2)

    The deviations are taken from the merged mean (two passes over the lanes), so nothing cancels.
    """
    n_tot = tl.sum(n, AXIS)
    mean_tot = tl.sum(n * mean, AXIS) / tl.maximum(n_tot, 1.0)
    dev = mean - tl.expand_dims(mean_tot, AXIS)
    return n_tot, mean_tot, tl.sum(m2 + n * dev * dev, AXIS)


@triton.jit
def _tile(t, c, c_mask, n_sb, Sp, sN, sC, sS, BLOCK_S: tl.constexpr, CL: tl.constexpr):
    """Offsets and mask of tile ``t`` for the channels ``c`` (see the module docstring)."""
    n = t // n_sb
    s = (t % n_sb) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = c_mask[:, None] & (s < Sp)[None, :]
    if CL:
        offs = n * sN + s[None, :] * sS + c[:, None]  # unit stride along c
    else:
        offs = n * sN + c[:, None] * sC + s[None, :]  # unit stride along s
    return offs, mask


@triton.jit
def _shift(X, c, c_mask, sC, ACC: tl.constexpr):
    """``x[0, c, 0]``, the per-channel shift ``K`` the statistics are accumulated around.

    Welford on ``x - K`` instead of ``x`` keeps float32 statistics accurate when
    ``|mean| >> std``: the shifted values are small, and every program of a split
    reduction uses the same ``K``, so the partial means merge without cancellation.
    A non-finite ``x[0, c, 0]`` gives ``K = 0`` (``k * 0 == 0`` is False only for inf and NaN).
    """
    k = tl.load(X + c * sC, mask=c_mask, other=0.0).to(ACC)
    return tl.where(k * 0.0 == 0.0, k, 0.0)


@triton.jit
def _welford_tiles(X, t0, t1, c, c_mask, n_sb, Sp, sN, sC, sS,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CL: tl.constexpr):
    """Per-channel ``(n, mean - K, M2)`` of tiles ``t0 .. t1 - 1`` (``K`` from :func:`_shift`):
    lane-wise Welford, then Chan across lanes."""
    k = _shift(X, c, c_mask, sC, ACC)
    cnt = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    mean = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for t in range(t0, t1):
        offs, mask = _tile(t, c, c_mask, n_sb, Sp, sN, sC, sS, BLOCK_S, CL)
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        x = tl.where(mask, x - k[:, None], 0.0)
        valid = mask.to(ACC)
        cnt += valid
        delta = x - mean
        mean += delta * valid / tl.maximum(cnt, 1.0)
        m2 += delta * (x - mean) * valid
    return merge_lanes(cnt, mean, m2, 1)


@triton.jit
def _load_channels(P, c, c_mask, ACC: tl.constexpr, HAS: tl.constexpr, default: tl.constexpr):
    if HAS:
        return tl.load(P + c, mask=c_mask, other=default).to(ACC)
    else:
        return tl.full(c.shape, default, ACC)


@triton.jit
def _scale_shift(n, m2, W, B, c, c_mask, eps_hi, eps_lo,
                 ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """``(var, scale, shift)`` from ``(n, M2)``: biased var, ``scale = w * invstd``, ``shift = b``."""
    var = m2 / tl.maximum(n, 1.0)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)  # eps arrives as two float32 halves (exact for float64)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd * _load_channels(W, c, c_mask, ACC, HAS_W, 1.0)
    shift = _load_channels(B, c, c_mask, ACC, HAS_B, 0.0)
    return var, scale, shift


# --- training forward: statistics ---------------------------------------------------------


@triton.jit
def stats_partial_kernel(
    X,                   # input, viewed as (Np, C, Sp)
    CNT, MEAN, M2,       # out: (n_splits, C) partial Welford triples (MEAN shifted by K), ACC dtype
    C, Sp, sN, sC, sS,   # view sizes and strides
    n_sb,                # tiles per sample: cdiv(Sp, BLOCK_S)
    n_tiles,             # tiles per channel block: Np * n_sb
    tiles_per_split,     # tiles each program reduces
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CL: tl.constexpr,
):
    """Split reduction, grid ``(c_blocks, n_splits)``: program ``(i, j)`` reduces the tiles
    ``j * tiles_per_split ...`` of channel block ``i`` and stores their ``(n, mean, M2)``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    split = tl.program_id(1)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    n, mean, m2 = _welford_tiles(X, t0, t1, c, c_mask, n_sb, Sp, sN, sC, sS, ACC, BLOCK_C, BLOCK_S, CL)
    out = split * C + c
    tl.store(CNT + out, n, mask=c_mask)
    tl.store(MEAN + out, mean, mask=c_mask)
    tl.store(M2 + out, m2, mask=c_mask)


@triton.jit
def stats_finalize_kernel(
    CNT, MEAN, M2,                 # (n_splits, C) partials from stats_partial_kernel
    X,                             # the input, only to read the shift K = x[0, c, 0]
    W, B,                          # weight, bias (C,) or dummies when HAS_W/HAS_B are False
    MEAN_OUT, VAR_OUT,             # out: (C,) batch mean and biased variance, ACC dtype
    SCALE_OUT, SHIFT_OUT,          # out: (C,) w * invstd and b, for the normalize pass
    C, sC, n_splits, eps_hi, eps_lo,
    ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the partials of every split (Chan), grid ``(c_blocks,)``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_n = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    acc_mean = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    acc_m2 = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    for k0 in range(0, n_splits, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = (k < n_splits)[:, None] & c_mask[None, :]
        offs = k[:, None] * C + c[None, :]
        n_b = tl.load(CNT + offs, mask=mask, other=0.0)
        mean_b = tl.load(MEAN + offs, mask=mask, other=0.0)
        m2_b = tl.load(M2 + offs, mask=mask, other=0.0)
        acc_n, acc_mean, acc_m2 = welford_combine(acc_n, acc_mean, acc_m2, n_b, mean_b, m2_b)
    n, mean, m2 = merge_lanes(acc_n, acc_mean, acc_m2, 0)
    mean += _shift(X, c, c_mask, sC, ACC)
    var, scale, shift = _scale_shift(n, m2, W, B, c, c_mask, eps_hi, eps_lo, ACC, HAS_W, HAS_B)
    tl.store(MEAN_OUT + c, mean, mask=c_mask)
    tl.store(VAR_OUT + c, var, mask=c_mask)
    tl.store(SCALE_OUT + c, scale, mask=c_mask)
    tl.store(SHIFT_OUT + c, shift, mask=c_mask)


# --- elementwise passes ----------------------------------------------------------------------


@triton.jit
def _elementwise_tile(C, n_sb, c_blocks, BLOCK_C: tl.constexpr, CL: tl.constexpr):
    """Channel indices and tile number of this program in a 1-D grid over all tiles, ordered
    like memory (channel blocks innermost for channels-inner, positions innermost otherwise)."""
    pid = tl.program_id(0)
    if CL:
        cb = pid % c_blocks
        t = pid // c_blocks
    else:
        sb = pid % n_sb
        rest = pid // n_sb
        cb = rest % c_blocks
        t = (rest // c_blocks) * n_sb + sb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C, t


@triton.jit
def affine_kernel(
    X, Y,                          # input and output, same strides, viewed as (Np, C, Sp)
    MEAN, SCALE, SHIFT,            # (C,) statistics-dtype vectors
    C, Sp, sN, sC, sS, n_sb, c_blocks,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CL: tl.constexpr,
):
    """``y = (x - mean[c]) * scale[c] + shift[c]``: the normalize pass of training and eval."""
    c, c_mask, t = _elementwise_tile(C, n_sb, c_blocks, BLOCK_C, CL)
    offs, mask = _tile(t, c, c_mask, n_sb, Sp, sN, sC, sS, BLOCK_S, CL)
    mean = tl.load(MEAN + c, mask=c_mask, other=0.0).to(ACC)
    scale = tl.load(SCALE + c, mask=c_mask, other=0.0).to(ACC)
    shift = tl.load(SHIFT + c, mask=c_mask, other=0.0).to(ACC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def backward_input_kernel(
    DY, X, DX,                     # same strides, viewed as (Np, C, Sp)
    MEAN, A, K, CC,                # (C,) statistics-dtype vectors
    C, Sp, sN, sC, sS, n_sb, c_blocks,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CL: tl.constexpr,
):
    """``dx = a[c] * dy + k[c] * (x - mean[c]) + c[c]`` (see :mod:`bnkit.autograd` for a, k, c)."""
    c, c_mask, t = _elementwise_tile(C, n_sb, c_blocks, BLOCK_C, CL)
    offs, mask = _tile(t, c, c_mask, n_sb, Sp, sN, sC, sS, BLOCK_S, CL)
    mean = tl.load(MEAN + c, mask=c_mask, other=0.0).to(ACC)
    a = tl.load(A + c, mask=c_mask, other=0.0).to(ACC)
    k = tl.load(K + c, mask=c_mask, other=0.0).to(ACC)
    cc = tl.load(CC + c, mask=c_mask, other=0.0).to(ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    dx = a[:, None] * dy + k[:, None] * (x - mean[:, None]) + cc[:, None]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# --- backward: reductions ----------------------------------------------------------------------


@triton.jit
def backward_reduce_partial_kernel(
    DY, X,                         # same strides, viewed as (Np, C, Sp)
    MEAN,                          # (C,) statistics-dtype mean the deviations are taken from
    SUM_DY, SUM_DY_XMU,            # out: (n_splits, C) partial sums, ACC dtype
    C, Sp, sN, sC, sS, n_sb, n_tiles, tiles_per_split,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CL: tl.constexpr,
):
    """Partial ``sum(dy)`` and ``sum(dy * (x - mean))``, grid ``(c_blocks, n_splits)``.

    With one split the partials are the result (the small-tensor path: one launch)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    split = tl.program_id(1)
    mean = tl.load(MEAN + c, mask=c_mask, other=0.0).to(ACC)
    acc_dy = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    acc_dy_xmu = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        offs, mask = _tile(t, c, c_mask, n_sb, Sp, sN, sC, sS, BLOCK_S, CL)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        acc_dy += dy
        acc_dy_xmu += dy * tl.where(mask, x - mean[:, None], 0.0)
    out = split * C + c
    tl.store(SUM_DY + out, tl.sum(acc_dy, 1), mask=c_mask)
    tl.store(SUM_DY_XMU + out, tl.sum(acc_dy_xmu, 1), mask=c_mask)


@triton.jit
def sum_splits_kernel(
    P, Q,                          # (n_splits, C) partials
    P_OUT, Q_OUT,                  # out: (C,) their sums over splits
    C, n_splits,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the per-split partials of :func:`backward_reduce_partial_kernel`, grid ``(c_blocks,)``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_p = tl.zeros([BLOCK_K, BLOCK_C], P.dtype.element_ty)
    acc_q = tl.zeros([BLOCK_K, BLOCK_C], P.dtype.element_ty)
    for k0 in range(0, n_splits, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = (k < n_splits)[:, None] & c_mask[None, :]
        offs = k[:, None] * C + c[None, :]
        acc_p += tl.load(P + offs, mask=mask, other=0.0)
        acc_q += tl.load(Q + offs, mask=mask, other=0.0)
    tl.store(P_OUT + c, tl.sum(acc_p, 0), mask=c_mask)
    tl.store(Q_OUT + c, tl.sum(acc_q, 0), mask=c_mask)


# --- small tensors: the whole training forward in one launch -----------------------------------


@triton.jit
def fused_forward_train_kernel(
    X, Y,                          # input and output, same strides, viewed as (Np, C, Sp)
    W, B,                          # weight, bias (C,) or dummies
    MEAN_OUT, VAR_OUT,             # out: (C,) batch mean and biased variance, ACC dtype
    C, Sp, sN, sC, sS, n_sb, n_tiles, eps_hi, eps_lo,
    ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CL: tl.constexpr,
):
    """Statistics then normalize for one channel block per program, grid ``(c_blocks,)``.

    For tensors that fit in L2 the second read of ``x`` comes from cache, and one launch
    replaces three."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n, mean, m2 = _welford_tiles(X, 0, n_tiles, c, c_mask, n_sb, Sp, sN, sC, sS, ACC, BLOCK_C, BLOCK_S, CL)
    mean += _shift(X, c, c_mask, sC, ACC)
    var, scale, shift = _scale_shift(n, m2, W, B, c, c_mask, eps_hi, eps_lo, ACC, HAS_W, HAS_B)
    tl.store(MEAN_OUT + c, mean, mask=c_mask)
    tl.store(VAR_OUT + c, var, mask=c_mask)
    for t in range(0, n_tiles):
        offs, mask = _tile(t, c, c_mask, n_sb, Sp, sN, sC, sS, BLOCK_S, CL)
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
