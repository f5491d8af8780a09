"""The ``cpu`` backend: :class:`CpuBackend`, the launcher of the numba kernels on both of its roads.

Everything a kernel could crash on is decided here, in Python, before it runs: the device,
the dtype, the memory layout (a dense buffer in channel-major ``ncs`` or channel-minor ``nsc``
order, found from the strides without copying), the sizes of every per-channel vector and the
layout of ``dy`` (which must match ``x``; if it does not, the reference does the work).

The checked road (``forward_train``, ``forward_eval_running``, ``backward_train``, ...) validates and
converts its arguments, for :mod:`bnkit.autograd`'s Functions and custom ops. The one-call road
(:meth:`CpuBackend.check`, then ``one_call_*``) takes plain eager calls whose tensors pass the check
and runs each pass as one compiled call on raw addresses (:mod:`bnkit.kernels.cpu.drivers`). The plan
of every call comes from :mod:`bnkit.kernels.cpu.plan`.

Parallelism follows ``torch.get_num_threads()`` (numba is set to the same count before each
launch, so torch and numba never oversubscribe the cores); inputs too small to pay for
waking threads run on one.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
import torch
from torch import Tensor
from torch.nn import Parameter

from bnkit import kernels as _dispatch
from bnkit import reference as ref
from bnkit.kernels import base as _base
from bnkit.kernels import ran_plan
from bnkit.kernels import runs_cpu_backend as _runs_cpu_backend
from bnkit.kernels.cpu import drivers as _drivers
from bnkit.kernels.cpu import passes as K
from bnkit.kernels.cpu import plan as _plan
from bnkit.kernels.cpu.drivers import (
    AffineData,
    AffinePlan,
    AffineVectors,
    BackwardPlan,
    Data,
    EvalVectors,
    Grads,
    GradVectors,
    ReduceVectors,
    Running,
    Shape,
    TrainPlan,
    TrainVectors,
)
from bnkit.kernels.cpu.plan import (
    _BACKWARD_NAMES,
    _LAYOUTS_MAX,
    _RAW16,
    _TRAIN_NAMES,
    _VIEW,
    TASKS_PER_THREAD,
    _ncs_affine_plan,
    _nsc_parts,
    _numba_state,
    backward_plan,
    layout_of,
    one_call_path,
    threads,
    train_plan,
)
from bnkit.kernels.reference import ReferenceBackend

__all__ = ["CpuBackend", "load_backend"]


_reference = ReferenceBackend()


def _empty_like(x: Tensor) -> Tensor:
    # x is dense (layout_of), so empty_like keeps its strides exactly (and is cheaper than empty_strided).
    return torch.empty_like(x)


# (c, dtype, fill) -> a constant vector the kernels only read (an absent vector a driver needs)
_FILLED: dict = {}


def _vector(name: str, t: Tensor | None, c: int, sd: torch.dtype, fill: float | None = None) -> Tensor | None:
    """A per-channel vector as a contiguous CPU tensor of the statistics dtype ``sd``, so that its
    ``data_ptr()`` is ``c`` values a driver may read; another dtype, shape or stride is converted once.

    ``t=None``: ``None`` (address 0: the driver's ones or zeros) without ``fill``, else a shared constant
    filled with ``fill`` (kernels only read it).
    """
    if t is None:
        if fill is None:
            return None
        key = (c, sd, fill)
        v = _FILLED.get(key)
        if v is None:
            if len(_FILLED) >= _LAYOUTS_MAX:
                _FILLED.clear()
            v = _FILLED[key] = torch.full((c,), fill, dtype=sd)
        return v
    if isinstance(t, Tensor) and t.dtype is sd and t.is_cpu and t.dim() == 1 and t.shape[0] == c and t.is_contiguous():
        return t
    if not isinstance(t, Tensor) or t.numel() != c or not t.is_floating_point() or t.device.type != "cpu":
        desc = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"cpu backend: {name} must be a floating CPU tensor with {c} elements, got {desc}")
    return t.detach().reshape(c).to(dtype=sd).contiguous()


def _running(running, c: int, count: int, sd: torch.dtype) -> Running:
    """The ``running`` argument of the training drivers (:func:`bnkit.kernels.cpu.passes.update_running`): the
    addresses of the four vectors, ``ratio = count / (count - 1)``, ``keep = 1 - momentum`` and ``take = momentum``
    rounded to the statistics dtype (as torch rounds them in the reference's ops); addresses 0 when
    ``running`` is ``None``."""
    if running is None:
        zero = _scalar(0.0, sd)
        return Running(0, 0, 0, 0, zero, zero, zero)
    *vectors, momentum = running
    addresses = []
    for name, t in zip(("running_mean", "running_var", "new_mean", "new_var"), vectors, strict=True):
        if not _base.is_running_vector(t, c, sd):
            desc = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"cpu backend: {name} must be a contiguous {sd} CPU vector of {c} elements "
                             f"without grad, got {desc}")
        addresses.append(t.data_ptr())
    if count < 2:
        raise ValueError(f"cpu backend: the running variance needs at least 2 values per channel, got {count}")
    return Running(*addresses, *_blend_scalars(count, momentum, sd))


# path or memory order -> its driver, for the checked road (the one-call road looks them up through
# _small_kernels, which a broken numba turns off without touching these)
_TRAIN_DRIVER = {path: getattr(_drivers, name) for path, name in _drivers.TRAIN_DRIVERS.items()}
_BACKWARD_DRIVER = {path: getattr(_drivers, name) for path, name in _drivers.BACKWARD_DRIVERS.items()}
_AFFINE_DRIVER = {order: getattr(_drivers, name) for order, name in _drivers.AFFINE_DRIVERS.items()}
_REDUCE_DRIVER = {order: getattr(_drivers, name) for order, name in _drivers.REDUCE_DRIVERS.items()}


def load_backend() -> CpuBackend:
    """The ``cpu`` backend (called by :func:`bnkit.kernels.get_backend`).

    Compiles (or loads from numba's cache) one tiny parallel kernel (:func:`bnkit.kernels.cpu.passes.probe`) so
    that a broken numba install fails here, where the dispatcher turns it into one warning and the
    reference. The real kernels compile on their first call: a first call compiles only what it runs.
    """
    from bnkit.kernels.compiling import quiet

    # Starting numba's OpenMP threading layer resets the process's OpenMP thread count,
    # which torch reads: start it here, once, and give torch its setting back.
    torch_threads = torch.get_num_threads()
    numba.set_num_threads(1)
    with quiet():
        K.probe(np.zeros(2, np.float32))
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    # The launchers remember the count they last set: tell them it is 1 now, or a launcher that
    # ran before this (a direct CpuBackend user) would go on with one thread.
    _numba_state.nt = 1
    return CpuBackend()


class CpuBackend:
    """The four primitives of :class:`bnkit.kernels.base.Backend` as numba kernels."""

    name = "cpu"

    def supports(self, x: Tensor) -> bool:
        return isinstance(x, Tensor) and x.is_cpu and x.dtype in _VIEW and layout_of(x) is not None

    def _layout(self, x: Tensor) -> tuple[str, int, int, int]:
        lay = layout_of(x) if isinstance(x, Tensor) and x.is_cpu and x.dtype in _VIEW else None
        if lay is None:
            desc = f"{tuple(x.shape)} {x.dtype} strides {x.stride()} on {x.device}" if isinstance(x, Tensor) else x
            raise ValueError(f"cpu backend: unsupported input {desc}")
        return lay

    @staticmethod
    def _same_layout(dy: Tensor, x: Tensor) -> bool:
        # the kernels read dy and x in one memory order; bnkit.autograd and bnkit.distributed lay a
        # gradient out as x (autograd._like) before calling, so another layout takes the reference
        return (
            isinstance(dy, Tensor)
            and dy.shape == x.shape
            and dy.dtype == x.dtype
            and dy.is_cpu  # x is a CPU tensor (_layout)
            and (dy.stride() == x.stride() or layout_of(dy) == layout_of(x))
        )

    def forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running: tuple[Tensor, Tensor, Tensor, Tensor, float] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, var)``; with ``running = (running_mean, running_var, new_mean, new_var, momentum)``
        also the running statistics' update, written to ``new_*`` (which may be the buffers
        themselves) in the same compiled call (:func:`bnkit.kernels.cpu.passes.update_running`)."""
        order, n, c, s = self._layout(x)
        sd = ref.stats_dtype(x.dtype)
        w = _vector("weight", weight, c, sd)
        b = _vector("bias", bias, c, sd)
        update = _running(running, c, n * s, sd)
        y = _empty_like(x)
        mean = torch.empty(c, dtype=sd)
        var = torch.empty(c, dtype=sd)
        path, *params = train_plan(threads(x.numel()), order, n, c, s, x.dtype)
        # the path's one-call driver (x and y dense: their data_ptr() is the start of their memory;
        # absent weight and bias as address 0, the driver's ones and zeros)
        vectors = TrainVectors(_addr(w), _addr(b), mean.data_ptr(), var.data_ptr())
        args = (_LIKE[x.dtype], Data(x.data_ptr(), y.data_ptr()), Shape(n, c, s, 0), TrainPlan(*params), vectors,
                float(eps), update)  # fmt: skip
        _call(_TRAIN_DRIVER[path], args)
        ran_plan(_TRAIN_NAMES[path])
        return y, mean, var

    def forward_eval(self, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        order, n, c, s = self._layout(x)
        sd = ref.stats_dtype(x.dtype)
        m = _vector("mean", mean, c, sd, 0.0)
        k = _vector("scale", scale, c, sd, 1.0)
        sh = _vector("shift", shift, c, sd, 0.0)
        y = _empty_like(x)
        _affine(order, n, c, s, None, x, y, AffineVectors(k.data_ptr(), m.data_ptr(), k.data_ptr(), sh.data_ptr()), sd)
        return y

    def forward_eval_running(
        self,
        x: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        """Eval forward from the running statistics: :meth:`forward_eval` with ``scale`` and ``shift``
        made inside the same compiled call instead of several torch ops: the one-call road's eval kernels
        (:func:`bnkit.kernels.cpu.drivers.eval_forward`, ``eval_forward16`` for 16-bit data) on vectors
        converted to the statistics dtype.

        Same numbers as ``forward_eval(x, running_mean, rsqrt(running_var + eps) * weight, bias)``
        in the statistics dtype (what :mod:`bnkit.autograd` computes for other backends).
        """
        order, n, c, s = self._layout(x)
        sd = ref.stats_dtype(x.dtype)
        m = _vector("running_mean", running_mean, c, sd, 0.0)
        v = _vector("running_var", running_var, c, sd, 1.0)
        w = _vector("weight", weight, c, sd)
        b = _vector("bias", bias, c, sd)
        y = _empty_like(x)
        dims = (n * s, c, 1) if order == "nsc" else (n, c, s)  # channels innermost: rows of channels
        if _eval_running(x, y, dims, 0, (m.data_ptr(), v.data_ptr(), _addr(w), _addr(b)), float(eps)):
            return y
        inv = (v + eps).rsqrt()  # the kernels are unavailable: forward_eval with torch's coefficients
        scale = inv if w is None else inv * w
        return self.forward_eval(x, m, scale, torch.zeros_like(scale) if b is None else b)

    def backward_reduce(self, dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        order, n, c, s = self._layout(x)
        if not self._same_layout(dy, x):
            return _reference.backward_reduce(dy, x, mean)
        sd = ref.stats_dtype(x.dtype)
        m = _vector("mean", mean, c, sd, 0.0)
        sum_dy = torch.empty(c, dtype=sd)
        sum_dy_xmu = torch.empty(c, dtype=sd)
        _reduce(order, n, c, s, dy, x, None, ReduceVectors(m.data_ptr(), 0, sum_dy.data_ptr(), sum_dy_xmu.data_ptr()),
                sd)  # fmt: skip
        return sum_dy, sum_dy_xmu

    def backward_train(
        self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Fused training backward (see :func:`bnkit.kernels.base.backward_train`): the driver of
        :func:`bnkit.kernels.cpu.plan.backward_plan`'s path, the one-call road's, reading the given ``invstd``
        where the one-call road computes it from the variance.

        Channel-major memory with long rows: one kernel reduces each channel and writes its
        ``dx`` while the channel is in cache. Otherwise one reduction pass, the coefficients in
        one small compiled loop, and one elementwise pass (no torch ops in between).
        """
        order, n, c, s = self._layout(x)
        if not self._same_layout(dy, x):
            return _base.backward_train(_reference, dy, x, mean, invstd, weight)
        sd = ref.stats_dtype(x.dtype)
        m = _vector("mean", mean, c, sd, 0.0)
        inv = _vector("invstd", invstd, c, sd, 1.0)
        w = _vector("weight", weight, c, sd)
        sum_dy = torch.empty(c, dtype=sd)
        sum_dy_xhat = torch.empty(c, dtype=sd)
        dx = _empty_like(x)
        path, *params = backward_plan(threads(x.numel()), order, n, c, s, x.dtype)
        # var is not read: the driver takes invstd from its own slot
        vectors = GradVectors(m.data_ptr(), 0, _addr(w), sum_dy_xhat.data_ptr(), sum_dy.data_ptr(), inv.data_ptr())
        args = (_LIKE[x.dtype], Grads(dy.data_ptr(), x.data_ptr(), dx.data_ptr()), Shape(n, c, s, 0),
                BackwardPlan(*params), vectors, _scalar(0.0, sd))  # fmt: skip
        ran_plan(_BACKWARD_NAMES[path])
        _call(_BACKWARD_DRIVER[path], args)
        return dx, sum_dy, sum_dy_xhat

    def backward_eval(
        self, dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Eval backward in one read of ``dy`` and ``x``: ``dx = scale*dy`` and both reductions."""
        order, n, c, s = self._layout(x)
        if not self._same_layout(dy, x):
            return _base.backward_eval(_reference, dy, x, mean, scale, invstd)
        sd = ref.stats_dtype(x.dtype)
        m = _vector("mean", mean, c, sd, 0.0)
        k = _vector("scale", scale, c, sd, 1.0)
        sum_dy = torch.empty(c, dtype=sd)
        sum_dy_xmu = torch.empty(c, dtype=sd)
        dx = _empty_like(x)
        vectors = ReduceVectors(m.data_ptr(), k.data_ptr(), sum_dy.data_ptr(), sum_dy_xmu.data_ptr())
        _reduce(order, n, c, s, dy, x, dx, vectors, sd, "eval_backward/")
        return dx, sum_dy, sum_dy_xmu

    def backward_input(self, dy: Tensor, x: Tensor, mean: Tensor, a: Tensor, k: Tensor, c: Tensor) -> Tensor:
        order, n, ch, s = self._layout(x)
        if not self._same_layout(dy, x):
            return _reference.backward_input(dy, x, mean, a, k, c)
        sd = ref.stats_dtype(x.dtype)
        m = _vector("mean", mean, ch, sd, 0.0)
        a_ = _vector("a", a, ch, sd, 0.0)
        k_ = _vector("k", k, ch, sd, 0.0)
        c_ = _vector("c", c, ch, sd, 0.0)
        dx = _empty_like(x)
        vectors = AffineVectors(a_.data_ptr(), m.data_ptr(), k_.data_ptr(), c_.data_ptr())
        _affine(order, n, ch, s, dy, x, dx, vectors, sd)
        return dx

    # --- the one-call road ----------------------------------------------------------------
    #
    # A plain eager call (bnkit.autograd.one_call asks plain_eager) on tensors that pass check() runs
    # each pass as one compiled call on raw addresses (Tensor.data_ptr(), far cheaper than numpy views):
    # the small kernels (bnkit.kernels.cpu.drivers: the "small" path, serial or parallel) or the driver of
    # the planned path (train_plan / backward_plan, the same kernels and numbers as the methods above).
    # Each method returns None when nothing was written: the caller then takes the checked road above.

    def check(self, x: Tensor, running_mean, running_var, weight, bias) -> tuple[int, int, int] | None:
        """``(N, C, S)`` of ``x``'s memory for the one-call kernels when they may run on these tensors (at
        most ``ONE_CALL_NUMEL`` elements, no :func:`bnkit.kernels.forced_road` ``"checked"`` block open) and
        the cpu backend is the one selected, else ``None``.
        float32/float64 data takes vectors of its dtype, bfloat16/float16 data float32 vectors.

        Contiguous ``(N, C, *)`` memory is ``(N, C, S)`` as it is; channels-innermost memory (channels_last,
        an ``(N, C, L)`` view of ``(N, L, C)``) is ``N*S`` rows of ``C`` channels, ``(N*S, C, 1)``: the same
        statistics over the same values. A call that passes has valid arguments: these checks imply
        everything :func:`bnkit.functional.check_batch_norm_args` asks. (They run on every small call:
        module-level names and one loop over the vectors, cheaper than a helper per vector.)
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
        if numel == 0 or numel > _plan.ONE_CALL_NUMEL or _dispatch._road == "checked":
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
            # checks, its data_ptr() raises, and the caller then takes the checked road
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
        return (n, c, s) if _runs_cpu_backend() and _small_kernels() else None

    def one_call_train_plan(
        self, x: Tensor, dims: tuple[int, int, int], running_mean, running_var, momentum: float, inplace: bool,
        graph: bool,
    ) -> tuple | None:
        """The plan of a one-call training forward on ``x`` (which passed :meth:`check`), with the outputs of
        its running-statistics update: ``(plan, new_mean, new_var)``; ``None``: the checked road (fewer than 2
        values per channel, whose error it raises, or a tensor without storage).

        With ``inplace`` the update goes to the buffers themselves, else to new vectors. ``plan`` is what
        :meth:`one_call_train` and :meth:`one_call_train_backward` take."""
        path = one_call_path(x.dtype, x.numel(), graph)
        dt = x.dtype
        if path == "small":
            n, c, s = dims
            order, like, sd, params, length = "", _ZERO[dt], dt, (), _ncl_length(x)
        else:
            order, n, c, s = layout_of(x)
            like, sd = _LIKE[dt], (_F32 if dt in _RAW16 else dt)
            path, *params = train_plan(threads(x.numel()), order, n, c, s, dt)
            params = TrainPlan(*params)
            length = _ncl_length(x)  # an (N, C, L) view: its output written contiguous (drivers.train_nsc)
        count = n * s
        if count < 2:
            return None  # the checked road raises torch's "Expected more than 1 value per channel"
        try:
            new_mean, new_var, stats = _running_outputs(running_mean, running_var, inplace, c, sd)
        except RuntimeError:  # a tensor without storage (a leaked functorch wrapper)
            return None
        plan = (path, order, n, c, s, like, sd, params, length, stats, _blend_scalars(count, momentum, sd))
        return plan, new_mean, new_var

    def one_call_train(
        self, plan: tuple, x: Tensor, weight, bias, eps: float, keep: bool, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None] | None:
        """``(y, mv)`` of the one-call training forward of :meth:`one_call_train_plan`'s plan, the running
        statistics updated; ``mv`` the ``(2*C,)`` vector of the batch mean and biased variance (what
        :meth:`one_call_train_backward` takes) with ``keep``, else ``None``. ``None``: nothing was written
        (a tensor without storage, or a driver that failed to compile). ``out`` (contiguous ``(N, C, *)``
        ``x`` only) receives ``y`` and may be ``x`` itself: every path reads a channel's values for its
        statistics before it writes any of them, and each value of the normalizing pass right before its
        own write."""
        path, order, n, c, s, like, sd, params, length, stats, scalars = plan
        try:
            xa, wa, ba = x.data_ptr(), _addr(weight), _addr(bias)
        except RuntimeError:  # a tensor without storage (a leaked functorch wrapper)
            return None
        if keep:
            mv = torch.empty(2 * c, dtype=sd)
            ma = mv.data_ptr()
            va = ma + c * _ITEMSIZE[sd]
        else:
            mv, ma, va = None, 0, 0
        if path == "small":
            # the batch statistics leave the kernel only when a backward needs them (ma, va not 0)
            y = out if out is not None else torch.empty(x.shape, dtype=x.dtype) if length else torch.empty_like(x)
            k = _small_kernels()
            ratio, keep_, take = scalars
            args = (like, xa, y.data_ptr(), n, c, s, wa, ba, eps, ma, va, *stats, ratio, keep_, take, length)
            _launch(k.train_forward, k.train_forward_par, args, n, c, s, _TRAIN_SMALL)
            return y, mv
        y = out if out is not None else torch.empty(x.shape, dtype=x.dtype) if length else torch.empty_like(x)
        args = (like, Data(xa, y.data_ptr()), Shape(n, c, s, length), params, TrainVectors(wa, ba, ma, va), eps,
                Running(*stats, *scalars))  # fmt: skip
        if not _call_driver(_driver(_small_kernels().TRAIN_DRIVERS, path), args):
            return None
        ran_plan(_TRAIN_NAMES[path])
        return y, mv

    def one_call_train_backward(
        self, plan: tuple, gy: Tensor, x: Tensor, weight, mv: Tensor, eps: float, need_x: bool
    ) -> tuple[Tensor | None, Tensor, Tensor] | None:
        """``(dx, dweight, dbias)`` of the one-call training forward of ``plan`` from its saved ``mv``, for a
        gradient ``gy`` laid out as ``x``; ``dx`` is ``None`` without ``need_x``. ``None``: the caller's
        regular backward (a planned path without ``need_x``, or a driver that failed to compile)."""
        path, order, n, c, s, like, sd = plan[:7]
        ma = mv.data_ptr()
        if path == "small":
            dx = torch.empty_like(x) if need_x else None
            dw = torch.empty(c, dtype=sd)
            db = torch.empty(c, dtype=sd)
            args = (like, gy.data_ptr(), x.data_ptr(), _addr(dx), n, c, s, ma, ma + c * _ITEMSIZE[sd],
                    _addr(weight), eps, dw.data_ptr(), db.data_ptr())  # fmt: skip
            k = _small_kernels()
            _launch(k.train_backward, k.train_backward_par, args, n, c, s, _BACKWARD_SMALL)
            return dx, dw, db
        if not need_x:
            return None
        dx = torch.empty_like(x)
        dw, db = torch.empty(c, dtype=sd), torch.empty(c, dtype=sd)
        path, *params = backward_plan(threads(x.numel()), order, n, c, s, x.dtype)
        vectors = GradVectors(ma, ma + c * _ITEMSIZE[sd], _addr(weight), dw.data_ptr(), db.data_ptr(), 0)
        args = (like, Grads(gy.data_ptr(), x.data_ptr(), dx.data_ptr()), Shape(n, c, s, 0), BackwardPlan(*params),
                vectors, _scalar(eps, sd))  # fmt: skip
        if not _call_driver(_driver(_small_kernels().BACKWARD_DRIVERS, path), args):
            return None
        ran_plan(_BACKWARD_NAMES[path])
        return dx, dw, db

    def one_call_eval_plan(self, x: Tensor, dims: tuple[int, int, int], graph: bool) -> tuple:
        """The plan of a one-call eval forward on ``x`` (which passed :meth:`check`): the small kernel at every
        size (16-bit data: the ``half`` kernel); its backward (with ``graph``) on the small kernel up to
        ``SMALL_GRAD_NUMEL`` float32/float64 elements, else the backend's eval backward in one call."""
        return dims, one_call_path(x.dtype, x.numel(), graph) != "small"

    def one_call_eval(self, plan: tuple, x: Tensor, running_mean: Tensor, running_var: Tensor, weight, bias,
             eps: float) -> Tensor | None:  # fmt: skip
        """The one-call eval forward of :meth:`one_call_eval_plan`'s plan; ``None``: nothing was written."""
        try:
            x.data_ptr()
            rma, rva, wa, ba = running_mean.data_ptr(), running_var.data_ptr(), _addr(weight), _addr(bias)
        except RuntimeError:  # a tensor without storage (a leaked functorch wrapper)
            return None
        length = _ncl_length(x)
        y = torch.empty(x.shape, dtype=x.dtype) if length else torch.empty_like(x)  # else x's strides (x is dense)
        return y if _eval_running(x, y, plan[0], length, (rma, rva, wa, ba), eps) else None

    def one_call_eval_backward(
        self, plan: tuple, gy: Tensor, x: Tensor, running_mean: Tensor, running_var: Tensor, weight, eps: float,
        need_x: bool, need_params: bool,
    ) -> tuple[Tensor | None, Tensor, Tensor] | None:
        """``(dx, dweight, dbias)`` of the one-call eval forward of ``plan``, for a gradient ``gy`` laid out as
        ``x``; ``None``: the caller's regular backward (the planned eval backward takes calls that need ``dx``
        and a parameter's gradient; a driver that failed to compile)."""
        dims, planned = plan
        if planned:
            if not (need_x and need_params):
                return None
            return _eval_backward_planned(gy, x, running_mean, running_var, weight, eps)
        n, c, s = dims
        dx = torch.empty_like(x) if need_x else None
        dw = torch.empty(c, dtype=x.dtype)
        db = torch.empty(c, dtype=x.dtype)
        args = (_ZERO[x.dtype], gy.data_ptr(), x.data_ptr(), _addr(dx), n, c, s, running_mean.data_ptr(),
                running_var.data_ptr(), _addr(weight), eps, dw.data_ptr(), db.data_ptr())  # fmt: skip
        k = _small_kernels()
        _launch(k.eval_backward, k.eval_backward_par, args, n, c, s, _EVAL_BACKWARD_SMALL)
        return dx, dw, db


_F32, _F64, _STRIDED = torch.float32, torch.float64, torch.strided
_BF16, _F16 = torch.bfloat16, torch.float16
_NO_TABLE = np.empty((4, 0), np.float32)


# dtype -> the first argument of its kernels (a zero of the type they read the data as)
_ZERO = {torch.float32: np.float32(0.0), torch.float64: np.float64(0.0)}
_LIKE = {**_ZERO, **_RAW16}
_ITEMSIZE = {torch.float32: 4, torch.float64: 8}
_NP = {torch.float32: np.float32, torch.float64: np.float64}


# (value, dtype) -> value as a numpy scalar of dtype (0.5 us to make, 0.1 to look up)
_SCALARS: dict = {}


# the plan names (bnkit.kernels.last_plan) of the small kernels, serial and parallel
_TRAIN_SMALL = ("train/small", "train/small_parallel")
_BACKWARD_SMALL = ("backward/small", "backward/small_parallel")
_EVAL_SMALL = ("eval/small", "eval/small_parallel")
_EVAL_BACKWARD_SMALL = ("eval_backward/small", "eval_backward/small_parallel")
_K = None  # bnkit.kernels.cpu.drivers once loaded; False if it failed to (then the one-call road is off)


def _eval_running(x: Tensor, y: Tensor, dims: tuple[int, int, int], length: int, vectors: tuple, eps: float) -> bool:
    """The eval forward from the running statistics in one compiled call. ``vectors``: the addresses of the
    running mean and variance, weight and bias (0: absent), contiguous vectors of the statistics dtype;
    ``dims``: ``(N, C, S)``, channels-innermost memory as ``(N*S, C, 1)``; ``length``: the ``L`` of an
    ``(N, C, L)`` view written contiguous (:func:`_ncl_length`), else 0. ``False``: nothing was written (the
    one-call kernels failed to load, or the 16-bit driver to compile)."""
    n, c, s = dims
    k = _small_kernels()
    if not k:
        return False
    if x.dtype in _RAW16:
        nt = threads(n * c * s)  # as the checked road sets numba's threads and cuts the work
        params = (_nsc_parts(nt, n, c), 1, _NO_TABLE) if s == 1 else _ncs_affine_plan(nt, n, c, s, np.float32)
        args = (_LIKE[x.dtype], Data(x.data_ptr(), y.data_ptr()), Shape(n, c, s, 0), EvalVectors(*vectors), eps,
                AffinePlan(*params))  # fmt: skip
        if not _call_driver(k.eval_forward16, args):
            return False
        ran_plan("eval/half")
        return True
    args = (_ZERO[x.dtype], x.data_ptr(), y.data_ptr(), n, c, s, *vectors, eps, length)
    _launch(k.eval_forward, k.eval_forward_par, args, n, c, s, _EVAL_SMALL)
    return True


def _small_kernels():
    """The one-call kernels (:mod:`bnkit.kernels.cpu.drivers`), compiled (or loaded from numba's cache) on first
    use; ``False`` if they fail to.

    A failure is one warning, and every later call takes the checked road (which has its own fallback
    to the reference), as a fast backend that cannot load does.
    """
    global _K
    if _K is None:
        try:
            from bnkit.kernels.cpu import drivers

            drivers.probe()
        except Exception as exc:  # a broken numba install: one warning, then the checked road
            warnings.warn(
                f"bnkit: the small-input kernels are unavailable ({type(exc).__name__}: {exc}); "
                "small inputs take the checked road",
                RuntimeWarning,
                stacklevel=4,
            )
            _K = False
        else:
            _K = drivers
    return _K


def _launch(serial, parallel, args: tuple, n: int, c: int, s: int, plans: tuple[str, str]) -> None:
    """Run a small kernel on ``(n, c, s)`` memory: ``serial(*args)`` up to ``SMALL_SERIAL_NUMEL`` elements or
    with one thread, else ``parallel(*args, T)`` with ``TASKS_PER_THREAD`` ranges of rows per thread
    (numba set to torch's thread count, as :func:`threads` sets it), and record the plan that ran
    (``plans``: the serial and the parallel one's names)."""
    numel = n * c * s
    nt = 1 if numel <= _plan.SMALL_SERIAL_NUMEL else threads(numel)
    if nt == 1:
        _call(serial, args)
        ran_plan(plans[0])
    else:
        _call(parallel, (*args, min(n * c if s > 1 else n, TASKS_PER_THREAD * nt)))
        ran_plan(plans[1])


# (kernel, type of its first argument) -> the compiled specialization's entry point. The first
# argument (a zero of the data's dtype) fixes every argument's numba type: the others are Python
# ints (int64), eps (a float) and numpy scalars of that dtype. Calling the entry point skips the
# dispatcher's typing of every argument, nearly half the cost of calling an 11-argument kernel.
_ENTRY: dict = {}


def _driver(names: dict, path):
    """The one-call driver of a plan's path or a memory order (``drivers.TRAIN_DRIVERS``,
    ``BACKWARD_DRIVERS``, ``EVAL_BACKWARD_DRIVERS``)."""
    return getattr(_small_kernels(), names[path])


_BROKEN: set = set()  # one-call drivers whose first call (their compilation) failed


def _call_driver(kernel, args: tuple) -> bool:
    """:func:`_call` for the one-call drivers, which :func:`_small_kernels` does not probe: their first call
    compiles them (or loads them from numba's cache); if that fails, one warning, ``False`` (the
    caller takes the checked road, nothing was written) then and for every later call."""
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
            f"({type(exc).__name__}: {exc}); such calls take the checked road",
            RuntimeWarning,
            stacklevel=5,
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
        return  # not a numba dispatcher (a test's stand-in): nothing to remember
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


def _ncl_length(x: Tensor) -> int:
    """``L`` when ``x`` (which passed :meth:`CpuBackend.check`) is a float32/float64 ``(N, C, L)`` view of
    ``(N, L, C)`` memory, whose output the kernels write contiguous, torch's layout for it, in their normalize
    pass (``passes.nsc_tile_to_ncs``); else 0. The checked road keeps the input's layout (``channel_dim=-1``
    hands it such views and wants ``(N, L, C)`` back)."""
    if len(x.shape) == 3 and not x.is_contiguous() and (x.dtype is _F32 or x.dtype is _F64):
        return x.shape[2]
    return 0


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


def _affine_plan(order: str, n: int, c: int, s: int, sd: torch.dtype) -> AffinePlan:
    # the checked road's elementwise pass over (n, c, s) memory: ncs_affine_any's plan, or row ranges
    nt = threads(n * c * s)
    if order == "ncs":
        return AffinePlan(*_ncs_affine_plan(nt, n, c, s, _NP[sd]))
    return AffinePlan(_nsc_parts(nt, n * s, c), 1, _NO_TABLE)


def _affine(order, n, c, s, u, x, out, vectors, sd, pass_="affine/") -> None:
    # out = a*u + k*(x - mean) + shift (u None: no u term) through the order's driver; u, x, out dense, one layout
    args = (_LIKE[x.dtype], AffineData(_addr(u), x.data_ptr(), out.data_ptr()), Shape(n, c, s, 0),
            _affine_plan(order, n, c, s, sd), vectors, _scalar(0.0, sd))  # fmt: skip
    ran_plan(pass_ + order)
    _call(_AFFINE_DRIVER[order], args)


def _reduce(order, n, c, s, dy, x, dx, vectors, sd, pass_="reduce/") -> None:
    # sum(dy), sum(dy * (x - mean)) into vectors.sum_dy, .sum_dy_xmu; with dx also dx = scale * dy in the
    # same read (eval backward). Tasks stream row ranges in memory order.
    nt = threads(n * c * s)
    t = _nsc_parts(nt, n * c, s) if order == "ncs" else _nsc_parts(nt, n * s, c)
    args = (_LIKE[x.dtype], Grads(dy.data_ptr(), x.data_ptr(), _addr(dx)), Shape(n, c, s, 0), t, vectors,
            _scalar(0.0, sd))  # fmt: skip
    ran_plan(pass_ + order)
    _call(_REDUCE_DRIVER[order], args)


def _eval_backward_planned(gy, x, running_mean, running_var, weight, eps):
    # (dx, dweight, dbias) of the checked road's eval backward in one call; None if its driver failed to compile
    order, n, c, s = layout_of(x)
    sd = running_mean.dtype
    dx = torch.empty_like(x)
    dw, db = torch.empty(c, dtype=sd), torch.empty(c, dtype=sd)
    nt = threads(x.numel())
    t = _nsc_parts(nt, n * c, s) if order == "ncs" else _nsc_parts(nt, n * s, c)
    vectors = GradVectors(running_mean.data_ptr(), running_var.data_ptr(), _addr(weight), dw.data_ptr(), db.data_ptr(),
                          0)  # fmt: skip
    args = (_LIKE[x.dtype], Grads(gy.data_ptr(), x.data_ptr(), dx.data_ptr()), Shape(n, c, s, 0), t, vectors,
            _scalar(eps, sd))  # fmt: skip
    if not _call_driver(_driver(_small_kernels().EVAL_BACKWARD_DRIVERS, order), args):
        return None
    ran_plan("eval_backward/" + order)
    return dx, dw, db
