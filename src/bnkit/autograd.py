"""Batch norm as torch custom ops with a hand-derived backward.

Four ops, registered with ``torch.library`` so that ``torch.export`` and other dispatch-level
tracers see them as opaque nodes with known output shapes (``register_fake``):

* ``bnkit::forward_train(x, weight, bias, eps) -> (y, mean, var)``
* ``bnkit::forward_eval(x, running_mean, running_var, weight, bias, eps) -> y``
* ``bnkit::backward_train(dy, x, weight, mean, invstd, ...) -> (dx, dw, db)``
* ``bnkit::backward_eval(dy, x, running_mean, running_var, weight, eps, ...) -> (dx, dw, db)``

The forward ops carry an autograd formula (``register_autograd``) that calls the backward
ops. When the backward itself must be differentiable (double backward: grad mode is on
while it runs) it is computed instead from :mod:`bnkit.reference` in plain torch ops, so
autograd can differentiate it again. Every op picks its backend per call through
:func:`bnkit.kernels.backend_for`.

Which road a call takes is decided here, once: :func:`plain_eager` (nothing records the call: the
kernels run directly, through ``torch.autograd.Function``), :func:`needs_plain_ops` (``torch.func``,
``torch.jit.trace``, ONNX export and ``torch.compile`` record :mod:`bnkit.reference`'s formulas;
``docs/ecosystem.md`` says why), or else the custom ops. A plain eager call on CPU tensors first asks the
``cpu`` backend's one-call road (:func:`one_call`: each pass one compiled call on raw addresses, through
the same two Functions, ``_TrainFn`` and ``_EvalFn``); ``docs/design.md`` draws the whole road.

The formulas (symbols of ``docs/math.md``), with ``c1 = sum(dy)/M``, ``c2 = sum(dy*xhat)/M``::

    training:  dx = w*invstd * (dy - c1 - xhat*c2),  dw = sum(dy*xhat),  db = sum(dy)
    eval:      dx = w*invstd * dy,                   dw = sum(dy*xhat),  db = sum(dy)

Backends compute ``dx`` as ``a*dy + k*(x - mean) + c`` with ``a = w*invstd``,
``k = -a*invstd*c2`` and ``c = -a*c1``: one elementwise pass that never forms the
cancelling ``b*x + const`` form.

The eager Functions also carry forward-mode AD (``jvp``: the tangents of ``docs/math.md``,
"Forward mode", in plain ops, :func:`bnkit.reference.jvp_train`/``jvp_eval``), and a backward
that receives a batched gradient (no storage: ``vmap`` over the backward) computes it with the
reference's formulas instead of the kernels.
"""


import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor, is_legacy_batchedtensor, unwrap_if_dead
from torch.autograd import forward_ad as _fwAD

from bnkit import reference as ref
from bnkit.kernels import backend_for, get_backend, runs_cpu_backend
from bnkit.kernels import base as _kbase

__all__ = [
    "backward_eval",
    "backward_train",
    "evaluate",
    "forward_eval",
    "forward_train",
    "inductor_records",
    "inductor_train",
    "one_call",
    "one_call_backend",
    "train",
    "train_updating",
]


_SCALARS: dict[tuple[float, torch.dtype], Tensor] = {}


def cached_scalar(value: float, dtype: torch.dtype) -> Tensor:
    """``value`` as a 0-d CPU tensor of ``dtype``, made once per (value, dtype); callers only read it.

    In a binary op with a CPU tensor of ``dtype`` it gives the numbers a Python scalar gives
    (torch rounds the scalar to ``dtype`` first), without wrapping a new scalar tensor per op,
    which costs several microseconds on a small per-channel vector. Eager code only.
    """
    key = (value, dtype)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= 256:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.tensor(value, dtype=dtype)
    return t


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` laid out with the strides of ``x`` (kernels index both with one set of strides)."""
    if t.stride() == x.stride():
        return t
    out = torch.empty_like(x, dtype=t.dtype)
    out.copy_(t)
    return out


def _to(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    # t.to(dtype) (which returns t itself when the dtype matches) without its argument parsing
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _param_dtype(weight: Tensor | None, bias: Tensor | None) -> torch.dtype | None:
    for p in (weight, bias):
        if p is not None:
            return p.dtype
    return None


def _wrapped(gy: Tensor) -> bool:
    """Whether a gradient is a functorch wrapper (vmap's batched tensors) or a batched gradient of
    ``autograd.grad(..., is_grads_batched=True)`` (torch's legacy vmap): it has no storage, so the gradient
    formulas run in plain torch ops. (Only the incoming gradient can be one: a forward under a transform
    takes the reference and never reaches the kernels' Functions.)"""
    return is_functorch_wrapped_tensor(gy) or is_legacy_batchedtensor(gy)


def _empty_channels(x: Tensor) -> tuple[Tensor, Tensor]:
    sd = ref.stats_dtype(x.dtype)
    c = x.shape[1]
    return x.new_empty((c,), dtype=sd), x.new_empty((c,), dtype=sd)


# --- training forward -------------------------------------------------------------------


@torch.library.custom_op("bnkit::forward_train", mutates_args=())
def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)`` of a training-mode batch norm (var biased, per channel)."""
    y, mean, var = backend_for(x).forward_train(x, weight, bias, eps)
    return y, mean, var


@forward_train.register_fake
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    mean, var = _empty_channels(x)
    return torch.empty_like(x), mean, var


def _forward_train_setup(ctx, inputs, output) -> None:
    x, weight, _bias, eps = inputs
    _y, mean, var = output
    ctx.save_for_backward(x, weight, mean, var)
    ctx.eps = eps
    ctx.param_dtype = _param_dtype(weight, _bias)


def _forward_train_backward(ctx, gy: Tensor | None, _gmean: Tensor | None, _gvar: Tensor | None):
    if gy is None:  # (eager path: grads are not materialized) no gradient reached the output
        return None, None, None, None
    x, weight, mean, var = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if torch.is_grad_enabled():
        # Double backward: rebuild mean and invstd from x in plain ops so that autograd
        # sees how they depend on x.
        m, v = ref.batch_stats(x)
        dx, dw, db = ref.backward_train(gy, x, m, ref.invstd(v, ctx.eps), weight)
    elif _wrapped(gy):
        # vmap over the backward (batched gradients): no storage for the kernels, plain ops
        dx, dw, db = ref.backward_train(gy, x, mean, ref.invstd(var, ctx.eps), weight)
    elif _eager(gy):
        if var.is_cpu:  # ref.invstd with eps as a cached 0-d tensor: the same float ops, no scalar wrap
            inv = torch.rsqrt(var + cached_scalar(ctx.eps, var.dtype))
        else:
            inv = ref.invstd(var, ctx.eps)
        dx, dw, db = _backward_train_impl(gy, x, weight, mean, inv, need_x, need_w or need_b)
    else:
        dx, dw, db = backward_train(gy, x, weight, mean, ref.invstd(var, ctx.eps), need_x, need_w or need_b)
    dw = _to(dw, ctx.param_dtype) if need_w else None
    db = _to(db, ctx.param_dtype) if need_b else None
    return (dx if need_x else None), dw, db, None


forward_train.register_autograd(_forward_train_backward, setup_context=_forward_train_setup)


@torch.library.custom_op("bnkit::backward_train", mutates_args=())
def backward_train(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    need_input_grad: bool,
    need_param_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)`` of the training forward; ``dx`` is empty unless asked for."""
    return _backward_train_impl(dy, x, weight, mean, invstd, need_input_grad, need_param_grad)


def _backward_train_impl(dy, x, weight, mean, invstd, need_input_grad, need_param_grad):
    dy = _like(dy, x)
    backend = backend_for(x)
    if need_input_grad:
        dx, sum_dy, sum_dy_xhat = _kbase.backward_train(backend, dy, x, mean, invstd, weight)
        return dx, sum_dy_xhat, sum_dy
    sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, mean)
    return x.new_empty((0,)), sum_dy_xmu * invstd, sum_dy


@backward_train.register_fake
def _(dy, x, weight, mean, invstd, need_input_grad, need_param_grad):
    dw, db = _empty_channels(x)
    return (torch.empty_like(x) if need_input_grad else x.new_empty((0,))), dw, db


# --- eval forward -----------------------------------------------------------------------


def _eval_scale(running_var: Tensor, weight: Tensor | None, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    inv = ref.invstd(running_var.to(dtype), eps)
    return inv, (inv if weight is None else inv * weight.to(dtype))


@torch.library.custom_op("bnkit::forward_eval", mutates_args=())
def forward_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``y = (x - running_mean) * w / sqrt(running_var + eps) + b`` (eval mode, one pass)."""
    return _forward_eval_impl(x, running_mean, running_var, weight, bias, eps)


def _forward_eval_impl(x, running_mean, running_var, weight, bias, eps):
    backend = backend_for(x)
    fused = getattr(backend, "forward_eval_running", None)
    if fused is not None:
        # the same numbers as below, without the small torch ops (a backend's optional method)
        return fused(x, running_mean, running_var, weight, bias, eps)
    sd = ref.stats_dtype(x.dtype)
    _inv, scale = _eval_scale(running_var, weight, eps, sd)
    shift = torch.zeros_like(scale) if bias is None else bias.to(sd)
    return backend.forward_eval(x, running_mean.to(sd), scale, shift)


@forward_eval.register_fake
def _(x, running_mean, running_var, weight, bias, eps):
    return torch.empty_like(x)


def _forward_eval_setup(ctx, inputs, output) -> None:
    x, running_mean, running_var, weight, _bias, eps = inputs
    ctx.save_for_backward(x, running_mean, running_var, weight)
    ctx.eps = eps
    ctx.param_dtype = _param_dtype(weight, _bias)


def _forward_eval_backward(ctx, gy: Tensor):
    x, running_mean, running_var, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    if torch.is_grad_enabled() or _wrapped(gy):
        # double backward (differentiable ops), or vmap over the backward (tensors without storage)
        sd = ref.stats_dtype(x.dtype)
        inv = ref.invstd(running_var.to(sd), ctx.eps)
        dx, dw, db = ref.backward_eval(gy, x, running_mean.to(sd), inv, weight)
    else:
        bwd = _backward_eval_impl if _eager(gy) else backward_eval
        dx, dw, db = bwd(gy, x, running_mean, running_var, weight, ctx.eps, need_x, need_w or need_b)
    dw = _to(dw, ctx.param_dtype) if need_w else None
    db = _to(db, ctx.param_dtype) if need_b else None
    return (dx if need_x else None), None, None, dw, db, None


forward_eval.register_autograd(_forward_eval_backward, setup_context=_forward_eval_setup)


@torch.library.custom_op("bnkit::backward_eval", mutates_args=())
def backward_eval(
    dy: Tensor,
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    eps: float,
    need_input_grad: bool,
    need_param_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)`` of the eval forward; running statistics are constants."""
    return _backward_eval_impl(dy, x, running_mean, running_var, weight, eps, need_input_grad, need_param_grad)


def _backward_eval_impl(dy, x, running_mean, running_var, weight, eps, need_input_grad, need_param_grad):
    dy = _like(dy, x)
    sd = ref.stats_dtype(x.dtype)
    backend = backend_for(x)
    inv, scale = _eval_scale(running_var, weight, eps, sd)
    if need_input_grad and need_param_grad:
        dx, sum_dy, sum_dy_xmu = _kbase.backward_eval(backend, dy, x, running_mean.to(sd), scale, inv)
        return dx, sum_dy_xmu * inv, sum_dy
    if need_input_grad:
        zeros = torch.zeros_like(scale)
        dx = backend.forward_eval(dy, zeros, scale, zeros)
    else:
        dx = x.new_empty((0,))
    if need_param_grad:
        sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, running_mean.to(sd))
        return dx, sum_dy_xmu * inv, sum_dy
    dw, db = _empty_channels(x)
    return dx, dw.zero_(), db.zero_()


@backward_eval.register_fake
def _(dy, x, running_mean, running_var, weight, eps, need_input_grad, need_param_grad):
    dw, db = _empty_channels(x)
    return (torch.empty_like(x) if need_input_grad else x.new_empty((0,))), dw, db


# --- forward-mode AD ---------------------------------------------------------------------
#
# Tangents (docs/math.md, "Forward mode") in plain torch ops (bnkit.reference.jvp_train/jvp_eval): they
# are per-channel reductions and elementwise terms of the same size as the forward, and plain ops take
# functorch-batched tangents (check_batched_forward_grad, vmap over jvp) that have no storage for a kernel.
# The forward itself still runs on the backend's kernels.

# torch's wording (its batch_norm_jvp): the running statistics are constants of the eval forward
RUNNING_TANGENT_ERROR = (
    "batch_norm is not differentiable wrt running_mean and running_var, they cannot have forward grad defined"
)


def constant_running_stats(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The running statistics of an eval forward, without forward-mode tangents (a forward AD level is open).

    torch's rule: tangents on ``running_mean``/``running_var`` raise its error when the input, weight or
    bias carries one too, and are ignored otherwise (the output then has no tangent). Ignoring them here,
    before the Function runs, is also what lets its jvp see no tangent at all in that case (a jvp that
    returns no tangent for its only output trips an internal assert of torch 2.13).
    """
    rm, rv = _fwAD.unpack_dual(running_mean), _fwAD.unpack_dual(running_var)
    if rm.tangent is None and rv.tangent is None:
        return running_mean, running_var
    for t in (x, weight, bias):
        if t is not None and _fwAD.unpack_dual(t).tangent is not None:
            raise RuntimeError(RUNNING_TANGENT_ERROR)
    return rm.primal, rv.primal


def _forward_train_jvp(ctx, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None) -> Tensor | None:
    x, weight, mean, var = ctx.saved_tensors
    return ref.jvp_train(tx, tw, tb, x, mean, ref.invstd(var, ctx.eps), weight)


def _forward_eval_jvp(ctx, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None) -> Tensor | None:
    x, running_mean, running_var, weight = ctx.saved_tensors
    sd = ref.stats_dtype(x.dtype)
    return ref.jvp_eval(tx, tw, tb, x, running_mean.to(sd), ref.invstd(running_var.to(sd), ctx.eps), weight)


# --- eager fast path --------------------------------------------------------------------
#
# A torch custom op costs tens of microseconds of dispatch per call in eager mode, which
# dominates small inputs. When nothing traces or transforms the call (plain tensors, not
# compiling, no dispatch/function modes, no functorch), the same formulas run through a
# torch.autograd.Function instead: same backends, same setup and backward functions.
# When no input needs a gradient (grad mode off, or nothing requires grad) and no forward-mode
# AD level is open, there is no graph to record: the backend runs directly.


def plain_eager() -> bool:
    """Whether nothing records, compiles or transforms the current call: no ``torch.compile``/``torch.export``
    tracing, no dispatch or function mode, no ``torch.func`` transform, no ``torch.jit.trace``.

    Only then may bnkit run its kernels directly (raw memory, numba): every tracer needs to see
    ops it can record. The one place this question is asked.
    """
    return (
        not _is_compiling()
        and _dispatch_stack_len() == 0
        and not _function_mode_enabled()
        and _peek_interpreter_stack() is None
        and _tracing_state() is None
    )


# bound once: plain_eager runs on every small call, where each attribute lookup costs
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_tracing_state = torch._C._get_tracing_state


def _eager(x: Tensor) -> bool:
    """Whether a call on ``x`` is plain eager execution that may skip the custom-op dispatcher."""
    return type(x) is Tensor and plain_eager()


def needs_plain_ops() -> bool:
    """Whether the current call must be recorded as plain torch ops (:mod:`bnkit.reference`'s formulas)
    instead of bnkit's custom ops.

    * ``torch.func`` transforms: functorch runs no ``register_autograd`` formula of a custom op under
      ``grad``/``jacrev``/``jvp``;
    * ``torch.jit.trace``: the traced module must run where bnkit's Python kernels cannot (TorchScript);
    * ONNX export: the graph may hold standard ONNX ops only;
    * ``torch.compile``: inductor fuses the formulas with their neighbours (see ``docs/ecosystem.md``).

    ``torch.export`` outside ONNX keeps the custom ops (opaque nodes with the hand-derived backward).
    """
    if _peek_interpreter_stack() is not None or _tracing_state() is not None:
        return True
    compiling = _is_compiling()
    if compiling and not torch.compiler.is_exporting():
        return True
    if not compiling and _dispatch_stack_len() == 0:
        return False  # nothing exports this call (both ONNX exporters trace or export it)
    return torch.onnx.is_in_onnx_export()


def inductor_records() -> bool:
    """Whether ``torch.compile`` (not ``torch.export``) is recording the current call: then a training call
    records :class:`_InductorTrainFn`. (Under dynamo, functorch's interpreter stack does not answer.)"""
    return _is_compiling() and not torch.compiler.is_exporting()


class _InductorTrainFn(torch.autograd.Function):
    r"""The training forward and its hand-derived backward in plain torch ops, for ``torch.compile``.

    Inductor fuses these ops with the convolutions and activations around them. The statistics come from
    ``torch.var_mean`` (inductor's Welford reduction) in the computation dtype, float32 for float32 and
    16-bit data and float64 for float64, where :mod:`bnkit.reference` accumulates in float64: the
    reference is the spec, this is the speed road, and both agree to the data's rounding. The output is
    :func:`bnkit.reference.normalize` and the backward :func:`bnkit.reference.backward_train` in the
    computation dtype, so inductor sees two reductions (``sum(dy)``, ``sum(dy * xhat)``) and one
    elementwise pass instead of the autograd graph of the forward's formulas. The returned ``mean`` and
    ``var`` (biased) feed the running statistics and carry no gradient.
    """

    generate_vmap_rule = True  # plain torch ops: functorch batches them itself

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        var, mean = torch.var_mean(x.to(ref.stats_dtype(x.dtype)), ref.reduction_dims(x), correction=0)
        return ref.normalize(x, mean, ref.invstd(var, eps), weight, bias), mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, eps = inputs
        _, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, mean, var = ctx.saved_tensors
        dx, dw, db = ref.backward_train(dy, x, mean, ref.invstd(var, ctx.eps), weight, acc=mean.dtype)
        dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = db.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def inductor_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, biased var)`` of a training call that ``torch.compile`` records (:class:`_InductorTrainFn`)."""
    return _InductorTrainFn.apply(x, weight, bias, eps)


class _Declined(Exception):
    """The cpu backend's one-call road wrote nothing (a tensor without storage, or a driver that failed
    to compile): the call takes the checked road."""


class _SavedStats:
    """The context that :func:`_forward_train_backward` reads, for a backward of the one-call road that its
    kernels cannot serve: ``saved_tensors`` as ``(x, weight, mean, var)``, the mean and variance split from
    the ``(2*c,)`` vector the road saved."""

    def __init__(self, ctx, x: Tensor, weight: Tensor | None, mv: Tensor, eps: float, param_dtype) -> None:
        mean, var = mv.view(2, -1).unbind()
        self.saved_tensors = (x, weight, mean, var)
        self.needs_input_grad = ctx.needs_input_grad
        self.eps = eps
        self.param_dtype = param_dtype


def _kernel_grad(gy: Tensor, x: Tensor) -> Tensor | None:
    """``gy`` as the one-call backward kernels read it, in ``x``'s memory order: ``gy`` itself, or a copy
    (:func:`_like`) when only its strides differ (the gradient of an output that :mod:`bnkit.functional`
    gave torch's contiguous layout, for an ``(N, C, L)`` view of ``(N, L, C)`` memory); ``None`` when the
    regular backward must run."""
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


class _TrainFn(torch.autograd.Function):
    """The training forward and its backward, for every backend. ``plan`` (the cpu backend's one-call road,
    :func:`one_call`): the output ``y`` only, the batch statistics saved as one ``(2*C,)`` vector, and the
    backward asks the backend again with the same plan; otherwise ``(y, mean, var)`` from the backend's
    ``forward_train``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running=None, plan=None):
        ctx.plan = plan
        if plan is not None:
            out = _CPU.one_call_train(plan, x, weight, bias, eps, True)
            if out is None:
                raise _Declined
            y, mv = out
            ctx.save_for_backward(x, weight, mv)
            ctx.eps = eps
            ctx.set_materialize_grads(False)
            return y
        # running (cpu backend only, see train_updating): the running statistics' update, in the
        # backend's compiled call; its tensors are buffers that carry no gradient
        backend = backend_for(x)
        if running is None:
            y, mean, var = backend.forward_train(x, weight, bias, eps)
        else:
            y, mean, var = backend.forward_train(x, weight, bias, eps, running)
        ctx.mark_non_differentiable(mean, var)
        # the backward ignores the (always zero) gradients of mean and var: do not build them
        ctx.set_materialize_grads(False)
        _forward_train_setup(ctx, (x, weight, bias, eps), (y, mean, var))
        if _fwAD._current_level >= 0:  # a forward-mode AD level is open: jvp may follow
            ctx.save_for_forward(x, weight, mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, gmean=None, gvar=None):
        plan = ctx.plan
        if plan is None:
            return (*_forward_train_backward(ctx, gy, gmean, gvar), None, None)
        if gy is None:
            return None, None, None, None, None, None
        x, weight, mv = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = _kernel_grad(gy, x)
        if g is not None:
            grads = _CPU.one_call_train_backward(plan, g, x, weight, mv, ctx.eps, need_x)
            if grads is not None:
                dx, dw, db = grads
                return dx, (dw if need_w else None), (db if need_b else None), None, None, None
        # weight and bias, when given, are vectors of the statistics dtype (the backend's check)
        saved = _SavedStats(ctx, x, weight, mv, ctx.eps, plan[6])
        return (*_forward_train_backward(saved, gy, None, None)[:3], None, None, None)

    @staticmethod
    def jvp(ctx, tx, tw, tb, *_ignored):
        # (tangents of eps and of the running-statistics update: not differentiable, as in torch)
        return _forward_train_jvp(ctx, tx, tw, tb), None, None


class _EvalFn(torch.autograd.Function):
    """The eval forward and its backward, for every backend. ``plan``: the cpu backend's one-call road
    (:func:`one_call`), whose backward asks the backend again and takes the regular formulas where it
    declines."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps, plan=None):
        if plan is not None:
            y = _CPU.one_call_eval(plan, x, running_mean, running_var, weight, bias, eps)
            if y is None:
                raise _Declined
        else:
            y = _forward_eval_impl(x, running_mean, running_var, weight, bias, eps)
        ctx.plan = plan
        _forward_eval_setup(ctx, (x, running_mean, running_var, weight, bias, eps), y)
        if _fwAD._current_level >= 0:
            ctx.save_for_forward(x, running_mean, running_var, weight)
            ctx.set_materialize_grads(False)  # jvp tells absent tangents (None) from zero ones
        return y

    @staticmethod
    def backward(ctx, gy):
        if gy is None:  # (grads not materialized) no gradient reached the output
            return None, None, None, None, None, None, None
        plan = ctx.plan
        if plan is not None:
            x, running_mean, running_var, weight = ctx.saved_tensors
            g = _kernel_grad(gy, x)
            if g is not None:
                need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
                grads = _CPU.one_call_eval_backward(plan, g, x, running_mean, running_var, weight, ctx.eps, need_x,
                                                    need_w or need_b)  # fmt: skip
                if grads is not None:
                    dx, dw, db = grads
                    return dx, None, None, (dw if need_w else None), (db if need_b else None), None, None
        return (*_forward_eval_backward(ctx, gy), None)

    @staticmethod
    def jvp(ctx, tx, _trm, _trv, tw, tb, _teps, _tplan=None):
        # (running statistics reach the Function without tangents: evaluate() applies torch's rule first)
        return _forward_eval_jvp(ctx, tx, tw, tb)


# ``Function.apply`` minus its Python wrapper: with no functorch transform active (``_eager``) the
# wrapper only unwraps dead functorch wrappers (``_live``) and calls this.
_train_apply = super(torch.autograd.Function, _TrainFn).apply
_eval_apply = super(torch.autograd.Function, _EvalFn).apply


def _live(t: Tensor | None) -> Tensor | None:
    return t if t is None else unwrap_if_dead(t)


def _records_graph(*tensors: Tensor | None) -> bool:
    """Whether a call on ``tensors`` must go through autograd (an input needs a gradient, or forward AD)."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return _fwAD._current_level >= 0


def train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`forward_train`, through the eager fast path when nothing traces the call."""
    if _eager(x):
        x, weight, bias = unwrap_if_dead(x), _live(weight), _live(bias)
        if _records_graph(x, weight, bias):
            return _train_apply(x, weight, bias, eps)
        return backend_for(x).forward_train(x, weight, bias, eps)
    return forward_train(x, weight, bias, eps)


def train_updating(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running: tuple[Tensor, Tensor, Tensor, Tensor, float],
) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`train` with the running statistics' update done by the ``cpu`` backend in its compiled call.

    ``running = (running_mean, running_var, new_mean, new_var, momentum)``: the update goes to
    ``new_*`` (which may be the buffers themselves; the caller bumps their version counters). ``None``
    when the ``cpu`` backend does not run this call eagerly: nothing was computed or written, and the
    caller takes :func:`train` and updates the statistics itself.
    """
    if not _eager(x):
        return None
    x, weight, bias = unwrap_if_dead(x), _live(weight), _live(bias)
    backend = backend_for(x)
    if backend.name != "cpu":
        return None
    if _records_graph(x, weight, bias):
        return _train_apply(x, weight, bias, eps, running)
    return backend.forward_train(x, weight, bias, eps, running)


# --- the cpu backend's one-call road -----------------------------------------------------------

_CPU = None  # the cpu backend, once a call has found it selected (bnkit.kernels.runs_cpu_backend)
# torch.autograd.graph.increment_version without its Python wrapper (the callers pass tuples of tensors)
_increment_version = torch._C._increment_version


def one_call_backend(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
    bias: Tensor | None, eps: float,
):
    """``(cpu backend, dims, graph)`` when a plain eager call may take the cpu backend's one-call road (the
    backend's :meth:`~bnkit.kernels.cpu.backend.CpuBackend.check` passed: ``dims`` is its answer; ``graph``:
    autograd records the call), else ``None``. The one gate of :func:`one_call` and
    :func:`bnkit.fused.one_call_act`."""
    global _CPU
    if type(eps) is not float or _fwAD._current_level >= 0 or not plain_eager():
        return None
    cpu = _CPU
    if cpu is None:  # (a CUDA tensor must not load the cpu backend)
        if type(x) is not Tensor or not x.is_cpu or not runs_cpu_backend():
            return None
        cpu = _CPU = get_backend("cpu")
    dims = cpu.check(x, running_mean, running_var, weight, bias)
    if dims is None:
        return None
    graph = torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
    )
    return cpu, dims, graph


def one_call(
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
    """``(y, new_running_mean, new_running_var)`` of a plain eager call on the cpu backend's one-call road
    (each pass one compiled call on raw addresses), or ``None`` for the checked road (:func:`train`,
    :func:`evaluate`), which raises torch's errors for bad arguments.

    Anything unusual (another dtype or layout, subclasses, tracing, transforms, forward AD, gradients of
    the running statistics, double backward) takes the checked road; a call that passes the backend's
    :meth:`~bnkit.kernels.cpu.backend.CpuBackend.check` has valid arguments. With ``inplace`` the running
    statistics are updated in their own buffers (what :func:`bnkit.functional.batch_norm` does) and
    returned; otherwise new tensors hold the update (:func:`bnkit.functional.batch_norm_pure`). Channels
    must be in dim 1. The numbers are the checked road's up to rounding on the small kernels, and its
    bits on the planned paths.
    """
    ready = one_call_backend(x, running_mean, running_var, weight, bias, eps)
    if ready is None:
        return None
    cpu, dims, graph = ready
    if training is True:
        if type(momentum) is not float or not eps > 0.0:
            return None
        call = cpu.one_call_train_plan(x, dims, running_mean, running_var, momentum, inplace, graph)
        if call is None:
            return None
        plan, new_mean, new_var = call
        if graph:
            try:
                y = _train_apply(x, weight, bias, eps, None, plan)
            except _Declined:
                return None
        else:
            out = cpu.one_call_train(plan, x, weight, bias, eps, False)
            if out is None:
                return None
            y = out[0]
        if inplace and running_mean is not None:
            # the kernel wrote the buffers through raw addresses: tell autograd, as copy_ would (a graph
            # that saved them, e.g. an eval-mode call, then refuses a backward through stale values)
            _increment_version((running_mean, running_var))
        return y, new_mean, new_var
    if training is False and running_mean is not None and eps >= 0.0:
        if graph:
            try:
                plan = cpu.one_call_eval_plan(x, dims, True)
                y = _eval_apply(x, running_mean, running_var, weight, bias, eps, plan)
            except _Declined:
                return None
        else:  # (the plan's backward half is not needed)
            y = cpu.one_call_eval((dims, False), x, running_mean, running_var, weight, bias, eps)
            if y is None:
                return None
        return y, running_mean, running_var
    return None


def evaluate(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """:func:`forward_eval`, through the eager fast path when nothing traces the call."""
    if _eager(x):
        x, running_mean, running_var = unwrap_if_dead(x), _live(running_mean), _live(running_var)
        weight, bias = _live(weight), _live(bias)
        if _records_graph(x, running_mean, running_var, weight, bias):
            if _fwAD._current_level >= 0:
                running_mean, running_var = constant_running_stats(x, running_mean, running_var, weight, bias)
            return _eval_apply(x, running_mean, running_var, weight, bias, eps)
        return _forward_eval_impl(x, running_mean, running_var, weight, bias, eps)
    return forward_eval(x, running_mean, running_var, weight, bias, eps)
