r"""numba drivers of the cpu backend: a whole pass of a batch norm in one compiled call, on both roads.

On small inputs a batch norm costs microseconds of arithmetic, and work around it (numpy views of
every tensor, several launches per pass, the torch ops of the running-statistics update) costs many
times that. These kernels take the data as raw addresses (``Tensor.data_ptr()``, far cheaper than
``Tensor.numpy()``) and do everything of one pass in one launch.

The small kernels (the ``small`` plans, up to ``plan.SMALL_NUMEL`` elements; eval at every size):

* :func:`train_forward`: per-channel mean and biased variance in one read (float64 sums of ``x - K``
  and ``(x - K)**2`` with ``K`` the channel's first finite value, as the checked road's short rows),
  the output ``y = (x - mean) * scale + shift`` rounded once from float64, and the new running
  statistics (:func:`bnkit.kernels.cpu.passes.update_running`, the one compiled update);
* :func:`eval_forward`: the eval output from the running statistics, with the arithmetic of the
  checked road (:func:`bnkit.kernels.cpu.passes.eval_coeffs`, then ``(x - mean) * scale + shift``); for an
  ``(N, C, L)`` view of ``(N, L, C)`` memory it writes the contiguous output torch gives (tiles of rows,
  :func:`_normalize_transposed`);
* :func:`train_backward` / :func:`eval_backward` (one body, :func:`_backward`): both reductions in
  float64, then ``dx = a*dy + k*(x - mean) + c`` in training (the symbols of :mod:`bnkit.autograd`) or
  ``dx = a*dy`` in eval, with ``dweight`` and ``dbias``.

Each has a parallel twin (``*_par``, above ``plan.SMALL_SERIAL_NUMEL`` elements) that cuts its
passes into ranges of rows, each task with its own float64 accumulators (all share one shift per
channel, so the partial sums simply add). Memory is channel-major ``(N, C, S)`` (``S = 1`` for
``(N, C)``, and for channels-innermost memory, passed as ``(N*S, C, 1)``), float32 or float64, every
per-channel vector contiguous in the data's dtype.

The drivers of the planned paths (:data:`TRAIN_DRIVERS`, :data:`BACKWARD_DRIVERS`,
:data:`EVAL_BACKWARD_DRIVERS`, :func:`eval_forward16` for 16-bit eval) and of the checked road's other
passes (:data:`AFFINE_DRIVERS`, :data:`REDUCE_DRIVERS`) run the kernels of
:mod:`bnkit.kernels.cpu.passes` in one call each, the same kernels on both roads, so both give the same
numbers and each kernel compiles once per dtype; their arguments come as named tuples (:class:`Shape`,
:class:`TrainPlan`, :class:`Running`, ...).

A raw address carries no type or size: :meth:`bnkit.kernels.cpu.backend.CpuBackend.check` checks every
tensor (type, device, dtype, shape, contiguity) before a call, and a call it cannot prove safe takes
the checked road, whose methods check the layouts and convert the vectors before their drivers run.
The ``like`` argument (a zero of the data's dtype) only selects the specialization.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

from bnkit.kernels.cpu.passes import (
    PRANGE_ONLY,
    ncs_affine_any,
    ncs_backward_rows,
    ncs_backward_train,
    ncs_reduce,
    ncs_train_all,
    ncs_train_groups_all,
    ncs_train_rows,
    nsc_affine,
    nsc_backward_train,
    nsc_reduce,
    nsc_tile_to_ncs,
    nsc_to_ncs_tiles,
    nsc_train,
    nsc_train_to_ncs,
    run_time,
    update_running,
)

__all__ = [
    "AFFINE_DRIVERS",
    "AffineData",
    "AffinePlan",
    "AffineVectors",
    "BACKWARD_DRIVERS",
    "BackwardPlan",
    "Data",
    "EvalVectors",
    "GradVectors",
    "Grads",
    "Running",
    "Shape",
    "TrainPlan",
    "TrainVectors",
    "EVAL_BACKWARD_DRIVERS",
    "REDUCE_DRIVERS",
    "ReduceVectors",
    "TRAIN_DRIVERS",
    "affine_ncs",
    "affine_nsc",
    "backward_fused",
    "backward_nsc",
    "backward_rows",
    "eval_backward",
    "eval_backward_ncs",
    "eval_backward_nsc",
    "eval_backward_par",
    "eval_forward",
    "eval_forward16",
    "eval_forward_par",
    "probe",
    "reduce_ncs",
    "reduce_nsc",
    "train_groups",
    "train_long",
    "train_nsc",
    "train_rows",
    "train_backward",
    "train_backward_par",
    "train_forward",
    "train_forward_par",
]

_FAST = {"reassoc", "contract", "nsz", "arcp"}

# The named arguments of the one-call drivers (numba types a named tuple field by field; each field
# one meaning). Addresses are Tensor.data_ptr() values, 0 for an absent vector.
# x's memory as N rows of C channels of S values (layout_of); L > 0: x is an (N, C, L) view of (N, L, C)
# memory whose output is written contiguous (S == L), else 0
Shape = namedtuple("Shape", ["N", "C", "S", "L"])
# a forward's input and output
Data = namedtuple("Data", ["x", "y"])
# a backward's incoming gradient, input, and input gradient
Grads = namedtuple("Grads", ["dy", "x", "dx"])
# the training forward's plan (plan.train_plan): channels per group, parts per channel, normalize
# each channel from cache, and the normalize plan (tasks, segments per row, constant tables)
TrainPlan = namedtuple("TrainPlan", ["G", "P", "fuse", "TA", "Q", "tab"])
# the training backward's plan (plan.backward_plan): channels per group, reduction tasks, normalize plan
BackwardPlan = namedtuple("BackwardPlan", ["G", "T", "TA", "Q", "tab"])
# the eval normalize's plan (plan._ncs_affine_plan / _nsc_parts)
AffinePlan = namedtuple("AffinePlan", ["T", "Q", "tab"])
# a training forward's weight and bias, and where its batch mean and biased variance go (0: not kept)
TrainVectors = namedtuple("TrainVectors", ["weight", "bias", "mean", "var"])
# an eval forward's running statistics, weight and bias
EvalVectors = namedtuple("EvalVectors", ["mean", "var", "weight", "bias"])
# a backward's statistics (the batch's, or the running ones in eval), weight, parameter gradients, and
# invstd: 0 computes it from var and eps (the one-call road), else its address (the checked road's contract
# passes invstd, SyncBatchNorm's from the global variance; var is then not read)
GradVectors = namedtuple("GradVectors", ["mean", "var", "weight", "dweight", "dbias", "invstd"])
# the checked road's elementwise pass out = a*u + k*(x - mean) + shift: its arrays (u 0: no u term)
AffineData = namedtuple("AffineData", ["u", "x", "out"])
# ... and its per-channel coefficients (all given)
AffineVectors = namedtuple("AffineVectors", ["a", "mean", "k", "shift"])
# the checked road's reduction sum(dy), sum(dy * (x - mean)) into sum_dy, sum_dy_xmu; with Grads.dx also
# dx = scale * dy in the same read (scale read only then)
ReduceVectors = namedtuple("ReduceVectors", ["mean", "scale", "sum_dy", "sum_dy_xmu"])
# the running-statistics update (passes.update_running): buffers, where the update goes (the buffers themselves
# in place), and ratio = count / (count - 1), keep = 1 - momentum, take = momentum in the statistics dtype
Running = namedtuple("Running", ["mean", "var", "new_mean", "new_var", "ratio", "keep", "take"])


@intrinsic
def _ptr(typingctx, addr, like):
    # an integer address as a pointer to values of like's type (for numba.carray)
    if not isinstance(addr, types.Integer) or not isinstance(like, (types.Float, types.Integer)):
        return None
    sig = types.CPointer(like)(addr, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@njit(cache=True)
def _view(addr, n, like):
    return carray(_ptr(addr, like), n)


# Row ranges. A "row" is S contiguous values of one channel (r = n*C + c, channel counted along) when
# S > 1, and one sample's C channels when S == 1 (the inner loop then runs across channels); there are
# _rows(N, C, S) of them. The serial kernels take all rows at once, the parallel ones cut them into T
# ranges, each with its own accumulators.


@njit(cache=True)
def _rows(N, C, S):
    return N * C if S > 1 else N


@njit(cache=True)
def _span(R, T, t):
    return (R * t) // T, (R * (t + 1)) // T


@njit(cache=True)
def _shifts(x, C, S, k):
    # K per channel: its first finite value (of sample 0)
    for c in range(C):
        k0 = float(x[c * S])
        k[c] = k0 if np.isfinite(k0) else 0.0


@njit(cache=True, fastmath=_FAST)
def _shifted_sums(x, C, S, r0, r1, k, s1, s2):
    # s1[c] += sum(x - K[c]), s2[c] += sum((x - K[c])**2) over rows [r0, r1), float64: the shifted
    # sums of the checked road's short rows (passes.ncs_row_stats)
    if S == 1:
        for n in range(r0, r1):
            xs = x[n * C : (n + 1) * C]
            for c in range(C):
                d = xs[c] - k[c]
                s1[c] += d
                s2[c] += d * d
        return
    c = r0 % C
    for r in range(r0, r1):
        xs = x[r * S : (r + 1) * S]
        kc = k[c]
        a = 0.0
        q = 0.0
        for i in range(S):
            d = xs[i] - kc
            a += d
            q += d * d
        s1[c] += a
        s2[c] += q
        c += 1
        if c == C:
            c = 0


@njit(cache=True, fastmath=_FAST)
def _normalize(x, y, C, S, r0, r1, mu, k, sh):
    # y = (x - mu[c]) * k[c] + sh[c] over rows [r0, r1), in the precision of mu/k/sh, rounded once
    if S == 1:
        for n in range(r0, r1):
            xs = x[n * C : (n + 1) * C]
            ys = y[n * C : (n + 1) * C]
            for c in range(C):
                ys[c] = (xs[c] - mu[c]) * k[c] + sh[c]
        return
    c = r0 % C
    for r in range(r0, r1):
        xs = x[r * S : (r + 1) * S]
        ys = y[r * S : (r + 1) * S]
        mc = mu[c]
        kc = k[c]
        shc = sh[c]
        for i in range(S):
            ys[i] = (xs[i] - mc) * kc + shc
        c += 1
        if c == C:
            c = 0


@njit(inline="always")
def _train_forward(like, xa, ya, N, C, S, wa, ba, eps, meana, vara, rma, rva, nma, nva, ratio, keep, take, L, T):
    total = N * C * S
    x = _view(xa, total, like)
    y = _view(ya, total, like)
    # mean and var are kept (for a backward) only when given addresses; otherwise scratch
    mean = _view(meana, C, like) if meana != 0 else np.empty(C, x.dtype)
    var = _view(vara, C, like) if vara != 0 else np.empty(C, x.dtype)
    R = _rows(N, C, S)
    k = np.empty(C)
    _shifts(x, C, S, k)
    s1 = np.zeros((T, C))
    s2 = np.zeros((T, C))
    for t in prange(T):
        r0, r1 = _span(R, T, t)
        _shifted_sums(x, C, S, r0, r1, k, s1[t], s2[t])
    sum_d = _add_tasks(s1)
    sum_d2 = _add_tasks(s2)
    mu = np.empty(C)
    sc = np.empty(C)
    sh = np.zeros(C)
    M = float(N * S)
    for c in range(C):
        a = sum_d[c]
        mu[c] = k[c] + a / M
        m2 = sum_d2[c] - a * (a / M)
        v = (m2 if not m2 < 0.0 else 0.0) / M
        mean[c] = mu[c]
        var[c] = v
        sc[c] = (_view(wa, C, like)[c] if wa != 0 else 1.0) / np.sqrt(v + eps)
        if ba != 0:
            sh[c] = _view(ba, C, like)[c]
    _normalize_tasks(x, y, N, C, S, L, T, mu, sc, sh)
    if rma != 0:
        rm, rv, nm, nv = _view(rma, C, like), _view(rva, C, like), _view(nma, C, like), _view(nva, C, like)
        update_running(mean, var, (rm, rv, nm, nv, ratio, keep, take))


@njit(cache=True)
def train_forward(like, xa, ya, N, C, S, wa, ba, eps, meana, vara, rma, rva, nma, nva, ratio, keep, take, L):
    """Training forward of ``(N, C, S)`` data at address ``xa`` into ``ya``, on the calling thread.

    ``wa``/``ba``: weight and bias addresses, 0 when absent. Writes the mean and biased variance
    (statistics dtype) to ``meana``/``vara`` (0: not kept). With running statistics (``rma``, ``rva`` non-zero)
    it writes their update, ``run * keep + stat * take`` with ``stat = var * ratio`` for the
    variance, to ``nma``/``nva`` (which may be ``rma``/``rva`` themselves: an in-place update).
    ``ratio``, ``keep`` and ``take`` come rounded to the statistics dtype, as torch rounds the
    Python scalars of the reference's expression. ``L > 0``: an ``(N // L, C, L)`` view of ``(N // L, L, C)``
    memory, whose ``y`` is written contiguous (as :func:`eval_forward`).
    """
    _train_forward(like, xa, ya, N, C, S, wa, ba, eps, meana, vara, rma, rva, nma, nva, ratio, keep, take, L, 1)


@njit(cache=True, parallel=PRANGE_ONLY)
def train_forward_par(like, xa, ya, N, C, S, wa, ba, eps, meana, vara, rma, rva, nma, nva, ratio, keep, take, L,
                      T):
    """:func:`train_forward` with its two passes cut into ``T`` parallel ranges of rows."""
    _train_forward(like, xa, ya, N, C, S, wa, ba, eps, meana, vara, rma, rva, nma, nva, ratio, keep, take, L, T)


@njit(cache=True, error_model="numpy")
def _eval_coeff(rv, w, eps, one):
    # passes.eval_coeffs for one channel: (1 / sqrt(rv + eps)) * w in the statistics dtype, no fastmath
    return (one / np.sqrt(rv + eps)) * w


def _as_like(like, v):
    """``v`` rounded to ``like``'s type (as torch rounds a Python scalar to a tensor's dtype)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(_as_like)
def _as_like_impl(like, v):
    if like == types.float32:
        return lambda like, v: np.float32(v)
    return lambda like, v: np.float64(v)


@njit(inline="always")
def _eval_scale_shift(rv, wa, ba, C, eps, one):
    # per channel scale = passes.eval_coeffs' (1 / sqrt(rv + eps)) * w and shift = b, in one's dtype (the
    # statistics dtype: eps and one are scalars of it)
    k = np.empty_like(rv)
    sh = np.zeros_like(rv)
    for c in range(C):
        k[c] = _eval_coeff(rv[c], _view(wa, C, one)[c] if wa != 0 else one, eps, one)
        if ba != 0:
            sh[c] = _view(ba, C, one)[c]
    return k, sh


@njit(cache=True, fastmath=_FAST)
def _normalize_transposed(x, y, C, L, t0, t1, mu, k, sh):
    # rows of channels (S == 1) of (B, L, C) memory into (B, C, L) memory, tiles [t0, t1) of
    # passes.nsc_tile_to_ncs, with _normalize's arithmetic (unfolded)
    for t in range(t0, t1):
        nsc_tile_to_ncs(x, y, L, C, t, False, mu, k, sh)


@njit(inline="always")
def _normalize_tasks(x, y, N, C, S, L, T, mu, k, sh):
    # y = (x - mu) * k + sh in T tasks, both forms in one parallel loop (each prange loop compiles into a
    # function of its own): rows of (N, C, S) memory, or with L > 0 tiles of the rows of channels of
    # (N // L, L, C) memory, y written (N // L, C, L)
    R = nsc_to_ncs_tiles(N // L, L) if L > 0 else _rows(N, C, S)
    for t in prange(T):
        if L > 0:
            t0, t1 = _span(R, T, t)
            _normalize_transposed(x, y, C, L, t0, t1, mu, k, sh)
        else:
            r0, r1 = _span(R, T, t)
            _normalize(x, y, C, S, r0, r1, mu, k, sh)


@njit(inline="always")
def _eval_forward(like, xa, ya, N, C, S, rma, rva, wa, ba, eps, L, T):
    eps = _as_like(like, eps)
    one = _as_like(like, 1.0)
    total = N * C * S
    x = _view(xa, total, like)
    y = _view(ya, total, like)
    rm = _view(rma, C, like)
    k, sh = _eval_scale_shift(_view(rva, C, like), wa, ba, C, eps, one)
    _normalize_tasks(x, y, N, C, S, L, T, rm, k, sh)


@njit(cache=True)
def eval_forward(like, xa, ya, N, C, S, rma, rva, wa, ba, eps, L):
    """Eval forward from the running statistics: the numbers of the ``cpu`` backend's
    ``forward_eval_running`` (which gets ``eps`` and 1 in the statistics dtype).

    ``L > 0``: ``x`` is an ``(N // L, C, L)`` view of ``(N // L, L, C)`` memory (``S == 1``: ``N`` rows of
    channels), and ``y`` is written contiguous ``(N // L, C, L)``, the layout torch gives that output,
    in the same pass (:func:`_normalize_transposed`)."""
    _eval_forward(like, xa, ya, N, C, S, rma, rva, wa, ba, eps, L, 1)


@njit(cache=True, parallel=PRANGE_ONLY)
def eval_forward_par(like, xa, ya, N, C, S, rma, rva, wa, ba, eps, L, T):
    """:func:`eval_forward` cut into ``T`` parallel ranges of rows (of tiles with ``L > 0``)."""
    _eval_forward(like, xa, ya, N, C, S, rma, rva, wa, ba, eps, L, T)


@njit(cache=True)
def eval_forward16(like, data, shape, vectors, eps, plan):
    """Eval forward of 16-bit data from float32 running statistics (and weight/bias): the ``cpu``
    backend's ``forward_eval_running`` in one call, its numbers by construction.

    ``like`` is a zero of the raw type (``np.uint16``: bfloat16, ``np.int16``: float16); ``data`` the
    :class:`Data` addresses, ``shape`` the :class:`Shape`, ``vectors`` the :class:`EvalVectors` and ``plan``
    the :class:`AffinePlan` of the launcher. The float32 scale is :func:`bnkit.kernels.cpu.passes.eval_coeffs`'
    (``eps`` rounded to float32), then the backend's own normalize kernels run on the raw 16-bit values:
    :func:`bnkit.kernels.cpu.passes.nsc_affine` on rows of channels (``S == 1``, ``T`` row ranges), else
    :func:`bnkit.kernels.cpu.passes.ncs_affine_any` with the launcher's plan (``T``, ``Q``, ``tab``).
    """
    N, C, S = shape.N, shape.C, shape.S
    total = N * C * S
    x = _view(data.x, total, like)
    y = _view(data.y, total, like)
    one = np.float32(1.0)
    rm = _view(vectors.mean, C, one)
    k, sh = _eval_scale_shift(_view(vectors.var, C, one), vectors.weight, vectors.bias, C, np.float32(eps), one)
    if S == 1:
        nsc_affine(x, x, y, N, C, plan.T, run_time(False), k, rm, k, sh)
    else:
        ncs_affine_any(x, x, y, N, C, S, plan.T, plan.Q, run_time(False), k, rm, k, sh, plan.tab)


def _norm_zero(like):
    """A zero of the normalization dtype for data of ``like``'s type: float64 for float32/float64 data,
    float32 for raw 16-bit values (the cpu backend's ``_NORM``)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(_norm_zero)
def _norm_zero_impl(like):
    if isinstance(like, types.Integer):
        return lambda like: np.float32(0.0)
    return lambda like: 0.0


# The one-call drivers of the cpu backend's kernels: one per path of its plan, so that a first call
# compiles only its own kernel (a single driver over all paths made the first call compile every path).
# Their arguments come grouped in named tuples (numba types each field by its name), one meaning a slot:
# the data's addresses, its shape, the launcher's plan, the per-channel vectors, the running-statistics
# update. A path ignores the plan fields it does not use.


@njit(inline="always")
def _train_vectors(like, data, shape, vectors, running):
    # views and scratch of a training forward (see train_rows): the arrays the launcher makes
    N, C, S = shape.N, shape.C, shape.S
    total = N * C * S
    x = _view(data.x, total, like)
    y = _view(data.y, total, like)
    ratio = running.ratio
    one = _as_like(ratio, 1.0)
    if vectors.weight != 0:
        w = _view(vectors.weight, C, ratio)
    else:
        w = np.full(C, one)
    if vectors.bias != 0:
        b = _view(vectors.bias, C, ratio)
    else:
        b = np.zeros_like(w)
    if vectors.mean != 0:
        mean = _view(vectors.mean, C, ratio)
        var = _view(vectors.var, C, ratio)
    else:
        mean = np.empty_like(w)
        var = np.empty_like(w)
    if running.mean != 0:
        rm = _view(running.mean, C, ratio)
        rv = _view(running.var, C, ratio)
        nm = _view(running.new_mean, C, ratio)
        nv = _view(running.new_var, C, ratio)
    else:
        rm = rv = nm = nv = np.empty(0, mean.dtype)
    norm = np.full((3, C), _norm_zero(like))
    return x, y, w, b, mean, var, norm, (rm, rv, nm, nv, ratio, running.keep, running.take)


@njit(cache=True)
def train_rows(like, data, shape, plan, vectors, eps, running):
    """Training forward of any size and dtype: the ``cpu`` backend's ``forward_train`` with the
    running-statistics update in one call, its numbers by construction; this one for short
    channel-major rows (:func:`bnkit.kernels.cpu.passes.ncs_train_rows`), :func:`train_groups`,
    :func:`train_nsc` and :func:`train_long` for the other paths of
    :func:`bnkit.kernels.cpu.plan.train_plan`, whose fields they take (:class:`TrainPlan`).

    ``like``: a zero of the data's type (raw ``np.uint16``/``np.int16`` for bfloat16/float16);
    ``data``: the :class:`Data` addresses; ``shape``: the :class:`Shape` of ``x``'s memory as
    :func:`bnkit.kernels.cpu.plan.layout_of` gives it; ``vectors``: the :class:`TrainVectors` (the batch
    mean and biased variance go to ``mean``/``var``; 0: they stay inside); ``running``: the
    :class:`Running` update (its scalars in the statistics dtype, float32 for 16-bit data; ``mean`` 0:
    no update).
    """
    x, y, w, b, mean, var, norm, upd = _train_vectors(like, data, shape, vectors, running)
    N, C, S, P = shape.N, shape.C, shape.S, plan.P
    parts = np.empty((3, P, C))
    ncs_train_rows(x, y, N, C, S, P, parts[0], parts[1], parts[2], w, b, eps, mean, var, norm[0], norm[1], norm[2],
                   plan.TA, plan.Q, plan.tab, upd)  # fmt: skip


@njit(cache=True)
def train_groups(like, data, shape, plan, vectors, eps, running):
    """:func:`train_rows` for groups of ``plan.G`` channels (:func:`bnkit.kernels.cpu.passes.ncs_train_groups_all`)."""
    x, y, w, b, mean, var, norm, upd = _train_vectors(like, data, shape, vectors, running)
    ncs_train_groups_all(x, y, shape.N, shape.C, shape.S, plan.G, w, b, eps, mean, var, norm[0], norm[1], norm[2],
                         upd)  # fmt: skip


@njit(cache=True)
def train_nsc(like, data, shape, plan, vectors, eps, running):
    """:func:`train_rows` for channels-innermost memory (:func:`bnkit.kernels.cpu.passes.nsc_train`). ``shape.L > 0``:
    ``x`` is an ``(N, C, L)`` view of ``(N, L, C)`` memory (``S == L``) and ``y`` is contiguous:
    :func:`bnkit.kernels.cpu.passes.nsc_train_to_ncs`, as the cpu backend's ``forward_train``."""
    x, y, w, b, mean, var, norm, upd = _train_vectors(like, data, shape, vectors, running)
    N, C, S, P = shape.N, shape.C, shape.S, plan.P
    parts = np.empty((3, P, C))
    if shape.L > 0:
        _train_to_ncs(like, x, y, N, S, C, P, parts, w, b, eps, mean, var, norm, upd)
        return
    nsc_train(x, y, N * S, C, P, parts[0], parts[1], parts[2], w, b, eps, mean, var, norm[0], norm[1], norm[2], upd)


def _train_to_ncs(like, x, y, N, S, C, P, parts, w, b, eps, mean, var, norm, upd):
    """:func:`bnkit.kernels.cpu.passes.nsc_train_to_ncs` for float32/float64 data; raw 16-bit data never has
    ``L > 0`` (the launcher passes 0), so its drivers do not compile that kernel (a compile-time choice)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(_train_to_ncs, inline="always")
def _train_to_ncs_impl(like, x, y, N, S, C, P, parts, w, b, eps, mean, var, norm, upd):
    if isinstance(like, types.Integer):

        def refuse(like, x, y, N, S, C, P, parts, w, b, eps, mean, var, norm, upd):
            raise ValueError("an (N, C, L) view takes float32/float64 data")

        return refuse

    def run(like, x, y, N, S, C, P, parts, w, b, eps, mean, var, norm, upd):
        nsc_train_to_ncs(x, y, N, S, C, P, parts[0], parts[1], parts[2], w, b, eps, mean, var, norm[0], norm[1],
                         norm[2], upd)  # fmt: skip

    return run


@njit(cache=True)
def train_long(like, data, shape, plan, vectors, eps, running):
    """:func:`train_rows` for long channel-major rows (:func:`bnkit.kernels.cpu.passes.ncs_train_all`)."""
    x, y, w, b, mean, var, norm, upd = _train_vectors(like, data, shape, vectors, running)
    N, C, S, P = shape.N, shape.C, shape.S, plan.P
    parts = np.empty((3, P, C))
    ncs_train_all(x, y, N, C, S, P, plan.fuse, w, b, eps, mean, var, norm[0], norm[1], norm[2], parts[0], parts[1],
                  parts[2], plan.TA, plan.Q, plan.tab, upd)  # fmt: skip


@njit(inline="always", error_model="numpy")
def _backward_vectors(like, grads, shape, vectors, eps):
    # views and scratch of a training backward (see backward_rows; the eval backward's too): the arrays
    # the launcher makes
    C = shape.C
    total = shape.N * C * shape.S
    g = _view(grads.dy, total, like)
    x = _view(grads.x, total, like)
    dx = _view(grads.dx, total, like)
    mean = _view(vectors.mean, C, eps)
    one = _as_like(eps, 1.0)
    if vectors.invstd != 0:
        inv = _view(vectors.invstd, C, eps)
    else:
        var = _view(vectors.var, C, eps)
        inv = np.empty_like(mean)
        for c in range(C):
            inv[c] = one / np.sqrt(var[c] + eps)
    if vectors.weight != 0:
        w = _view(vectors.weight, C, eps)
    else:
        w = np.full(C, one)
    dbias = _view(vectors.dbias, C, eps)
    dweight = _view(vectors.dweight, C, eps)
    return g, x, dx, mean, inv, w, dbias, dweight, np.empty((3, C), mean.dtype)


@njit(cache=True, error_model="numpy")
def backward_rows(like, grads, shape, plan, vectors, eps):
    """Training backward of any size and dtype: the ``cpu`` backend's ``backward_train`` in one call,
    its numbers by construction; this one for short channel-major rows in two passes
    (:func:`bnkit.kernels.cpu.passes.ncs_backward_rows`), :func:`backward_fused` and :func:`backward_nsc` for
    the other paths of :func:`bnkit.kernels.cpu.plan.backward_plan` (:class:`BackwardPlan`).

    ``grads``: the :class:`Grads` addresses; ``vectors``: the :class:`GradVectors` (the saved batch mean and
    biased variance; ``dweight``/``dbias`` written). ``invstd = 1 / sqrt(var + eps)`` in the statistics
    dtype (``eps`` comes as a scalar of it; the correctly rounded operations of autograd's
    ``torch.rsqrt(var + eps)``), or read from ``vectors.invstd`` (the checked road's ``backward_train``);
    writes ``dx``, ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)``.
    """
    g, x, dx, mean, inv, w, s0, s1, co = _backward_vectors(like, grads, shape, vectors, eps)
    N, C, S = shape.N, shape.C, shape.S
    ncs_backward_rows(g, x, dx, N, C, S, plan.T, mean, inv, w, float(N * S), s0, s1, co[0], co[1], co[2], plan.TA,
                      plan.Q, plan.tab)  # fmt: skip


@njit(cache=True, error_model="numpy")
def backward_fused(like, grads, shape, plan, vectors, eps):
    """:func:`backward_rows` for each channel or group of ``plan.G`` reduced and written from cache
    (:func:`bnkit.kernels.cpu.passes.ncs_backward_train`)."""
    g, x, dx, mean, inv, w, s0, s1, co = _backward_vectors(like, grads, shape, vectors, eps)
    ncs_backward_train(g, x, dx, shape.N, shape.C, shape.S, plan.G, mean, inv, w, s0, s1, co[0], co[1], co[2])


@njit(cache=True, error_model="numpy")
def backward_nsc(like, grads, shape, plan, vectors, eps):
    """:func:`backward_rows` for channels-innermost memory (:func:`bnkit.kernels.cpu.passes.nsc_backward_train`)."""
    g, x, dx, mean, inv, w, s0, s1, co = _backward_vectors(like, grads, shape, vectors, eps)
    R = shape.N * shape.S
    nsc_backward_train(g, x, dx, R, shape.C, plan.T, mean, inv, w, float(R), s0, s1, co[0], co[1], co[2])


@njit(inline="always")
def _scale_by(v, f):
    # v *= f per channel, one rounding each (autograd's sum_dy_xmu * invstd)
    for c in range(v.shape[0]):
        v[c] = v[c] * f[c]


@njit(cache=True, error_model="numpy")
def eval_backward_ncs(like, grads, shape, T, vectors, eps):
    """Eval-mode backward of any size and dtype: the ``cpu`` backend's ``backward_eval`` (one read of
    ``dy`` and ``x``: ``dx = scale * dy`` and both reductions, :func:`bnkit.kernels.cpu.passes.ncs_reduce` in
    ``T`` row ranges) with autograd's coefficients, in one call; :func:`eval_backward_nsc` for
    channels-innermost memory. The views and ``invstd`` are the training backward's
    (:func:`_backward_vectors`, with the running statistics in ``vectors.mean``/``vectors.var``);
    ``scale = invstd * w`` (``w`` all ones without weight: the same bits as ``invstd``) and
    ``dweight = sum(dy * (x - running_mean)) * invstd`` in the statistics dtype, as autograd's torch ops
    make them; ``dbias = sum(dy)``."""
    g, x, dx, rm, inv, w, s0, s1, _ = _backward_vectors(like, grads, shape, vectors, eps)
    ncs_reduce(g, x, shape.N, shape.C, shape.S, T, rm, s0, s1, run_time(True), dx, inv * w)
    _scale_by(s1, inv)


@njit(cache=True, error_model="numpy")
def eval_backward_nsc(like, grads, shape, T, vectors, eps):
    """:func:`eval_backward_ncs` for channels-innermost memory (:func:`bnkit.kernels.cpu.passes.nsc_reduce`)."""
    g, x, dx, rm, inv, w, s0, s1, _ = _backward_vectors(like, grads, shape, vectors, eps)
    nsc_reduce(g, x, shape.N * shape.S, shape.C, T, rm, s0, s1, run_time(True), dx, inv * w)
    _scale_by(s1, inv)


# The checked road's elementwise and reduction passes (CpuBackend.forward_eval, backward_input,
# backward_reduce, backward_eval), one driver per memory order, on the planned paths' kernels. Their vectors
# are of the statistics dtype, so for float32 data the affine kernels compile a second time (float32
# coefficients; the training paths pass float64 ones): float32 arithmetic, as the eval forward's.


@njit(inline="always")
def _affine_views(like, data, shape, vectors, zero):
    # views of the checked road's elementwise pass; u absent: x (not read)
    total = shape.N * shape.C * shape.S
    x = _view(data.x, total, like)
    u = _view(data.u, total, like) if data.u != 0 else x
    C = shape.C
    a, m = _view(vectors.a, C, zero), _view(vectors.mean, C, zero)
    return u, x, _view(data.out, total, like), a, m, _view(vectors.k, C, zero), _view(vectors.shift, C, zero)


@njit(cache=True)
def affine_ncs(like, data, shape, plan, vectors, zero):
    """``out = a*u + k*(x - mean) + shift`` on channel-major memory (:func:`bnkit.kernels.cpu.passes.ncs_affine_any`
    with the launcher's :class:`AffinePlan`): the ``cpu`` backend's ``forward_eval`` (no ``u``) and
    ``backward_input``. ``data``: :class:`AffineData`, ``vectors``: :class:`AffineVectors` (vectors of
    ``zero``'s type, the statistics dtype)."""
    u, x, out, a, m, k, sh = _affine_views(like, data, shape, vectors, zero)
    ncs_affine_any(u, x, out, shape.N, shape.C, shape.S, plan.T, plan.Q, run_time(data.u != 0), a, m, k, sh,
                   plan.tab)  # fmt: skip


@njit(cache=True)
def affine_nsc(like, data, shape, plan, vectors, zero):
    """:func:`affine_ncs` for channels-innermost memory (:func:`bnkit.kernels.cpu.passes.nsc_affine`, ``plan.T`` row
    ranges)."""
    u, x, out, a, m, k, sh = _affine_views(like, data, shape, vectors, zero)
    nsc_affine(u, x, out, shape.N * shape.S, shape.C, plan.T, run_time(data.u != 0), a, m, k, sh)


@njit(inline="always")
def _reduce_views(like, grads, shape, vectors, zero):
    # views of the checked road's reduction; dx absent: dy and mean stand in (not written, not read)
    total = shape.N * shape.C * shape.S
    C = shape.C
    g = _view(grads.dy, total, like)
    m = _view(vectors.mean, C, zero)
    dx = _view(grads.dx, total, like) if grads.dx != 0 else g
    k = _view(vectors.scale, C, zero) if grads.dx != 0 else m
    s0, s1 = _view(vectors.sum_dy, C, zero), _view(vectors.sum_dy_xmu, C, zero)
    return g, _view(grads.x, total, like), m, s0, s1, dx, k


@njit(cache=True)
def reduce_ncs(like, grads, shape, T, vectors, zero):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per channel on channel-major memory in ``T`` row ranges
    (:func:`bnkit.kernels.cpu.passes.ncs_reduce`), with ``grads.dx`` also ``dx = scale * dy``: the ``cpu``
    backend's ``backward_reduce`` and ``backward_eval``. ``vectors``: :class:`ReduceVectors` of ``zero``'s type."""
    g, x, m, s0, s1, dx, k = _reduce_views(like, grads, shape, vectors, zero)
    ncs_reduce(g, x, shape.N, shape.C, shape.S, T, m, s0, s1, run_time(grads.dx != 0), dx, k)


@njit(cache=True)
def reduce_nsc(like, grads, shape, T, vectors, zero):
    """:func:`reduce_ncs` for channels-innermost memory (:func:`bnkit.kernels.cpu.passes.nsc_reduce`)."""
    g, x, m, s0, s1, dx, k = _reduce_views(like, grads, shape, vectors, zero)
    nsc_reduce(g, x, shape.N * shape.S, shape.C, T, m, s0, s1, run_time(grads.dx != 0), dx, k)


# plan path (bnkit.kernels.cpu.plan.train_plan / backward_plan) -> its driver's name
TRAIN_DRIVERS = {"groups": "train_groups", "rows": "train_rows", "nsc": "train_nsc", "long": "train_long"}
BACKWARD_DRIVERS = {"fused": "backward_fused", "rows": "backward_rows", "nsc": "backward_nsc"}
# memory order (bnkit.kernels.cpu.plan.layout_of) -> the eval backward's driver's name
EVAL_BACKWARD_DRIVERS = {"ncs": "eval_backward_ncs", "nsc": "eval_backward_nsc"}
# memory order -> the checked road's eval forward, elementwise pass and reduction drivers' names
AFFINE_DRIVERS = {"ncs": "affine_ncs", "nsc": "affine_nsc"}
REDUCE_DRIVERS = {"ncs": "reduce_ncs", "nsc": "reduce_nsc"}


@njit(cache=True, fastmath=_FAST)
def _grad_sums(g, x, C, S, r0, r1, mean, s0, s1):
    # s0[c] += sum(dy), s1[c] += sum(dy * (x - mean[c])) over rows [r0, r1), in float64. (Not the regular
    # path's per-channel float32 lanes, as in cpu._ncs_reduce_lanes: faster here, but the gradients' errors
    # grew, and float32 SGD steps of test_e2e_resnet drifted from float64 much further than torch's.)
    if S == 1:
        for n in range(r0, r1):
            gs = g[n * C : (n + 1) * C]
            xs = x[n * C : (n + 1) * C]
            for c in range(C):
                s0[c] += gs[c]
                s1[c] += gs[c] * (xs[c] - mean[c])
        return
    c = r0 % C
    for r in range(r0, r1):
        gs = g[r * S : (r + 1) * S]
        xs = x[r * S : (r + 1) * S]
        m = mean[c]
        a = 0.0
        q = 0.0
        for i in range(S):
            a += gs[i]
            q += gs[i] * (xs[i] - m)
        s0[c] += a
        s1[c] += q
        c += 1
        if c == C:
            c = 0


@njit(cache=True, fastmath=_FAST)
def _grad_input(g, x, dx, C, S, r0, r1, a, m, k, cc, training):
    # over rows [r0, r1), in float64, rounded once: training dx = a[c]*dy + k[c]*(x - m[c]) + cc[c];
    # eval dx = a[c]*dy, without reading x (as the checked road: an inf in x must not turn dx into NaN)
    if S == 1:
        for n in range(r0, r1):
            gs = g[n * C : (n + 1) * C]
            xs = x[n * C : (n + 1) * C]
            ds = dx[n * C : (n + 1) * C]
            if training:
                for c in range(C):
                    ds[c] = a[c] * gs[c] + k[c] * (xs[c] - m[c]) + cc[c]
            else:
                for c in range(C):
                    ds[c] = a[c] * gs[c]
        return
    c = r0 % C
    for r in range(r0, r1):
        gs = g[r * S : (r + 1) * S]
        xs = x[r * S : (r + 1) * S]
        ds = dx[r * S : (r + 1) * S]
        ac = a[c]
        if training:
            mc = m[c]
            kc = k[c]
            ccc = cc[c]
            for i in range(S):
                ds[i] = ac * gs[i] + kc * (xs[i] - mc) + ccc
        else:
            for i in range(S):
                ds[i] = ac * gs[i]
        c += 1
        if c == C:
            c = 0


@njit(cache=True)
def _add_tasks(acc):
    # acc[0, c] = sum over tasks t of acc[t, c] (in task order), returned as acc[0]
    for t in range(1, acc.shape[0]):
        for c in range(acc.shape[1]):
            acc[0, c] += acc[t, c]
    return acc[0]


@njit(inline="always")
def _backward(like, ga, xa, dxa, N, C, S, ma, va, wa, eps, dwa, dba, training, T):
    # Both modes from (mean, var): the batch's (training) or the running statistics (eval).
    # sum(dy) and sum(dy * (x - mean)) in one read; dweight = sum(dy * (x - mean)) * invstd,
    # dbias = sum(dy); then dx (when dxa is non-zero): see _grad_input.
    total = N * C * S
    g = _view(ga, total, like)
    x = _view(xa, total, like)
    mean = _view(ma, C, like)
    var = _view(va, C, like)
    dw = _view(dwa, C, like)
    db = _view(dba, C, like)
    R = _rows(N, C, S)
    s0 = np.zeros((T, C))
    s1 = np.zeros((T, C))
    for t in prange(T):
        r0, r1 = _span(R, T, t)
        _grad_sums(g, x, C, S, r0, r1, mean, s0[t], s1[t])
    sum_dy = _add_tasks(s0)
    sum_dy_xmu = _add_tasks(s1)
    M = float(N * S)
    a = np.empty(C)
    m = np.empty(C)
    k = np.zeros(C)
    cc = np.zeros(C)
    for c in range(C):
        inv = 1.0 / np.sqrt(float(var[c]) + eps)
        sum_dy_xhat = sum_dy_xmu[c] * inv
        dw[c] = sum_dy_xhat
        db[c] = sum_dy[c]
        a[c] = inv * (_view(wa, C, like)[c] if wa != 0 else 1.0)
        m[c] = mean[c]
        if training:
            k[c] = -a[c] * inv * (sum_dy_xhat / M)
            cc[c] = -a[c] * (sum_dy[c] / M)
    if dxa != 0:
        dx = _view(dxa, total, like)
        for t in prange(T):
            r0, r1 = _span(R, T, t)
            _grad_input(g, x, dx, C, S, r0, r1, a, m, k, cc, run_time(training))


@njit(cache=True)
def train_backward(like, ga, xa, dxa, N, C, S, meana, vara, wa, eps, dwa, dba):
    """Training backward: ``dx`` (when ``dxa`` is non-zero) and ``dweight = sum(dy * xhat)``,
    ``dbias = sum(dy)`` per channel, from the saved mean and biased variance.

    Per channel, in float64: ``invstd = 1 / sqrt(var + eps)``, ``a = invstd * w``,
    ``k = -a * invstd * dweight / M``, ``c = -a * dbias / M``; ``dx = a*dy + k*(x - mean) + c``.
    """
    _backward(like, ga, xa, dxa, N, C, S, meana, vara, wa, eps, dwa, dba, True, 1)


@njit(cache=True, parallel=PRANGE_ONLY)
def train_backward_par(like, ga, xa, dxa, N, C, S, meana, vara, wa, eps, dwa, dba, T):
    """:func:`train_backward` with its two passes cut into ``T`` parallel ranges of rows."""
    _backward(like, ga, xa, dxa, N, C, S, meana, vara, wa, eps, dwa, dba, True, T)


@njit(cache=True)
def eval_backward(like, ga, xa, dxa, N, C, S, rma, rva, wa, eps, dwa, dba):
    """Eval-mode backward (the running statistics are constants): ``dx = scale * dy`` (when ``dxa``
    is non-zero), ``dweight = sum(dy * (x - running_mean)) * invstd``, ``dbias = sum(dy)``.

    ``invstd = 1 / sqrt(running_var + eps)`` and ``scale = invstd * w`` in float64; ``dx`` rounded once.
    """
    _backward(like, ga, xa, dxa, N, C, S, rma, rva, wa, eps, dwa, dba, False, 1)


@njit(cache=True, parallel=PRANGE_ONLY)
def eval_backward_par(like, ga, xa, dxa, N, C, S, rma, rva, wa, eps, dwa, dba, T):
    """:func:`eval_backward` with its two passes cut into ``T`` parallel ranges of rows."""
    _backward(like, ga, xa, dxa, N, C, S, rma, rva, wa, eps, dwa, dba, False, T)


def probe() -> None:
    """Compile (or load from numba's cache) the raw-address view every kernel here reads its data through,
    and check that it sees the data.

    The cpu backend calls it before the one-call road's first use, so that a numba install that cannot
    build these kernels fails there, where it becomes one warning and the checked road (the ``cpu`` backend's
    own probe has already started numba's threading layer). The kernels themselves compile on their
    first call, once per dtype, so a first call compiles only what it runs; the one-call drivers
    (:data:`TRAIN_DRIVERS`, :data:`BACKWARD_DRIVERS`, :data:`EVAL_BACKWARD_DRIVERS`,
    :func:`eval_forward16`) turn a failure there into one warning too.
    """
    from bnkit.kernels.compiling import quiet

    x = np.arange(4, dtype=np.float32)
    with quiet():
        seen = _view(x.ctypes.data, 4, np.float32(0.0))
    if not np.array_equal(seen, x):
        raise RuntimeError("raw-address views read other data")
