"""The small-input path: a whole batch-norm call in one compiled call (:mod:`bnkit.kernels.cpu_small`).

On a small input the arithmetic of a batch norm takes microseconds, and the regular path spends many
times that around it (argument checks, backend dispatch, numpy views, one kernel per pass, six torch ops
for the running statistics), more than torch's whole batch norm. Here every check that guards a raw-
address kernel is made on the tensors directly, and anything unusual (another dtype or layout,
subclasses, tracing, transforms, forward AD, gradients of the running statistics, double backward)
returns ``None`` and takes the regular path, which raises torch's errors for bad arguments. A call that
passes every check has valid arguments: the checks imply everything
:func:`bnkit.functional.check_batch_norm_args` asks.

The numbers are the regular path's up to rounding: the statistics as its short rows make them
(float64 sums of ``x - K`` and ``(x - K)**2`` around the channel's first value), the output rounded
once from float64, the running statistics with the float operations of
:func:`bnkit.reference.update_running_stats`, the eval output with those of the ``cpu`` backend.
Calls that need a gradient go through :class:`_SmallTrainFn` / :class:`_SmallEvalFn` (one kernel
each way, up to ``SMALL_GRAD_NUMEL`` elements). Beyond the small kernels (training above
``SMALL_NUMEL``, above ``SMALL_GRAD_NUMEL`` with a graph, eval backwards above ``SMALL_GRAD_NUMEL``,
and bfloat16/float16 data with float32 vectors, up to ``ONE_CALL_NUMEL``: every size) each pass is
still one compiled call, of the cpu backend's own plan and kernels on raw addresses
(:mod:`bnkit.kernels.cpu_small`'s drivers, :class:`_RegularTrainFn` with a graph), so the bits are the
regular path's; eval forwards stay on the small kernel at every size (16-bit:
:func:`bnkit.kernels.cpu_small.eval_forward16`, the backend's coefficients and normalize kernels):
one compiled call per pass is faster than the regular launcher's sequence at every size measured
(``benchmarks/results/decisions.md``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor
from torch.autograd import forward_ad as _fwAD
from torch.nn import Parameter

from bnkit import kernels
from bnkit.autograd import _like, _wrapped, plain_eager

__all__ = ["ONE_CALL_NUMEL", "SMALL_GRAD_NUMEL", "SMALL_NUMEL", "batch_norm"]

# Up to this many elements the small kernels run serially (as the cpu backend does: waking a second
# thread costs more than it saves); above, their parallel twins take TASKS_PER_THREAD ranges of rows
# per thread.
SERIAL_NUMEL = 1 << 15
TASKS_PER_THREAD = 4

# Inputs of at most SMALL_NUMEL elements take the small path; calls that record a graph (a backward
# follows) only up to SMALL_GRAD_NUMEL: above it the cpu backend's in-cache fused backward wins
# (the small path's forward+backward falls behind it between 2**19 and 2**20 elements).
SMALL_NUMEL = 1 << 20
SMALL_GRAD_NUMEL = 1 << 19
# Up to ONE_CALL_NUMEL elements (every size) the calls the small kernels do not take, for their size
# or a 16-bit dtype, still take one compiled call per pass: eval without a graph on the small kernel
# (16-bit: eval_forward16), training on the cpu backend's own plan and kernels (train_rows and the
# other per-path drivers, backward_rows and its kind after them): one call per pass is faster than the
# regular launcher's sequence of kernel calls, or as fast on large contiguous inputs.
ONE_CALL_NUMEL = 1 << 62

_NP = {torch.float32: np.float32, torch.float64: np.float64}
_F32, _F64, _STRIDED = torch.float32, torch.float64, torch.strided
_BF16, _F16 = torch.bfloat16, torch.float16
# 16-bit dtype -> a zero of the raw type its kernels read (as the cpu backend's views)
_RAW16 = {torch.bfloat16: np.uint16(0), torch.float16: np.int16(0)}
# dtype -> the first argument of its kernels (a zero of the type they read the data as)
_NO_TABLE = np.empty((4, 0), np.float32)
_ZERO = {torch.float32: np.float32(0.0), torch.float64: np.float64(0.0)}
_LIKE = {**_ZERO, **_RAW16}
_ITEMSIZE = {torch.float32: 4, torch.float64: 8}
# torch.autograd.graph.increment_version without its Python wrapper (the callers pass tuples of tensors)
_increment_version = torch._C._increment_version
# (value, dtype) -> value as a numpy scalar of dtype (0.5 us to make, 0.1 to look up)
_SCALARS: dict = {}

_K = None  # bnkit.kernels.cpu_small once loaded; False if it failed to (then the path is off)


def _kernels():
    """The small kernels, compiled (or loaded from numba's cache) on first use; ``False`` if they fail to.

    A failure is one warning, and every later call takes the regular path (which has its own fallback
    to the reference), as a fast backend that cannot load does.
    """
    global _K, _threads, _nsc_parts, _ncs_affine_plan, _train_plan, _backward_plan, _layout_of
    if _K is None:
        try:
            from bnkit.kernels import cpu_small
            from bnkit.kernels.cpu_launch import _ncs_affine_plan, _nsc_parts, _threads
            from bnkit.kernels.cpu_launch import backward_plan as _backward_plan
            from bnkit.kernels.cpu_launch import layout_of as _layout_of
            from bnkit.kernels.cpu_launch import train_plan as _train_plan

            cpu_small.probe()
        except Exception as exc:  # a broken numba install: one warning, then the regular path
            warnings.warn(
                f"bnkit: the small-input kernels are unavailable ({type(exc).__name__}: {exc}); "
                "small inputs take the regular path",
                RuntimeWarning,
                stacklevel=3,
            )
            _K = False
        else:
            _K = cpu_small
    return _K


# bnkit.kernels.cpu_launch's _threads, _nsc_parts, _ncs_affine_plan, train_plan, backward_plan and layout_of,
# with the kernels
_threads = _nsc_parts = _ncs_affine_plan = _train_plan = _backward_plan = _layout_of = None


def _launch(serial, parallel, args: tuple, n: int, c: int, s: int) -> None:
    """Run a small kernel on ``(n, c, s)`` memory: ``serial(*args)`` up to ``SERIAL_NUMEL`` elements or
    with one thread, else ``parallel(*args, T)`` with ``TASKS_PER_THREAD`` ranges of rows per thread
    (numba set to torch's thread count, as the cpu backend sets it). The kernels are loaded: callers
    got here through :func:`_layout`."""
    numel = n * c * s
    nt = 1 if numel <= SERIAL_NUMEL else _threads(numel)
    if nt == 1:
        _call(serial, args)
    else:
        _call(parallel, (*args, min(n * c if s > 1 else n, TASKS_PER_THREAD * nt)))


# (kernel, type of its first argument) -> the compiled specialization's entry point. The first
# argument (a zero of the data's dtype) fixes every argument's numba type: the others are Python
# ints (int64), eps (a float) and numpy scalars of that dtype. Calling the entry point skips the
# dispatcher's typing of every argument, nearly half the cost of calling an 11-argument kernel.
_ENTRY: dict = {}


def _driver(names: dict, path):
    """The one-call driver of a plan's path or a memory order (``cpu_small.TRAIN_DRIVERS``,
    ``BACKWARD_DRIVERS``, ``EVAL_BACKWARD_DRIVERS``)."""
    return getattr(_kernels(), names[path])


_BROKEN: set = set()  # one-call drivers whose first call (their compilation) failed


def _call_driver(kernel, args: tuple) -> bool:
    """:func:`_call` for the one-call drivers, which :func:`_kernels` does not probe: their first call
    compiles them (or loads them from numba's cache); if that fails, one warning, ``False`` (the
    caller takes the regular path, nothing was written) then and for every later call."""
    if (kernel, type(args[0])) in _ENTRY:
        _call(kernel, args)
        return True
    if kernel in _BROKEN:
        return False
    try:
        _call(kernel, args)
    except Exception as exc:  # a compile error: the kernel did not run
        _BROKEN.add(kernel)
        warnings.warn(
            f"bnkit: the one-call kernel {getattr(kernel, '__name__', kernel)} is unavailable "
            f"({type(exc).__name__}: {exc}); such calls take the regular path",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    return True


def _call(kernel, args: tuple) -> None:
    key = (kernel, type(args[0]))
    entry = _ENTRY.get(key)
    if entry is not None:
        entry(*args)
        return
    kernel(*args)  # compiles or loads the specialization
    overloads = getattr(kernel, "overloads", None)
    if overloads is None:
        return  # not a numba dispatcher (a test's spy): nothing to remember
    cres = overloads.get(tuple(kernel.typeof_pyval(a) for a in args))
    # no overload for exactly these types would be a numba change: keep the dispatcher
    _ENTRY[key] = kernel if cres is None else cres.entry_point


def _scalar(value: float, dtype: torch.dtype):
    key = (value, dtype)
    v = _SCALARS.get(key)
    if v is None:
        if len(_SCALARS) >= 256:
            _SCALARS.clear()
        v = _SCALARS[key] = _NP[dtype](value)
    return v


def _addr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _layout(x: Tensor, running_mean, running_var, weight, bias) -> tuple[int, int, int] | None:
    """``(N, C, S)`` of ``x``'s memory for the kernels when they may run on these tensors (at most
    ``ONE_CALL_NUMEL`` elements) and the cpu backend is the one selected, else ``None``.
    float32/float64 data takes vectors of its dtype, bfloat16/float16 data float32 vectors.

    Contiguous ``(N, C, *)`` memory is ``(N, C, S)`` as it is; channels-innermost memory (channels_last,
    an ``(N, C, L)`` view of ``(N, L, C)``) is ``N*S`` rows of ``C`` channels, ``(N*S, C, 1)``: the same
    statistics over the same values. (Every check here runs on every small call: module-level names
    and one loop over the vectors: cheaper than a helper per vector.)
    """
    if type(x) is not Tensor:
        return None
    dt = vdt = x.dtype
    if dt is not _F32 and dt is not _F64:
        if dt is not _BF16 and dt is not _F16:
            return None
        vdt = _F32
    if not x.is_cpu or x.layout is not _STRIDED:
        return None
    shape = x.shape
    if len(shape) < 2 or (running_mean is None) != (running_var is None):
        return None
    numel = x.numel()
    if numel == 0 or numel > ONE_CALL_NUMEL:
        return None
    n, c = shape[0], shape[1]
    s = numel // (n * c)
    if not x.is_contiguous():
        if len(shape) == 2 or not x.movedim(1, -1).is_contiguous():
            return None
        n, s = n * s, 1
    vshape = (c,)
    for t in (running_mean, running_var, weight, bias):
        # Parameter has no __torch_function__ of its own; a leaked functorch wrapper passes these
        # checks, its data_ptr() raises, and the caller then takes the regular path
        if t is not None and not (
            (type(t) is Tensor or type(t) is Parameter)
            and t.dtype is vdt
            and t.shape == vshape
            and t.is_cpu
            and t.layout is _STRIDED
            and t.is_contiguous()
        ):
            return None
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad):
        return None
    if _fwAD._current_level >= 0 or not plain_eager():
        return None
    return (n, c, s) if kernels.runs_cpu_backend() and _kernels() else None


def _needs_graph(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
    )


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    inplace: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """``(y, new_running_mean, new_running_var)`` of a small input, or ``None`` for the regular path.

    With ``inplace`` the running statistics are updated in their own buffers (what
    :func:`bnkit.functional.batch_norm` does) and returned; otherwise new tensors hold the update
    (:func:`bnkit.functional.batch_norm_pure`). Channels must be in dim 1.
    """
    if type(eps) is not float:
        return None
    dims = _layout(x, running_mean, running_var, weight, bias)
    if dims is None:
        return None
    graph = _needs_graph(x, weight, bias)
    # beyond the small kernels (by size, or 16-bit data): the cpu backend's kernels, one call per pass
    regular = x.dtype in _RAW16 or x.numel() > (SMALL_GRAD_NUMEL if graph else SMALL_NUMEL)
    if training is True:
        if type(momentum) is not float or not eps > 0.0:
            return None
        if regular:
            return _train_regular(x, running_mean, running_var, weight, bias, momentum, eps, inplace, graph)
        return _train(x, dims, running_mean, running_var, weight, bias, momentum, eps, inplace, graph)
    if training is False and running_mean is not None and eps >= 0.0:
        try:
            if graph:
                y = _eval_apply(x, running_mean, running_var, weight, bias, eps, (dims, regular))
            elif x.dtype in _RAW16:
                y = _eval_forward16(x, dims, running_mean, running_var, weight, bias, eps)
            else:
                y = _eval_forward(x, dims, running_mean, running_var, weight, bias, eps)
        except _TakeRegularPath:
            return None
        return y, running_mean, running_var
    return None


def _ncl_length(x: Tensor) -> int:
    """``L`` when ``x`` (which passed :func:`_layout`) is a float32/float64 ``(N, C, L)`` view of ``(N, L, C)``
    memory, whose output the kernels write contiguous, torch's layout for it, in their normalize pass
    (``cpu.nsc_tile_to_ncs``); else 0. The cpu backend's own methods keep the input's layout
    (``channel_dim=-1`` hands them such views and wants ``(N, L, C)`` back)."""
    if len(x.shape) == 3 and not x.is_contiguous() and (x.dtype is _F32 or x.dtype is _F64):
        return x.shape[2]
    return 0


def _eval_forward(x, dims, running_mean, running_var, weight, bias, eps):
    try:
        xa, rma, rva = x.data_ptr(), running_mean.data_ptr(), running_var.data_ptr()
        wa, ba = _addr(weight), _addr(bias)
    except RuntimeError as exc:  # a tensor without storage (a leaked functorch wrapper)
        raise _TakeRegularPath from exc
    n, c, s = dims
    length = _ncl_length(x)
    y = torch.empty(x.shape, dtype=x.dtype) if length else torch.empty_like(x)  # else x's strides (x is dense)
    k = _kernels()
    _launch(k.eval_forward, k.eval_forward_par,
            (_ZERO[x.dtype], xa, y.data_ptr(), n, c, s, rma, rva, wa, ba, eps, length), n, c, s)  # fmt: skip
    return y


def _eval_forward16(x, dims, running_mean, running_var, weight, bias, eps):
    try:
        xa, rma, rva = x.data_ptr(), running_mean.data_ptr(), running_var.data_ptr()
        wa, ba = _addr(weight), _addr(bias)
    except RuntimeError as exc:
        raise _TakeRegularPath from exc
    y = torch.empty_like(x)
    n, c, s = dims
    nt = _threads(n * c * s)  # as the cpu backend's launcher sets numba's threads and cuts the work
    plan = (_nsc_parts(nt, n, c), 1, _NO_TABLE) if s == 1 else _ncs_affine_plan(nt, n, c, s, np.float32)
    if not _call_driver(_kernels().eval_forward16, (_LIKE[x.dtype], xa, y.data_ptr(), n, c, s, rma, rva, wa, ba,
                                                    eps, *plan)):  # fmt: skip
        raise _TakeRegularPath  # (nothing was written: the regular path)
    return y


def _train_regular(x, running_mean, running_var, weight, bias, momentum, eps, inplace, graph):
    # the cpu backend's kernels, plan and numbers in one call (cpu_small.train_rows and the other
    # drivers of cpu_small.TRAIN_DRIVERS), through
    # _RegularTrainFn when a backward follows
    order, n, c, s = _layout_of(x)
    count = n * s
    if count < 2:
        return None  # the regular path raises torch's "Expected more than 1 value per channel"
    dt = x.dtype
    sd = _F32 if dt in _RAW16 else dt
    try:
        xa, wa, ba = x.data_ptr(), _addr(weight), _addr(bias)
        new_mean, new_var, stats = _running_outputs(running_mean, running_var, inplace, c, sd)
    except RuntimeError:  # a tensor without storage (a leaked functorch wrapper)
        return None
    like = _LIKE[dt]
    plan = _train_plan(_threads(x.numel()), order, n, c, s, dt)
    length = _ncl_length(x)
    if length:  # an (N, C, L) view: its output written contiguous (cpu_small.train_nsc takes L as G)
        plan = (plan[0], length, *plan[2:])
    scalars = _blend_scalars(count, momentum, sd)
    if graph:
        try:
            y = _regular_apply(x, weight, bias, eps, (like, order, n, c, s, sd, plan, stats, scalars))
        except _TakeRegularPath:
            return None
    else:
        y = _train_output(x, order, plan)
        args = (like, xa, y.data_ptr(), n, c, s, *plan[1:], wa, ba, eps, 0, 0, *stats, *scalars)
        if not _call_driver(_driver(_kernels().TRAIN_DRIVERS, plan[0]), args):
            return None
    if inplace and running_mean is not None:
        _increment_version((running_mean, running_var))
    return y, new_mean, new_var


def _train_output(x: Tensor, order: str, plan: tuple) -> Tensor:
    # the output buffer of a one-call training forward: in x's layout, or contiguous for an (N, C, L) view,
    # whose channels-innermost plan carries L where groups would go (cpu_small.train_nsc)
    if order == "nsc" and plan[1] > 0:
        return torch.empty(x.shape, dtype=x.dtype)
    return torch.empty_like(x)


def _train(x, dims, running_mean, running_var, weight, bias, momentum, eps, inplace, graph):
    n, c, s = dims
    count = n * s
    if count < 2:
        return None  # the regular path raises torch's "Expected more than 1 value per channel"
    dt = x.dtype
    try:
        new_mean, new_var, stats = _running_outputs(running_mean, running_var, inplace, c, dt)
    except RuntimeError:
        return None
    args = (n, c, s, eps, stats, *_blend_scalars(count, momentum, dt))
    try:
        if graph:  # (batch_norm sends graphs above SMALL_GRAD_NUMEL elsewhere)
            y = _train_apply(x, weight, bias, args)
        else:
            y = _train_forward(x, weight, bias, args)
    except _TakeRegularPath:
        return None
    if inplace and running_mean is not None:
        # the kernel wrote the buffers through raw addresses: tell autograd, as copy_ would (a graph
        # that saved them, e.g. an eval-mode call, then refuses a backward through stale values)
        _increment_version((running_mean, running_var))
    return y, new_mean, new_var


# (count, momentum, dtype) -> the running-statistics update's scalars (count / (count - 1), 1 - momentum,
# momentum) rounded to dtype, as torch rounds the Python scalars of reference.update_running_stats
_BLEND: dict = {}


def _blend_scalars(count: int, momentum: float, dtype: torch.dtype) -> tuple:
    key = (count, momentum, dtype)
    v = _BLEND.get(key)
    if v is None:
        if len(_BLEND) >= 256:
            _BLEND.clear()
        v = _BLEND[key] = (_scalar(count / (count - 1), dtype), _scalar(1 - momentum, dtype), _scalar(momentum, dtype))
    return v


def _stats_pair(c: int, dtype: torch.dtype) -> tuple[Tensor, int, int]:
    """One new ``(2*c,)`` vector for a batch's mean (first half) and biased variance (second), and the
    addresses of the halves. (Iterating a ``(2, c)`` tensor into two rows costs several times the
    allocation.)"""
    mv = torch.empty(2 * c, dtype=dtype)
    ma = mv.data_ptr()
    return mv, ma, ma + c * _ITEMSIZE[dtype]


class _SavedStats:
    """The context that :func:`bnkit.autograd._forward_train_backward` reads, for a backward that the
    one-call kernels cannot serve: ``saved_tensors`` as ``(x, weight, mean, var)``, the mean and variance
    split from the ``(2*c,)`` vector of :func:`_stats_pair`."""

    def __init__(self, ctx, x: Tensor, weight: Tensor | None, mv: Tensor, eps: float, param_dtype) -> None:
        mean, var = mv.view(2, -1).unbind()
        self.saved_tensors = (x, weight, mean, var)
        self.needs_input_grad = ctx.needs_input_grad
        self.eps = eps
        self.param_dtype = param_dtype


def _running_outputs(running_mean, running_var, inplace: bool, c: int, dtype: torch.dtype) -> tuple:
    """``(new_mean, new_var, addresses)`` for a kernel's running-statistics update: the buffers themselves
    with ``inplace``, else new vectors; addresses ``(running_mean, running_var, new_mean, new_var)``, all 0
    without running statistics. ``data_ptr()`` raises RuntimeError for a tensor without storage."""
    if running_mean is None:
        return None, None, (0, 0, 0, 0)
    rma, rva = running_mean.data_ptr(), running_var.data_ptr()
    if inplace:
        return running_mean, running_var, (rma, rva, rma, rva)
    new_mean, new_var = torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype)
    return new_mean, new_var, (rma, rva, new_mean.data_ptr(), new_var.data_ptr())


class _TakeRegularPath(Exception):
    """Nothing was written, take the regular path: a tensor had no storage (a leaked functorch wrapper),
    or a one-call driver failed to compile."""


def _train_forward(x, weight, bias, args, ma=0, va=0):
    # the batch statistics leave the kernel only when a backward needs them (ma, va not 0)
    n, c, s, eps, stats, ratio, keep, take = args
    try:
        xa, wa, ba = x.data_ptr(), _addr(weight), _addr(bias)
    except RuntimeError as exc:
        raise _TakeRegularPath from exc
    length = _ncl_length(x)
    y = torch.empty(x.shape, dtype=x.dtype) if length else torch.empty_like(x)
    k = _kernels()
    args = (_ZERO[x.dtype], xa, y.data_ptr(), n, c, s, wa, ba, eps, ma, va, *stats, ratio, keep, take, length)
    _launch(k.train_forward, k.train_forward_par, args, n, c, s)
    return y


class _SmallTrainFn(torch.autograd.Function):
    """Training forward and backward of a small input; the double backward goes the regular way."""

    @staticmethod
    def forward(ctx, x, weight, bias, args):
        mv, ma, va = _stats_pair(args[1], x.dtype)
        y = _train_forward(x, weight, bias, args, ma, va)
        ctx.save_for_backward(x, weight, mv)
        ctx.spec = args[:4]  # n, c, s, eps
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, gy):
        if gy is None:
            return None, None, None, None
        x, weight, mv = ctx.saved_tensors
        n, c, s, eps = ctx.spec
        g = _kernel_grad(gy, x)
        if g is None:
            from bnkit.autograd import _forward_train_backward

            return (*_forward_train_backward(_SavedStats(ctx, x, weight, mv, eps, x.dtype), gy, None, None)[:3], None)
        gy = g
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dt = x.dtype
        dx = torch.empty_like(x) if need_x else None
        dw = torch.empty(c, dtype=dt)
        db = torch.empty(c, dtype=dt)
        ma = mv.data_ptr()
        args = (_ZERO[dt], gy.data_ptr(), x.data_ptr(), _addr(dx), n, c, s, ma, ma + c * _ITEMSIZE[dt],
                _addr(weight), eps, dw.data_ptr(), db.data_ptr())  # fmt: skip
        k = _kernels()
        _launch(k.train_backward, k.train_backward_par, args, n, c, s)
        return dx, (dw if need_w else None), (db if need_b else None), None


class _RegularTrainFn(torch.autograd.Function):
    """Training forward and backward on the cpu backend's kernels, one compiled call each way
    (:func:`bnkit.kernels.cpu_small.train_rows`, :func:`~bnkit.kernels.cpu_small.backward_rows` and
    their kind for the other paths of the plan),
    for graphs the small kernels do not take; a backward they cannot serve (double backward, a
    gradient laid out unlike ``x``, no input gradient) goes the regular way from the same context."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, spec):
        like, order, n, c, s, sd, plan, stats, scalars = spec
        y = _train_output(x, order, plan)
        mv, ma, va = _stats_pair(c, sd)
        args = (like, x.data_ptr(), y.data_ptr(), n, c, s, *plan[1:], _addr(weight), _addr(bias), eps,
                ma, va, *stats, *scalars)  # fmt: skip
        if not _call_driver(_driver(_kernels().TRAIN_DRIVERS, plan[0]), args):
            raise _TakeRegularPath  # nothing written: the regular path
        ctx.save_for_backward(x, weight, mv)
        ctx.spec = (like, order, n, c, s, sd, eps)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, gy):
        if gy is None:
            return None, None, None, None, None
        x, weight, mv = ctx.saved_tensors
        like, order, n, c, s, sd, eps = ctx.spec
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = _kernel_grad(gy, x) if need_x else None
        if g is not None:
            gy = g
            dx = torch.empty_like(x)
            dw, db = torch.empty(c, dtype=sd), torch.empty(c, dtype=sd)
            plan = _backward_plan(_threads(x.numel()), order, n, c, s, x.dtype)
            ma = mv.data_ptr()
            args = (like, gy.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, s, *plan[1:], ma, ma + c * _ITEMSIZE[sd],
                    _addr(weight), _scalar(eps, sd), dw.data_ptr(), db.data_ptr())  # fmt: skip
            if _call_driver(_driver(_kernels().BACKWARD_DRIVERS, plan[0]), args):
                return dx, (dw if need_w else None), (db if need_b else None), None, None
        from bnkit.autograd import _forward_train_backward

        # weight and bias, when given, are vectors of the statistics dtype (_layout)
        saved = _SavedStats(ctx, x, weight, mv, eps, sd)
        return (*_forward_train_backward(saved, gy, None, None)[:3], None, None)


class _SmallEvalFn(torch.autograd.Function):
    """Eval forward of an input whose input or parameters need a gradient (running statistics are
    constants); the inputs are those of :class:`bnkit.autograd._EvalFn`, whose backward serves what
    the kernels here do not take. ``regular`` (above ``SMALL_GRAD_NUMEL``, or 16-bit data): the
    backward is the cpu backend's in one call (``cpu_small.EVAL_BACKWARD_DRIVERS``), when it needs the
    input's gradient and a parameter's; otherwise the small kernel's."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps, spec):
        dims, regular = spec
        if x.dtype in _RAW16:
            y = _eval_forward16(x, dims, running_mean, running_var, weight, bias, eps)
        else:
            y = _eval_forward(x, dims, running_mean, running_var, weight, bias, eps)
        ctx.save_for_backward(x, running_mean, running_var, weight)
        ctx.spec = spec
        ctx.eps = eps
        ctx.param_dtype = running_mean.dtype  # the vectors' dtype (_layout)
        return y

    @staticmethod
    def backward(ctx, gy):
        from bnkit.autograd import _forward_eval_backward

        x, running_mean, running_var, weight = ctx.saved_tensors
        g = _kernel_grad(gy, x)
        if g is None:
            return (*_forward_eval_backward(ctx, gy), None)
        gy = g
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dims, regular = ctx.spec
        if regular:
            grads = None
            if need_x and (need_w or need_b):
                grads = _eval_backward_regular(gy, x, running_mean, running_var, weight, ctx.eps)
            if grads is not None:
                dx, dw, db = grads
                return dx, None, None, (dw if need_w else None), (db if need_b else None), None, None
            return (*_forward_eval_backward(ctx, gy), None)
        n, c, s = dims
        dx = torch.empty_like(x) if need_x else None
        dw = torch.empty(c, dtype=x.dtype)
        db = torch.empty(c, dtype=x.dtype)
        args = (_ZERO[x.dtype], gy.data_ptr(), x.data_ptr(), _addr(dx), n, c, s, running_mean.data_ptr(),
                running_var.data_ptr(), _addr(weight), ctx.eps, dw.data_ptr(), db.data_ptr())  # fmt: skip
        k = _kernels()
        _launch(k.eval_backward, k.eval_backward_par, args, n, c, s)
        return dx, None, None, (dw if need_w else None), (db if need_b else None), None, None


def _eval_backward_regular(gy, x, running_mean, running_var, weight, eps):
    # (dx, dweight, dbias) of the cpu backend's eval backward in one call; None if its driver failed to compile
    order, n, c, s = _layout_of(x)
    sd = running_mean.dtype
    dx = torch.empty_like(x)
    dw, db = torch.empty(c, dtype=sd), torch.empty(c, dtype=sd)
    nt = _threads(x.numel())
    t = _nsc_parts(nt, n * c, s) if order == "ncs" else _nsc_parts(nt, n * s, c)
    like = _LIKE[x.dtype]
    args = (like, gy.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, s, t, running_mean.data_ptr(),
            running_var.data_ptr(), _addr(weight), _scalar(eps, sd), dw.data_ptr(), db.data_ptr())  # fmt: skip
    if not _call_driver(_driver(_kernels().EVAL_BACKWARD_DRIVERS, order), args):
        return None
    return dx, dw, db


def _kernel_grad(gy: Tensor, x: Tensor) -> Tensor | None:
    """``gy`` as the small backward kernels read it, in ``x``'s memory order (which ``ctx``'s dims describe):
    ``gy`` itself, or a copy (:func:`bnkit.autograd._like`) when only its strides differ (the gradient of an
    output that :mod:`bnkit.functional` gave torch's contiguous layout, for an ``(N, C, L)`` view of
    ``(N, L, C)`` memory); ``None`` when the regular backward must run."""
    if (
        torch.is_grad_enabled()  # double backward: the regular formulas in differentiable ops
        or type(gy) is not Tensor
        or gy.dtype is not x.dtype
        or gy.shape != x.shape
        or not gy.is_cpu
        or gy.layout is not torch.strided
        or _wrapped(gy)  # no storage (batched gradients): the regular backward's plain ops
    ):
        return None
    return _like(gy, x)


# Function.apply minus its Python wrapper, which only handles functorch (ruled out by _layout)
_train_apply = super(torch.autograd.Function, _SmallTrainFn).apply
_regular_apply = super(torch.autograd.Function, _RegularTrainFn).apply
_eval_apply = super(torch.autograd.Function, _SmallEvalFn).apply
