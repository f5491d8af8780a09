r"""numba kernels for batch norm fused with an activation (:mod:`bnkit.fused`), CPU only.

The training forward takes the batch norm's own road (the cpu backend's one-call plan, then the
activation in place); these kernels cover what that road has no pass for: the eval normalize with the
activation (:func:`row_act`), the standard backward in one pass over ``dz`` and ``x``
(:func:`channel_backward_std`: the activation's derivative rebuilt from ``x``), and the memory-saving
backward, which rebuilds ``y`` from ``z`` (the activation's inverse) inside its gradient passes.
They take contiguous (N, C, *) float32/float64 data seen as ``R = N * C`` rows of ``S`` contiguous
values (row ``r`` is channel ``r % C``), run rows in parallel, and accumulate per-row sums in float64
(:mod:`bnkit.fused` sums the rows of each channel); the backward (:func:`channel_backward_std`,
:func:`channel_backward_ms`) runs one channel per task and writes each channel right after reducing
it, while it is in cache (the structure of :mod:`bnkit.kernels.cpu.passes`); the ``row_*`` kernels
serve inputs with too few channels to keep every thread busy. Every inner loop runs over a row slice
(``xs = x[base : base + S]``, ``xs[i]``): indexing the flat array as ``x[base + i]`` makes numba handle
negative indices on each element, which makes the loop compute-bound.

Every tensor comes as a raw address (``Tensor.data_ptr()``, as the drivers of
:mod:`bnkit.kernels.cpu.drivers` take them: a numpy view of every tensor costs a microsecond or two on
each call), seen inside through ``_view``; the first argument, ``like`` (a zero of the data's dtype),
only selects the specialization. Data and per-channel vectors (``*a`` arguments) are of the data's
dtype, the per-row and per-channel sums (``out_*``) float64 unless said otherwise. An address carries
no type or size: :mod:`bnkit.fused` checks every tensor (CPU, dense, contiguous, dtype, size) or
allocates it before a call.
These kernels inline helpers of :mod:`bnkit.kernels.cpu.passes` (:data:`~bnkit.kernels.cpu.passes.RBLOCK`,
:func:`~bnkit.kernels.cpu.passes.to_acc`) and :mod:`bnkit.kernels.cpu.drivers` (``_view``, an array on
a raw address); :mod:`bnkit.kernels.cpu.cache` drops their cached code when those change.

Activation ids (``kind``): 0 identity, 1 relu, 2 leaky_relu (``p`` = slope), 3 elu
(``p`` = alpha), 4 silu, 5 gelu (erf form). Symbols as in :mod:`bnkit.fused`:
``y = (x - mean) * a + b`` (``a = w * invstd``), ``z = act(y)``, ``g = dz * act'(y)``,
``dx = A * g + K * (x - mean) + Cc`` (standard) or ``A * g + K * (y - b) + Cc`` (memory saving).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from bnkit.kernels.cpu.drivers import _view
from bnkit.kernels.cpu.passes import PRANGE_ONLY, RBLOCK, to_acc

__all__ = [
    "KINDS",
    "channel_backward_ms",
    "channel_backward_std",
    "lost_channel_count",
    "row_act",
    "row_input_ms",
    "row_input_ms_elu",
    "row_reduce_ms",
    "row_reduce_ms_elu",
    "slope",
]

KINDS = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "gelu": 5}
# reassoc lets LLVM vectorize the float64 row sums; no nnan/ninf: NaN and inf propagate.
_JIT = {"cache": True, "fastmath": {"reassoc", "contract", "nsz", "arcp"}}
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@njit(inline="always", **_JIT)
def _act(y, kind, p):
    if kind == 1:
        return y if y > 0 else 0.0 * y
    if kind == 2:
        return y if y > 0 else y * p
    if kind == 3:
        return y if y > 0 else p * math.expm1(y)
    if kind == 4:
        return y / (1.0 + math.exp(-y))
    if kind == 5:
        return 0.5 * y * (1.0 + math.erf(y * _SQRT1_2))
    return y


@njit(inline="always", **_JIT)
def _dact_from_input(y, kind, p):
    if kind == 1:
        return 1.0 if y > 0 else 0.0
    if kind == 2:
        return 1.0 if y > 0 else p
    if kind == 3:
        return 1.0 if y > 0 else p * math.exp(y)
    if kind == 4:
        s = 1.0 / (1.0 + math.exp(-y))
        return s * (1.0 + y * (1.0 - s))
    if kind == 5:
        return 0.5 * (1.0 + math.erf(y * _SQRT1_2)) + y * _INV_SQRT_2PI * math.exp(-0.5 * y * y)
    return 1.0


@njit(inline="always", **_JIT)
def _inverse_and_dact(z, kind, p, floor):
    """``(y, act'(y))`` from ``z = act(y)`` for identity, leaky_relu, elu."""
    if z > 0 or kind == 0:
        return z, 1.0
    if kind == 2:
        return z / p, p
    r = z / p
    return math.log1p(r if r > floor else floor), z + p


# --- one row of S contiguous values: the loop bodies every kernel below shares ----------------
# Loops are split on ``kind`` outside the inner loop: the piecewise-linear activations
# (identity, relu, leaky_relu: ``y if y > 0 else q * y`` with slope q = 1, 0, p) get a
# branch-free body that LLVM vectorizes; the others call libm per element. Inlined, so each
# kernel compiles the same loops as if they were written out in it.


@njit(inline="always", **_JIT)
def _act_row(xs, out, S, m, aa, bb, kind, p):
    # out = act((x - m) * aa + bb)
    if kind <= 2:
        for i in range(S):
            y = (xs[i] - m) * aa + bb
            out[i] = y if y > 0 else y * p
    else:
        for i in range(S):
            out[i] = _act((xs[i] - m) * aa + bb, kind, p)


@njit(inline="always", **_JIT)
def _std_sums(xs, gs, S, m, aa, bb, kind, p):
    # (sum(g), sum(g * (x - m))) with g = dz * act'((x - m) * aa + bb), float64 sums; the
    # piecewise-linear kinds sum blocks of RBLOCK values in the data's dtype first, as the
    # batch-norm backward does (bnkit.kernels.cpu.passes._dot_sums): float64 lanes ran at half width
    sg = 0.0
    sgx = 0.0
    if kind <= 2:
        for b0 in range(0, S, RBLOCK):
            xb = xs[b0 : min(b0 + RBLOCK, S)]
            gb = gs[b0 : min(b0 + RBLOCK, S)]
            tg = to_acc(xs, 0.0)
            tgx = tg
            for i in range(xb.shape[0]):
                xm = xb[i] - m
                g = gb[i]
                g = g if xm * aa + bb > 0 else g * p
                tg += g
                tgx += g * xm
            sg += tg
            sgx += tgx
    else:
        for i in range(S):
            xm = xs[i] - m
            g = gs[i] * _dact_from_input(xm * aa + bb, kind, p)
            sg += g
            sgx += g * xm
    return sg, sgx


@njit(inline="always", **_JIT)
def _std_dx(xs, gs, ds, S, m, aa, bb, kind, p, A_, K_, C_):
    # dx = A * g + K * (x - m) + Cc
    if kind <= 2:
        for i in range(S):
            xm = xs[i] - m
            g = gs[i]
            g = g if xm * aa + bb > 0 else g * p
            ds[i] = A_ * g + K_ * xm + C_
    else:
        for i in range(S):
            xm = xs[i] - m
            ds[i] = A_ * (gs[i] * _dact_from_input(xm * aa + bb, kind, p)) + K_ * xm + C_


@njit(inline="always", **_JIT)
def _ms_sums(zs, gs, S, bb, kind, p, floor):
    # (sum(g), sum(g * (y - bb))) with y = act^-1(z), float64 sums
    sg = 0.0
    sgy = 0.0
    if kind <= 2:  # blocks in the data's dtype, as in _std_sums
        for b0 in range(0, S, RBLOCK):
            zb = zs[b0 : min(b0 + RBLOCK, S)]
            gb = gs[b0 : min(b0 + RBLOCK, S)]
            tg = to_acc(zs, 0.0)
            tgy = tg
            for i in range(zb.shape[0]):
                zz = zb[i]
                pos = zz > 0
                g = gb[i] if pos else gb[i] * p
                y = zz if pos else zz / p
                tg += g
                tgy += g * (y - bb)
            sg += tg
            sgy += tgy
    else:
        for i in range(S):
            y, d = _inverse_and_dact(zs[i], kind, p, floor)
            g = gs[i] * d
            sg += g
            sgy += g * (y - bb)
    return sg, sgy


@njit(inline="always", **_JIT)
def _ms_dx(zs, gs, ds, S, bb, kind, p, floor, A_, K_, C_):
    # dx = A * g + K * (y - bb) + Cc with y = act^-1(z)
    if kind <= 2:
        for i in range(S):
            zz = zs[i]
            pos = zz > 0
            g = gs[i] if pos else gs[i] * p
            y = zz if pos else zz / p
            ds[i] = A_ * g + K_ * (y - bb) + C_
    else:
        for i in range(S):
            y, d = _inverse_and_dact(zs[i], kind, p, floor)
            ds[i] = A_ * (gs[i] * d) + K_ * (y - bb) + C_


@njit(cache=True)
def lost_channel_count(like, wa, ba, C, ratio, floor):
    """How many channels have ``|w| <= ratio * |b| + floor`` (:func:`bnkit.fused._lost_channels`).

    ``wa``/``ba``: the addresses of the contiguous weight and bias (``ba`` 0: no bias), of ``like``'s dtype.
    No fastmath: the same float32/float64 operations as the numpy expression it replaces
    (``ratio`` and ``floor`` come as scalars of ``w``'s dtype); a NaN weight is not lost. One
    call on raw addresses instead of six numpy ufuncs (or numpy views): the check runs on every
    memory-saving training forward.
    """
    w = _view(wa, C, like)
    n = 0
    for c in range(C):
        bc = _view(ba, C, like)[c] if ba != 0 else like
        if abs(w[c]) <= ratio * abs(bc) + floor:
            n += 1
    return n


def slope(kind: int, p: float) -> float:
    """``q`` of the piecewise-linear activations (identity 1, relu 0, leaky_relu p)."""
    return 1.0 if kind == 0 else (0.0 if kind == 1 else p)


@njit(parallel=PRANGE_ONLY, **_JIT)
def row_act(like, xa, outa, R, C, S, meana, aa, ba, kind, p):
    """``out = act((x - mean) * a + b)`` over ``R`` rows of ``S`` values; ``outa`` may be ``xa`` (in place)."""
    x = _view(xa, R * S, like)
    out = _view(outa, R * S, like)
    mean = _view(meana, C, like)
    a = _view(aa, C, like)
    b = _view(ba, C, like)
    for r in prange(R):
        c = r % C
        base = r * S
        _act_row(x[base : base + S], out[base : base + S], S, mean[c], a[c], b[c], kind, p)


# The row kernels' sums go to ``sums`` in the parallel loop and are copied out after it: numba's parfor
# pass drops a store at the loop's index into an array the function made itself and does not read after
# the loop, and a view of an address is such an array.


@njit(inline="always", **_JIT)
def _copy_row_sums(sums, R, out_ga, out_gya):
    # a row kernel's (R, 2) sums to its outputs, after its parallel loop
    out_g = _view(out_ga, R, 0.0)
    out_gy = _view(out_gya, R, 0.0)
    for r in range(R):
        out_g[r] = sums[r, 0]
        out_gy[r] = sums[r, 1]


@njit(parallel=PRANGE_ONLY, **_JIT)
def row_reduce_ms(like, dza, za, R, C, S, ba, kind, p, floor, out_ga, out_gya):
    """Per row: ``out_g = sum(g)`` and ``out_gy = sum(g * (y - b))`` with ``y = act^{-1}(z)`` (``R`` values each)."""
    dz = _view(dza, R * S, like)
    z = _view(za, R * S, like)
    b = _view(ba, C, like)
    sums = np.empty((R, 2))
    for r in prange(R):
        base = r * S
        sums[r, 0], sums[r, 1] = _ms_sums(z[base : base + S], dz[base : base + S], S, b[r % C], kind, p, floor)
    _copy_row_sums(sums, R, out_ga, out_gya)


@njit(parallel=PRANGE_ONLY, **_JIT)
def row_input_ms(like, dza, za, R, C, S, ba, kind, p, floor, Aa, Ka, Cca, dxa):
    """``dx = A * g + K * (y - b) + Cc`` with ``y = act^{-1}(z)``."""
    dz = _view(dza, R * S, like)
    z = _view(za, R * S, like)
    dx = _view(dxa, R * S, like)
    b = _view(ba, C, like)
    A = _view(Aa, C, like)
    K = _view(Ka, C, like)
    Cc = _view(Cca, C, like)
    for r in prange(R):
        c = r % C
        base = r * S
        _ms_dx(z[base : base + S], dz[base : base + S], dx[base : base + S], S, b[c], kind, p, floor,
               A[c], K[c], Cc[c])


# --- memory-saving ELU backward with the logarithm computed outside -------------------------
# ELU's inverse needs ``log1p`` per element, which numba calls as scalar libm here (no SVML):
# an order of magnitude slower than torch's vectorized ``log1p``. :mod:`bnkit.fused` therefore has torch
# write ``L = log1p(z / alpha)`` into a buffer (``dx`` itself when it is wanted; NaN or -inf
# where the output saturated); :func:`row_reduce_ms_elu` turns ``L`` into ``y`` in place
# (``y = z if z > 0 else L``, ``log1p(floor)`` where ``z / alpha <= floor``, as
# :func:`bnkit.fused.activation_inverse` clamps) while it reduces, and :func:`row_input_ms_elu`
# reads ``y`` back. ``g = dz if z > 0 else dz * (z + alpha)``. Branch-free bodies that LLVM
# vectorizes; the buffer (``Ya``) covers the same rows as ``z``.


@njit(parallel=PRANGE_ONLY, **_JIT)
def row_reduce_ms_elu(like, dza, za, Ya, R, C, S, ba, p, floor, log_floor, out_ga, out_gya):
    """Per row: ``out_g = sum(g)`` and ``out_gy = sum(g * (y - b))``; ``Y`` holds ``L`` on entry and ``y`` on exit."""
    dz = _view(dza, R * S, like)
    z = _view(za, R * S, like)
    Y = _view(Ya, R * S, like)
    b = _view(ba, C, like)
    sums = np.empty((R, 2))
    for r in prange(R):
        bb = b[r % C]
        base = r * S
        z_s = z[base : base + S]
        dz_s = dz[base : base + S]
        y_s = Y[base : base + S]
        sg = 0.0
        sgy = 0.0
        for i in range(S):
            zz = z_s[i]
            ll = y_s[i]
            gg = dz_s[i]
            pos = zz > 0
            g = gg if pos else gg * (zz + p)
            y = zz if pos else (ll if zz / p > floor else log_floor)
            y_s[i] = y
            sg += g
            sgy += g * (y - bb)
        sums[r, 0] = sg
        sums[r, 1] = sgy
    _copy_row_sums(sums, R, out_ga, out_gya)


@njit(parallel=PRANGE_ONLY, **_JIT)
def row_input_ms_elu(like, dza, za, Ya, R, C, S, ba, p, Aa, Ka, Cca, dxa):
    """``dx = A * g + K * (y - b) + Cc`` with ``y`` read from ``Y`` (``Ya`` may be ``dxa``)."""
    dz = _view(dza, R * S, like)
    z = _view(za, R * S, like)
    Y = _view(Ya, R * S, like)
    dx = _view(dxa, R * S, like)
    b = _view(ba, C, like)
    A = _view(Aa, C, like)
    K = _view(Ka, C, like)
    Cc = _view(Cca, C, like)
    for r in prange(R):
        c = r % C
        bb, A_, K_, C_ = b[c], A[c], K[c], Cc[c]
        base = r * S
        z_s = z[base : base + S]
        dz_s = dz[base : base + S]
        y_s = Y[base : base + S]
        dx_s = dx[base : base + S]
        for i in range(S):
            zz = z_s[i]
            gg = dz_s[i]
            g = gg if zz > 0 else gg * (zz + p)
            dx_s[i] = A_ * g + K_ * (y_s[i] - bb) + C_


# --- fused training/eval backward, one channel per task --------------------------------------
# Each task reduces its channel, forms the coefficients of ``dx``, then writes ``dx`` while the
# channel's ``dz`` and ``x`` (or ``z``) are still in cache, so memory is read about once (the
# structure of :func:`bnkit.kernels.cpu.passes.ncs_backward_train`). ``scratch`` (3 * C values of the
# data dtype, allocated here) holds ``A, K, Cc`` rounded to the data dtype; ``write`` False only reduces
# (``dxa`` is then never touched).


@njit(parallel=PRANGE_ONLY, **_JIT)
def channel_backward_std(like, dza, xa, N, C, S, G, meana, aa, ba, kind, p, wa, inva, M, training, write, out_ga,
                         out_gxa, dxa):
    """Standard mode: ``out_g = sum(g)``, ``out_gx = sum(g * (x - mean))`` per channel (float64),
    then ``dx = A * g + K * (x - mean) + Cc`` with ``A = w * inv``, ``K = -A * inv**2 * out_gx / M``,
    ``Cc = -a * out_g / M`` (``K = Cc = 0`` when not ``training``); one group of ``G`` channels per task.
    ``w`` and ``inv`` (the weight and invstd) are of the data's dtype and enter the coefficients in float64."""
    total = N * C * S
    dz = _view(dza, total, like)
    x = _view(xa, total, like)
    dx = _view(dxa, total, like)
    mean = _view(meana, C, like)
    a = _view(aa, C, like)
    b = _view(ba, C, like)
    w = _view(wa, C, like)
    inv = _view(inva, C, like)
    out_g = _view(out_ga, C, 0.0)
    out_gx = _view(out_gxa, C, 0.0)
    scratch = np.empty(3 * C, x.dtype)
    for g in prange((C + G - 1) // G):
        c0 = g * G
        gc = min(G, C - c0)
        sg = np.zeros(gc)
        sgx = np.zeros(gc)
        for n in range(N):
            base = (n * C + c0) * S
            for j in range(gc):
                c = c0 + j
                lo = base + j * S
                rg, rgx = _std_sums(x[lo : lo + S], dz[lo : lo + S], S, mean[c], a[c], b[c], kind, p)
                sg[j] += rg
                sgx[j] += rgx
        for j in range(gc):
            out_g[c0 + j] = sg[j]
            out_gx[c0 + j] = sgx[j]
        if not write:
            continue
        for j in range(gc):
            c = c0 + j
            inv_c = np.float64(inv[c])
            a64 = np.float64(w[c]) * inv_c
            scratch[3 * c] = a64
            scratch[3 * c + 1] = -a64 * inv_c * (sgx[j] * inv_c / M) if training else 0.0
            scratch[3 * c + 2] = -a64 * (sg[j] / M) if training else 0.0
        for n in range(N):
            base = (n * C + c0) * S
            for j in range(gc):
                c = c0 + j
                lo = base + j * S
                A_, K_, C_ = scratch[3 * c], scratch[3 * c + 1], scratch[3 * c + 2]
                _std_dx(x[lo : lo + S], dz[lo : lo + S], dx[lo : lo + S], S, mean[c], a[c], b[c], kind, p, A_, K_, C_)


@njit(parallel=PRANGE_ONLY, **_JIT)
def channel_backward_ms(like, dza, za, N, C, S, G, wa, ba, vara, eps, kind, p, floor, M, training, write, dwa, dba,
                        dxa):
    """Memory-saving mode, one group of ``G`` channels per task: ``db = sum(g)`` and
    ``dw = sum(g * xhat) = sum(g * (y - b)) / w`` with ``y = act^{-1}(z)`` (float64 sums, stored in the data's
    dtype), then ``dx = A * g + K * (y - b) + Cc`` with ``A = w * inv``, ``K = -inv * sum(g * (y - b)) / (w * M)``,
    ``Cc = -A * sum(g) / M`` (``K = Cc = 0`` when not ``training``), ``inv = 1 / sqrt(var + eps)`` in float64.
    ``wa``, ``ba``, ``vara``: the weight, bias (address 0: ones, zeros) and the variance the forward normalized
    with; needs ``w != 0`` (no lost channel)."""
    total = N * C * S
    dz = _view(dza, total, like)
    z = _view(za, total, like)
    dx = _view(dxa, total, like)
    w = _view(wa, C, like)  # read only when wa != 0 (else ones), as b (else zeros)
    b = _view(ba, C, like)
    var = _view(vara, C, like)
    dw = _view(dwa, C, like)
    db = _view(dba, C, like)
    scratch = np.empty(3 * C, z.dtype)
    for g in prange((C + G - 1) // G):
        c0 = g * G
        gc = min(G, C - c0)
        sg = np.zeros(gc)
        sgy = np.zeros(gc)
        for n in range(N):
            base = (n * C + c0) * S
            for j in range(gc):
                c = c0 + j
                lo = base + j * S
                bc = b[c] if ba != 0 else like
                rg, rgy = _ms_sums(z[lo : lo + S], dz[lo : lo + S], S, bc, kind, p, floor)
                sg[j] += rg
                sgy[j] += rgy
        for j in range(gc):
            c = c0 + j
            wc = np.float64(w[c]) if wa != 0 else 1.0
            db[c] = sg[j]
            dw[c] = sgy[j] / wc
        if not write:
            continue
        for j in range(gc):
            c = c0 + j
            wc = np.float64(w[c]) if wa != 0 else 1.0
            inv = 1.0 / math.sqrt(var[c] + eps)
            a64 = wc * inv
            scratch[3 * c] = a64
            scratch[3 * c + 1] = -inv * (sgy[j] / wc / M) if training else 0.0
            scratch[3 * c + 2] = -a64 * (sg[j] / M) if training else 0.0
        for n in range(N):
            base = (n * C + c0) * S
            for j in range(gc):
                c = c0 + j
                lo = base + j * S
                bc = b[c] if ba != 0 else like
                A_, K_, C_ = scratch[3 * c], scratch[3 * c + 1], scratch[3 * c + 2]
                _ms_dx(z[lo : lo + S], dz[lo : lo + S], dx[lo : lo + S], S, bc, kind, p, floor, A_, K_, C_)
