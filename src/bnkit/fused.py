r"""Batch norm fused with an activation, and the memory-saving (InPlace-ABN) mode.

Forward: ``z = act(y)`` with ``y = w * xhat + b`` (the batch-norm output, see
:mod:`bnkit.reference`). A plain eager training call on the ``cpu`` backend takes plain batch norm's
road (:func:`one_call_act`): the one-call plan writes ``y``, the batch statistics and the running
statistics' update in one compiled call, then the activation runs in place on ``y``; eval (with
contiguous float32/float64 input) normalizes and applies the activation in one pass
(:func:`bnkit.kernels.cpu.act.row_act`); otherwise the backend's primitives and one in-place activation
pass compose it.

Backward, with ``g = dz * act'(y)`` the gradient reaching the batch norm, is the batch-norm
backward of :mod:`bnkit.reference` applied to ``g``::

    dx = w * invstd * (g - c1 - xhat * c2),  c1 = sum(g)/M,  c2 = sum(g * xhat)/M
    dw = sum(g * xhat),                       db = sum(g)

Standard mode saves ``x`` and per-channel vectors. Where the one-pass kernel backward
(:func:`bnkit.kernels.cpu.act.channel_backward_std`: ``g`` from ``dz`` and ``x``, reduced, then ``dx``
while the channels are in cache) does not run, it also saves ``z`` when ``act'(y)`` reads off it
(identity, relu, and leaky_relu or elu with a positive parameter), and the backward is torch's activation
backward and then the batch norm's own backward on ``g`` (the forward's plan on the one-call road): the
pair "batch norm, then torch's activation" keeps the same two tensors, and the layer after usually keeps
``z`` anyway. On the small kernels' sizes the one-call road is that pair itself (:func:`one_call_act`).
silu and gelu save only ``x`` and rebuild ``y`` with one extra pass.

Memory-saving mode (Rota Bulò et al., "In-Place Activated BatchNorm", CVPR 2018) saves
only ``z`` and per-channel vectors, and rebuilds everything in the backward::

    y    = act^{-1}(z)          leaky_relu: y = z if z >= 0 else z / slope
                                elu:        y = z if z >= 0 else log1p(z / alpha)
    xhat = (y - b) / w
    g    = dz * act'(y)         leaky_relu: slope where z < 0;  elu: z + alpha where z < 0

Substituting ``xhat`` keeps ``w`` out of every denominator of ``dx``::

    dx = a * g + k * (y - b) + c,   a = w * invstd,  k = -invstd * c2,  c = -a * c1
    c2 = sum(g * (y - b)) / (w * M)

which is exactly the backend contract (``backward_reduce(g, y, b)`` and
``backward_input(g, y, b, a, k, c)`` with ``b`` in the place of the mean).

Channels whose scale cannot be divided out (``|w| <= RECOVERY_RATIO * |b| + tiny``, in
particular ``w == 0``) lose ``xhat`` in ``y``: ``y`` is ``b`` up to rounding. Instead of
changing the forward (InPlace-ABN uses ``|w| + eps`` as the scale), bnkit keeps ``xhat`` of
just those channels in a side tensor of shape (N, n_lost, *) and computes their ``dw`` and
``dx`` from it; it is empty in the usual case. Precision limits of the inversion (float32):
``xhat`` is recovered to about ``eps * |b| / |w| <= 1e-4``; ELU's inverse loses digits where
``exp(y)`` is small (error about ``eps / exp(y)``) and fails once the output saturates at
``-alpha`` (``y < log(eps)``, -15.9 in float32, -36 in float64) - InPlace-ABN shares both.

The memory-saving backward allocates nothing full-size besides ``dx``: the kernels work
element by element, and the composed path runs over batch chunks of at most
:data:`CHUNK_ELEMENTS` elements (at least one sample; :func:`forced_act_road` sets another size). ELU
under the ``cpu`` backend takes a third way: torch's vectorized ``log1p`` writes the inverse into ``dx``
itself (or, when only ``dw``/``db`` are wanted, into a chunk-sized buffer), one kernel turns it into ``y``
while it reduces and a second one reads ``y`` back while it writes ``dx`` (numba's scalar ``log1p`` in the
kernels, or eight torch ops per chunk in the composed path, made this backward several times slower).
With ``inplace=True`` the forward writes ``z`` over ``x``: on the one-call road the plan's kernel writes
``y`` over ``x``; elsewhere chunk by chunk, after two ``backward_reduce`` passes for the statistics.
Double backward (``create_graph=True``) recomputes the forward from the saved input in
differentiable reference ops; memory-saving mode has none (it keeps only the output) and raises a
clear error. Forward-mode AD (``jvp``) gives
``tz = act'(y) * ty`` with the batch norm's tangent ``ty`` (``docs/math.md``) in plain ops from the
input, which ``inplace=True`` overwrites (it raises there); batched gradients (``vmap`` over the
backward) take plain-op twins of both backwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad as _fwAD

from bnkit import autograd as bn_ops
from bnkit import reference as ref
from bnkit.kernels import backend_for, get_backend, ran_plan

__all__ = [
    "ACTIVATIONS",
    "ACT_ROADS",
    "CHUNK_ELEMENTS",
    "INVERTIBLE_ACTIVATIONS",
    "RECOVERY_RATIO",
    "activation_grad",
    "activation_inverse",
    "apply_activation",
    "batch_norm_act_forward",
    "check_activation",
    "forced_act_road",
    "one_call_act",
]

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu", "gelu")
INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu", "elu")
# Memory-saving backward: channels with |w| <= RECOVERY_RATIO * |b| + tiny keep xhat aside.
RECOVERY_RATIO = 1e-3
# Memory-saving backward/in-place forward: elements per batch chunk (at least one sample).
CHUNK_ELEMENTS = 1 << 20
# the ways forced_act_road may force: bnkit.kernels.cpu.act's kernels, or the backend's primitives composed
ACT_ROADS = ("kernels", "composed")
# what forced_act_road holds (None: the default): read by _act_kernels_wanted and _batch_chunks
_act_road: str | None = None
_chunk_elements: int | None = None


@contextlib.contextmanager
def forced_act_road(road: str | None = None, *, chunk_elements: int | None = None) -> Iterator[None]:
    """Run a block of fused batch norm + activation calls on one road, whatever the default would pick.

    * ``"kernels"``: the numba kernels of :mod:`bnkit.kernels.cpu.act` wherever they apply (contiguous
      CPU float32/float64), also for the activations and backends where the default composes;
    * ``"composed"``: the backend's primitives and torch's activation ops, never those kernels;
    * ``None``: the road around the block; outside any ``forced_act_road`` the default: the kernels for
      identity, relu and leaky_relu, and for the memory-saving ELU backward, when the ``cpu`` backend runs.

    ``chunk_elements`` (at least 1) sets the elements per batch chunk of the memory-saving backward's
    composed and ELU passes and of the composed in-place forward (``None``: the size around the block;
    outside any, :data:`CHUNK_ELEMENTS`). Neither chooses between plain batch norm's roads, which training
    calls take first (:func:`bnkit.kernels.forced_road`). Blocks nest, and each restores the settings
    before it on exit, also when the block raises. Not thread-safe: the settings are process-wide, as
    :func:`bnkit.kernels.forced_road`'s. Raises ``ValueError`` for another road or size.
    """
    global _act_road, _chunk_elements
    if road is not None and road not in ACT_ROADS:
        raise ValueError(f"road must be one of {', '.join(ACT_ROADS)} or None, got {road!r}")
    if chunk_elements is not None and not (type(chunk_elements) is int and chunk_elements >= 1):
        raise ValueError(f"chunk_elements must be a positive int or None, got {chunk_elements!r}")
    previous = _act_road, _chunk_elements
    if road is not None:
        _act_road = road
    if chunk_elements is not None:
        _chunk_elements = chunk_elements
    try:
        yield
    finally:
        _act_road, _chunk_elements = previous


def check_activation(activation: str, activation_param: float, memory_saving: bool) -> None:
    """Raise ``ValueError`` for an unknown activation or one memory saving cannot invert."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if not memory_saving:
        return
    if activation not in INVERTIBLE_ACTIVATIONS:
        raise ValueError(
            f"memory_saving=True needs an invertible activation ({', '.join(INVERTIBLE_ACTIVATIONS)}), "
            f"got {activation!r}: its input cannot be rebuilt from its output"
        )
    if activation in ("leaky_relu", "elu") and not activation_param > 0:
        raise ValueError(
            f"memory_saving=True with {activation!r} needs activation_param > 0 to be invertible, "
            f"got {activation_param!r}"
        )


def _grad_from_output(activation: str, param: float) -> bool:
    # act'(y) can be read off z = act(y) when act is monotonic with a known sign split.
    return activation in ("identity", "relu") or (activation in ("leaky_relu", "elu") and param > 0)


def apply_activation(y: Tensor, activation: str, param: float, inplace: bool) -> Tensor:
    """``act(y)``, written over ``y`` when ``inplace`` (silu/gelu never in place here)."""
    if activation == "identity":
        return y
    if activation == "relu":
        return y.relu_() if inplace else F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu_(y, param) if inplace else F.leaky_relu(y, param)
    if activation == "elu":
        return F.elu_(y, param) if inplace else F.elu(y, param)
    if activation == "silu":
        return F.silu(y, inplace=inplace)
    return F.gelu(y)


def activation_grad(dz: Tensor, saved: Tensor, activation: str, param: float, from_output: bool = True) -> Tensor:
    """``dz * act'(y)`` from ``saved = z`` (``from_output``; identity, relu, and leaky_relu/elu
    with a positive parameter) or from ``saved = y``."""
    from_output = from_output and _grad_from_output(activation, param)
    if activation == "identity":
        return dz
    if activation == "relu":
        return torch.ops.aten.threshold_backward.default(dz, saved, 0)
    if activation == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward.default(dz, saved, param, from_output)
    if activation == "elu":
        return torch.ops.aten.elu_backward.default(dz, param, 1, 1, from_output, saved)
    if activation == "silu":
        return torch.ops.aten.silu_backward.default(dz, saved)
    return torch.ops.aten.gelu_backward.default(dz, saved)


def activation_inverse(z: Tensor, activation: str, param: float) -> Tensor:
    """``y = act^{-1}(z)`` for the invertible activations (see the module docstring)."""
    if activation == "identity":
        return z
    if activation == "leaky_relu":
        return F.leaky_relu(z, 1.0 / param)
    # elu: clamp so that a saturated output gives a finite (if inexact) y instead of -inf
    ratio = (z / param).clamp_(min=-1.0 + torch.finfo(z.dtype).eps)
    return torch.where(z > 0, z, ratio.log1p_())


def _batch_chunks(x: Tensor) -> list[tuple[int, int]]:
    n = x.shape[0]
    per_sample = max(1, x[0].numel()) if n else 1
    step = max(1, (CHUNK_ELEMENTS if _chunk_elements is None else _chunk_elements) // per_sample)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _lost_channels(weight: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """Indices of the channels whose ``xhat`` cannot be divided out of ``y`` (or ``None``)."""
    if weight is None:
        return None
    scalars = _LOST_SCALARS.get(weight.dtype)
    if scalars is not None and weight.is_cpu and (bias is None or bias.dtype is weight.dtype):
        # one compiled call on the addresses for the usual "none lost" (numba), else numpy: a handful of
        # torch dispatches cost more than the layer's kernel on small inputs
        like, ratio, fl = scalars
        kernels = _cpu_act()
        c = weight.numel()
        if (
            kernels is not None
            and _is_vec(weight, c, weight.dtype)
            and (bias is None or _is_vec(bias, c, weight.dtype))
            and kernels[0].lost_channel_count(like, weight.data_ptr(), 0 if bias is None else bias.data_ptr(), c, ratio,
                                              fl) == 0  # fmt: skip
        ):
            return None
        w = weight.detach()
        wn = w.numpy()
        bn = np.zeros_like(wn) if bias is None else bias.detach().numpy()
        lost_np = np.abs(wn) <= ratio * np.abs(bn) + fl
        return torch.from_numpy(np.flatnonzero(lost_np)) if lost_np.any() else None
    w = weight.detach()
    b = torch.zeros_like(w) if bias is None else bias.detach().to(w.dtype)
    lost = w.abs() <= RECOVERY_RATIO * b.abs() + _RECOVERY_FLOOR[w.dtype]
    if not bool(lost.any()):
        return None
    return lost.nonzero().flatten()


# dtype -> sqrt(smallest normal): the absolute part of the lost-channel test
_RECOVERY_FLOOR = {
    dt: torch.finfo(dt).tiny ** 0.5 for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


# float32/float64 -> (a zero, RECOVERY_RATIO, the floor) as numpy scalars of that dtype (the lost-channel kernel's)
_LOST_SCALARS = {
    dt: (npt(0.0), npt(RECOVERY_RATIO), npt(_RECOVERY_FLOOR[dt]))
    for dt, npt in ((torch.float32, np.float32), (torch.float64, np.float64))
}


def _stats_by_reduce(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batch ``(mean, var)`` from two ``backward_reduce`` passes, allocating nothing full-size.

    ``sum(x * (x - mean)) = M * var + mean * sum(x - mean)``; the last term (zero in exact
    arithmetic) is subtracted, so this is the two-pass variance of the numerics policy.
    """
    backend = backend_for(x)
    sd = ref.stats_dtype(x.dtype)
    m = ref.count_per_channel(x)
    zeros = torch.zeros(x.shape[1], dtype=sd, device=x.device)
    s1, _ = backend.backward_reduce(x, x, zeros)
    mean = s1 / m
    s1b, sxx = backend.backward_reduce(x, x, mean)
    var = (sxx - mean * (s1b - m * mean)) / m
    return mean, var.clamp_(min=0)


def one_call_act(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
    memory_saving: bool,
    inplace: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """``(z, new_running_mean, new_running_var)`` of a plain eager training call on the road of the plain
    batch norm (:func:`bnkit.autograd.one_call`): the cpu backend's one-call plan writes ``y``, the batch
    statistics and the running statistics' update (into new tensors) in one compiled call, and the activation
    runs in place on ``y``. The standard backward is the pair's (``g = dz * act'(y)`` from torch, then the
    plan's backward) on the small kernels' sizes, else one kernel (:func:`_standard_backward`).
    ``None``: :func:`batch_norm_act_forward` (anything :func:`bnkit.autograd.one_call` declines, or ``x`` not
    contiguous ``(N, C, *)``, ``inplace`` without ``memory_saving``, whose error it raises)."""
    if inplace and not memory_saving:
        return None
    if not memory_saving and _grad_from_output(activation, activation_param) and _small_plan(x):
        # the activation's derivative reads off its output, and the input is small enough for the small kernels:
        # plain batch norm's call, then torch's activation in place on y, recorded as such (its backward is
        # torch's, then the plan's): the pair's own work and saves, without a Function's overhead. Larger
        # inputs take the Function below, whose backward reads dz and x once (channel_backward_std) where
        # the pair's reads dz, z, g and x.
        out = bn_ops.one_call(x, running_mean, running_var, weight, bias, True, momentum, eps, False)
        if out is None:
            return None
        return apply_activation(out[0], activation, activation_param, True), out[1], out[2]
    if type(momentum) is not float or not (type(eps) is float and eps > 0.0):
        return None
    ready = bn_ops.one_call_backend(x, running_mean, running_var, weight, bias, eps)
    if ready is None or not x.is_contiguous():
        return None
    cpu, dims, for_backward = ready
    # (a memory-saving backward does not take the plan's: without a graph to record, the plan may pick the
    # small kernels up to their larger forward-only size)
    call = cpu.one_call_train_plan(x, dims, running_mean, running_var, momentum, False,
                                   for_backward and not memory_saving)  # fmt: skip
    if call is None:
        return None
    plan, new_mean, new_var = call
    try:
        z = _act_apply(x, weight, bias, running_mean, running_var, True, eps, activation, float(activation_param),
                       memory_saving, inplace, for_backward, plan)  # fmt: skip
    except bn_ops._Declined:
        return None
    return z, new_mean, new_var


def _small_plan(x: Tensor) -> bool:
    """Whether a recorded training call on ``x`` takes the cpu backend's small kernels
    (:func:`bnkit.kernels.cpu.plan.one_call_path`)."""
    kernels = _cpu_act()
    return kernels is not None and x.dtype in _LIKE and kernels[1].one_call_path(x.dtype, x.numel(), True) == "small"


# --- the optional numba kernels ----------------------------------------------------------
# They take raw addresses (``data_ptr()``), which carry no type or size: every tensor handed to them is
# checked first (``_kernel_data`` for the data, ``_data_like`` for gradients, ``_vec`` for per-channel
# vectors, which converts one of another dtype or layout once with torch) or allocated here.

# (cpu.act module, cpu.plan module) once imported; False when numba is unusable
_CPU_ACT = None


def _kernels_for(x: Tensor, activation: str):
    """:mod:`bnkit.kernels.cpu.act` when it applies to ``x`` (contiguous CPU float32/64), else None.

    By default only for the piecewise-linear activations (identity, relu, leaky_relu), whose
    kernel loops vectorize; elu/silu/gelu call libm per element there, slower than torch's
    vectorized activation ops that the composed path uses.
    """
    if not _kernel_data(x):
        return None
    if not _act_kernels_wanted(x, activation in ("identity", "relu", "leaky_relu")):
        return None
    return _cpu_act_for(x.numel())


def _kernel_data(x: Tensor) -> bool:
    """Whether the act kernels may read ``x`` at its ``data_ptr()``: dense contiguous CPU float32/float64."""
    return x.dtype in _LIKE and x.is_cpu and x.layout is _STRIDED and x.is_contiguous()


def _act_kernels_wanted(x: Tensor, by_default: bool) -> bool:
    """Whether the act kernels run on ``x`` (which they apply to): as :func:`forced_act_road` says, else
    when the kernels are the default for the call (``by_default``) and the ``cpu`` backend runs ``x``."""
    if _act_road is not None:
        return _act_road == "kernels"
    return by_default and backend_for(x).name == "cpu"


def _cpu_act_for(numel: int):
    """:mod:`bnkit.kernels.cpu.act` with numba's thread count set for ``numel`` elements as the cpu
    backend sets it (torch's count; one for small inputs), or None when numba is unusable."""
    kernels = _cpu_act()
    if kernels is None:
        return None
    cpu_act, cpu_plan = kernels
    cpu_plan.threads(numel)
    return cpu_act


def _cpu_act():
    """``(bnkit.kernels.cpu.act, bnkit.kernels.cpu.plan)``, imported once; None when numba is unusable
    (every caller then has an exact composed or numpy path, only slower)."""
    global _CPU_ACT
    if _CPU_ACT is None:
        try:
            from bnkit.kernels.cpu import act as cpu_act
            from bnkit.kernels.cpu import plan as cpu_plan
        except Exception:
            _CPU_ACT = False
        else:
            _CPU_ACT = (cpu_act, cpu_plan)
    return _CPU_ACT or None


def _elu_kernels_for(z: Tensor, activation: str):
    """:mod:`bnkit.kernels.cpu.act` for the memory-saving ELU backward on ``z``, else None.

    Used whenever the kernels may run (contiguous CPU float32/64, the ``cpu`` backend picked unless
    :func:`forced_act_road` says otherwise): ``log1p`` comes from torch in batch chunks and the kernels
    only select and reduce (:func:`bnkit.kernels.cpu.act.row_reduce_ms_elu`).
    """
    if activation != "elu":
        return None
    if not _kernel_data(z):
        return None
    if not _act_kernels_wanted(z, True):
        return None
    return _cpu_act_for(z.numel())


def _elu_log(zc: Tensor, alpha: float, buf: Tensor) -> Tensor:
    """``L = log1p(z / alpha)`` into the start of the flat ``buf``, shaped like ``zc``, with torch's
    vectorized ops (the inverse of ELU where ``z <= 0``; the kernel replaces what the clamp of
    :func:`activation_inverse` would change).
    As few torch ops as possible: on a busy machine each parallel op can wait a scheduler tick."""
    out = buf[: zc.numel()].view(zc.shape)
    if alpha == 1.0:
        return torch.log1p(zc, out=out)
    return torch.div(zc, alpha, out=out).log1p_()


def _channel_group(x: Tensor, tensors: int) -> int:
    """Channels per task of the channel kernels: a group of short rows where the ``cpu`` backend takes
    one for ``tensors`` tensors of ``x``'s size (:func:`bnkit.kernels.cpu.plan.channel_group`), else 1.
    (Called with the act kernels in use: :func:`_cpu_act` has imported the plan module.)"""
    plan = _CPU_ACT[1]
    n, c, s = x.shape[0], x.shape[1], _rows(x)[2]
    return max(1, plan.channel_group(plan.threads(x.numel()), n, c, s, tensors * x.element_size()))


def _channel_tasks(x: Tensor) -> bool:
    """One task per channel (reduce, then write while the channel is in cache) when the channels
    alone keep every thread busy, as :mod:`bnkit.kernels.cpu.backend` decides; else row-parallel passes.
    (Called with the act kernels in use, as :func:`_channel_group`.)"""
    plan = _CPU_ACT[1]
    nt = plan.threads(x.numel())
    return nt == 1 or x.shape[1] >= plan.TASKS_PER_THREAD * nt


def _detached_as(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.detach()
    return t if t.dtype == dtype else t.to(dtype)


def _rows(x: Tensor) -> tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    return n * c, c, x.numel() // (n * c)


def _row_sums(r: int, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    return torch.empty(r, dtype=dtype), torch.empty(r, dtype=dtype)


def _per_channel(rows: Tensor, c: int) -> Tensor:
    return rows.view(-1, c).sum(0)


# data dtype -> a zero of it: the first argument of the act kernels, which picks their specialization
_LIKE = {torch.float32: np.float32(0.0), torch.float64: np.float64(0.0)}
# data dtype -> the clamp of ELU's inverse (``z / alpha`` at least -1 + eps, :func:`activation_inverse`), as
# the kernels take it
_INVERSE_FLOOR = {torch.float32: np.float32(-1.0 + torch.finfo(torch.float32).eps),
                  torch.float64: -1.0 + torch.finfo(torch.float64).eps}  # fmt: skip
# data dtype -> log1p of that clamp, torch's (as activation_inverse computes it), as a scalar of that dtype
_LOG_INVERSE_FLOOR = {
    dt: npt(torch.tensor(_INVERSE_FLOOR[dt], dtype=dt).log1p().item())
    for dt, npt in ((torch.float32, np.float32), (torch.float64, np.float64))
}
_STRIDED = torch.strided


def _is_vec(v: Tensor, c: int, dtype: torch.dtype) -> bool:
    """Whether a kernel may read ``c`` values of ``dtype`` at ``v.data_ptr()``: dense contiguous CPU memory."""
    return v.dtype is dtype and v.is_cpu and v.layout is _STRIDED and v.numel() == c and v.is_contiguous()


def _vec(v: Tensor, c: int, dtype: torch.dtype) -> Tensor:
    """A per-channel vector as ``c`` contiguous CPU values of ``dtype``, which a kernel may read at its
    ``data_ptr()``: ``v`` itself when it is one (the usual case), else a copy converted once with torch.
    Keep the result in a name until the kernel returns: a converted temporary freed before the call would
    leave the kernel an address of freed memory."""
    if _is_vec(v, c, dtype):
        return v
    if v.numel() != c:
        raise ValueError(f"bnkit: a per-channel vector of {c} values was expected, got shape {tuple(v.shape)}")
    return v.detach().to(device="cpu", dtype=dtype).contiguous().view(c)


def _data_like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (a gradient of the shape of the contiguous CPU ``x``) as contiguous CPU memory of ``x``'s dtype and
    shape, which a kernel may read at its ``data_ptr()`` as it reads ``x``'s: ``t`` itself when it is (autograd
    hands the output's dtype and shape), else a copy."""
    if t.dtype is x.dtype and t.shape == x.shape and _kernel_data(t):
        return t
    return torch.empty_like(x, memory_format=torch.contiguous_format).copy_(t)


def _kind_and_param(k, activation: str, param: float, dtype: torch.dtype):
    """The kernel's ``(kind, p)``: piecewise-linear kinds take their slope, as a data-dtype scalar."""
    kind = k.KINDS[activation]
    p = k.slope(kind, param) if kind <= 2 else param
    return kind, (np.float32(p) if dtype == torch.float32 else np.float64(p))


class _BatchNormAct(torch.autograd.Function):
    """``(z, mv)``; ``mv`` the ``(2*C,)`` batch mean and biased variance (empty in eval mode); ``z`` alone
    with ``plan``.

    ``plan`` (training on the cpu backend's one-call road, :func:`one_call_act`): the plain batch norm's
    plan, whose kernel writes ``y`` (over ``x`` with ``inplace``), the statistics and the running
    statistics' update; the activation then runs in place on ``y``. Saved for the backward: ``x`` (standard)
    or ``z`` (memory saving), the parameters as given, and ``mv`` (the running statistics in eval mode);
    :func:`_saved` makes the per-channel vectors from them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps, activation, param,
                memory_saving, inplace, for_backward, plan=None):
        lost = _lost_channels(weight, bias) if memory_saving and for_backward else None
        x_lost = None if lost is None else x.index_select(1, lost)  # before x may be overwritten
        if plan is not None:
            out = get_backend("cpu").one_call_train(plan, x, weight, bias, eps, True, out=x if inplace else None)
            if out is None:
                raise bn_ops._Declined
            y, mv = out
            z = apply_activation(y, activation, param, True)
        else:
            z, mv = _forward_composed(x, weight, bias, running_mean, running_var, training, eps, activation, param,
                                      inplace)
        ctx.training, ctx.eps, ctx.activation, ctx.param = training, eps, activation, param
        ctx.memory_saving, ctx.inplace, ctx.plan = memory_saving, inplace, plan
        ctx.param_dtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else None)
        ctx.has_lost = lost is not None
        if inplace:
            ctx.mark_dirty(x)
        fw_ad = _fwAD._current_level >= 0
        if lost is not None or fw_ad:
            _w, _b, mean, _var, inv = _vectors(x.shape[1], weight, bias, mv, eps)
            if fw_ad:  # a forward-mode AD level is open: jvp may follow (x intact unless inplace)
                ctx.save_for_forward(x, weight, bias, mean, inv)
                ctx.set_materialize_grads(False)  # jvp tells absent tangents (None) from zero ones
        if memory_saving:
            extra = ()
            if lost is not None:
                cs = [1, lost.numel(), *ref.channel_shape(x)[2:]]
                extra = (lost, (x_lost.to(mv.dtype) - mean[lost].view(cs)) * inv[lost].view(cs))
            ctx.save_for_backward(z, weight, bias, mv, *extra)
        else:
            # the input; and the output where act'(y) reads off it and the one-pass kernel backward does not run
            # (its backward is torch's activation backward, then batch norm's): the unfused pair keeps both as
            # well (torch's activation keeps its output), and the next layer usually keeps the output anyway
            kernel = _kernels_for(x, activation) is not None and _channel_tasks(x)
            keep_z = _grad_from_output(activation, param) and not kernel
            ctx.save_for_backward(x, weight, bias, mv, *((z,) if keep_z else ()))
        if plan is not None:
            return z  # (the plan's kernel updated the running statistics: nobody reads mv)
        ctx.mark_non_differentiable(mv)
        return z, mv

    @staticmethod
    def backward(ctx, dz, _dmv=None):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if dz is None:  # (grads not materialized under forward AD) no gradient reached the output
            return (None,) * 13
        if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate
            dx, dw, db = _differentiable_backward(ctx, dz)
        elif bn_ops._wrapped(dz):  # vmap over the backward: no storage, plain ops
            dx, dw, db = _plain_memory_saving_backward(ctx, dz) if ctx.memory_saving else _plain_backward(ctx, dz)
        elif ctx.memory_saving:
            dx, dw, db = _memory_saving_backward(ctx, dz, need_x)
        else:
            dx, dw, db = _standard_backward(ctx, dz, need_x, need_w or need_b)
        dw = bn_ops._to(dw, ctx.param_dtype) if need_w else None
        db = bn_ops._to(db, ctx.param_dtype) if need_b else None
        return (dx if need_x else None), dw, db, *(None,) * 10

    @staticmethod
    def jvp(ctx, tx, tw, tb, *_constants):
        # (running statistics reach the Function without tangents: batch_norm_act_forward applies torch's rule)
        return _act_jvp(ctx, tx, tw, tb), None


# ``Function.apply`` minus its Python wrapper, as :mod:`bnkit.autograd` calls its Functions on the one-call road
# (plain eager: the wrapper would only unwrap dead functorch wrappers, which the backend's check refuses)
_act_apply = super(torch.autograd.Function, _BatchNormAct).apply


def _forward_composed(x, weight, bias, running_mean, running_var, training, eps, activation, param, inplace):
    """``(z, mv)`` of :class:`_BatchNormAct` off the one-call road: the backend's statistics (or the running
    ones), then the eval normalize with the activation (:func:`bnkit.kernels.cpu.act.row_act`, or the
    backend's pass and torch's activation)."""
    sd = ref.stats_dtype(x.dtype)
    c = x.shape[1]
    y = None
    if not training:
        mean, var = running_mean.detach().to(sd), running_var.detach().to(sd)
    elif inplace:
        mean, var = _stats_by_reduce(x)
    else:
        y, mean, var = backend_for(x).forward_train(x, weight, bias, eps)
    mv = torch.cat((mean, var))  # (a copy: the running statistics change after this call)
    if y is not None:
        return apply_activation(y, activation, param, True), mv
    w, b, mean, _var, inv = _vectors(c, weight, bias, mv, eps)
    a = inv * w
    k = _kernels_for(x, activation)
    if k is not None:
        dt = x.dtype
        z = x if inplace else torch.empty_like(x)
        r, _, s = _rows(x)
        mean, a, b = _vec(mean, c, dt), _vec(a, c, dt), _vec(b, c, dt)
        k.row_act(_LIKE[dt], x.data_ptr(), z.data_ptr(), r, c, s, mean.data_ptr(), a.data_ptr(), b.data_ptr(),
                  *_kind_and_param(k, activation, param, dt))  # fmt: skip
        ran_plan("act_forward/rows")
        return z, mv
    if inplace:
        backend = backend_for(x)
        for n0, n1 in _batch_chunks(x):
            xc = x[n0:n1]
            xc.copy_(apply_activation(backend.forward_eval(xc, mean, a, b), activation, param, True))
        return x, mv
    return apply_activation(backend_for(x).forward_eval(x, mean, a, b), activation, param, True), mv


def _vectors(c: int, weight: Tensor | None, bias: Tensor | None, mv: Tensor, eps: float):
    """``(w, b, mean, var, invstd)`` in the statistics dtype (``mv``'s) from the parameters (ones and zeros
    where absent) and the ``(2*C,)`` statistics ``mv``."""
    sd = mv.dtype
    w = torch.ones(c, dtype=sd, device=mv.device) if weight is None else _detached_as(weight, sd)
    b = torch.zeros(c, dtype=sd, device=mv.device) if bias is None else _detached_as(bias, sd)
    mean, var = mv.view(2, c).unbind()
    return w, b, mean, var, ref.invstd(var, eps)


def _saved(ctx):
    """``(t, weight, bias, w, b, mean, var, invstd, extra)``: the saved ``x`` (standard) or ``z`` (memory
    saving), the parameters as given, their statistics-dtype vectors, the statistics, and the lost
    channels' ``(indices, xhat)`` (memory saving, else empty)."""
    t, weight, bias, mv, *extra = ctx.saved_tensors
    return (t, weight, bias, *_vectors(t.shape[1], weight, bias, mv, ctx.eps), extra)


def _act_jvp(ctx, tx, tw, tb) -> Tensor | None:
    """Tangent of ``z = act(y)``: ``act'(y) * dy``, ``dy`` the batch norm's tangent (``bnkit.reference.jvp_train``
    or ``jvp_eval``), ``y`` rebuilt from the saved input in plain ops (tangents may be functorch-batched)."""
    if ctx.inplace:
        raise RuntimeError(
            "BatchNormAct with inplace=True has no forward-mode AD (its input is overwritten); use inplace=False"
        )
    x, weight, bias, mean, inv = ctx.saved_tensors
    jvp = ref.jvp_train if ctx.training else ref.jvp_eval
    dy = jvp(tx, tw, tb, x, mean, inv, weight)
    if dy is None:
        return None
    y = ref.normalize(x, mean, inv, weight, bias)
    return activation_grad(dy, y, ctx.activation, ctx.param, from_output=False)


def _differentiable_backward(ctx, dz: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backward in differentiable torch ops (double backward, e.g. gradient penalties).

    The forward is recomputed from the saved input with the reference's formulas (batch
    statistics as functions of ``x`` in training, the running statistics as constants in eval),
    and autograd differentiates it with ``create_graph=True``. Memory-saving mode keeps only the
    output, so it has no such path and says so.
    """
    if ctx.memory_saving:
        raise RuntimeError(
            "BatchNormAct with memory_saving=True has no double backward (it keeps only its output); "
            "use memory_saving=False to differentiate its gradients (create_graph=True)"
        )
    x, weight, bias, _w, _b, mean, _var, inv, _extra = _saved(ctx)
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    with torch.enable_grad():
        if ctx.training:
            m, v = ref.batch_stats(x)
            inv = ref.invstd(v, ctx.eps)
        else:
            m = mean
        z = apply_activation(ref.normalize(x, m, inv, weight, bias), ctx.activation, ctx.param, False)
        grads = iter(torch.autograd.grad(z, inputs, dz, create_graph=True))
    dx, dw, db = (next(grads) if t is not None and t.requires_grad else None for t in (x, weight, bias))
    return dx, dw, db


def _plain_backward(ctx, dz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The standard backward in plain torch ops (``dz`` may be functorch-batched): ``g = dz * act'(y)``, ``y``
    rebuilt from the saved input, then :func:`bnkit.reference.backward_train` / ``backward_eval`` of ``g``."""
    x, weight, bias, _w, _b, mean, _var, inv, _extra = _saved(ctx)
    g = activation_grad(dz, ref.normalize(x, mean, inv, weight, bias), ctx.activation, ctx.param, from_output=False)
    bwd = ref.backward_train if ctx.training else ref.backward_eval
    return bwd(g, x, mean, inv, weight)


def _plain_memory_saving_backward(ctx, dz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The memory-saving backward in plain torch ops (``dz`` may be functorch-batched): ``xhat = (y - b) / w``
    with ``y = act^{-1}(z)``, the saved ``xhat`` of the lost channels in their place, then batch norm's
    backward of ``g = dz * act'(y)`` with ``dx = w * invstd * (g - mean(g) - xhat * mean(g * xhat))``
    (training) or ``w * invstd * g`` (eval)."""
    z, _weight, _bias, w, b, _mean, _var, inv, extra = _saved(ctx)
    shape, dims = ref.channel_shape(z), ref.reduction_dims(z)
    sd = w.dtype
    y = activation_inverse(z.to(sd), ctx.activation, ctx.param)
    xhat = (y - b.view(shape)) / w.view(shape)
    if ctx.has_lost:
        xhat = xhat.index_copy(1, extra[0], extra[1].to(sd))
    g = activation_grad(dz.to(sd), z.to(sd), ctx.activation, ctx.param)
    a = (w * inv).view(shape)
    if ctx.training:
        dx = a * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
    else:
        dx = a * g
    return dx.to(z.dtype), (g * xhat).sum(dims), g.sum(dims)


def _standard_backward(ctx, dz: Tensor, need_x: bool, need_p: bool):
    """BN backward of ``g = dz * act'(y)``: ``g`` from the saved output in one torch op (or from ``y`` rebuilt
    from the saved input, for silu, gelu and non-positive slopes), then the batch norm's own backward (the
    forward's one-call plan when it had one: it needs no per-channel vectors made here)."""
    saved = ctx.saved_tensors
    x, weight, mv = saved[0], saved[1], saved[3]
    dz = bn_ops._like(dz, x)
    k = _kernels_for(x, ctx.activation)
    if k is not None and _channel_tasks(x):
        return _standard_backward_channels(ctx, k, dz, need_x)
    g = activation_grad(dz, saved[4], ctx.activation, ctx.param) if len(saved) > 4 else None
    if g is not None and ctx.plan is not None:
        grads = get_backend("cpu").one_call_train_backward(ctx.plan, g, x, weight, mv, ctx.eps, need_x)
        if grads is not None:
            return grads
    _x, _weight, _bias, w, b, mean, var, inv, _extra = _saved(ctx)
    if g is None:
        y = backend_for(x).forward_eval(x, mean, inv * w, b)
        g = activation_grad(dz, y, ctx.activation, ctx.param, from_output=False)
        del y
    del dz
    if not ctx.training:
        return bn_ops.backward_eval(g, x, mean, var, weight, ctx.eps, need_x, need_p)
    return bn_ops.backward_train(g, x, weight, mean, inv, need_x, need_p)


def _standard_backward_channels(ctx, k, dz: Tensor, need_x: bool):
    """:func:`_standard_backward` in one kernel (:func:`bnkit.kernels.cpu.act.channel_backward_std`): per group
    of channels, ``g`` from ``dz`` and ``x`` reduced, then ``dx`` written while the channels are in cache."""
    x, _weight, _bias, w, b, mean, _var, inv, _extra = _saved(ctx)
    n, c, s = x.shape[0], x.shape[1], _rows(x)[2]
    dt = x.dtype
    a = inv * w
    dz = _data_like(dz, x)
    mean, a, b, w, inv = _vec(mean, c, dt), _vec(a, c, dt), _vec(b, c, dt), _vec(w, c, dt), _vec(inv, c, dt)
    sum_g, sum_g_xmu = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    dx = torch.empty_like(x) if need_x else x  # (not written without need_x)
    k.channel_backward_std(_LIKE[dt], dz.data_ptr(), x.data_ptr(), n, c, s, _channel_group(x, 2), mean.data_ptr(),
                           a.data_ptr(), b.data_ptr(), *_kind_and_param(k, ctx.activation, ctx.param, dt),
                           w.data_ptr(), inv.data_ptr(), float(n * s), bool(ctx.training), bool(need_x),
                           sum_g.data_ptr(), sum_g_xmu.data_ptr(), dx.data_ptr())  # fmt: skip
    ran_plan("act_backward/channels")
    sum_g_xhat = (sum_g_xmu * inv.double()).to(w.dtype)
    return (dx if need_x else None), sum_g_xhat, sum_g.to(w.dtype)


def _memory_saving_backward(ctx, dz: Tensor, need_x: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """Rebuild ``y`` and ``g`` from ``z`` (kernels, or torch ops chunk by chunk); see the module docstring."""
    act, param = ctx.activation, ctx.param
    ek = _elu_kernels_for(ctx.saved_tensors[0], act)
    k = None if ek is not None else _kernels_for(ctx.saved_tensors[0], act)
    if k is not None and not ctx.has_lost and _channel_tasks(ctx.saved_tensors[0]):
        # one task per channel: reduce, then dx while the channel is in cache (float64 coefficients, made in
        # the kernel from the saved vectors: torch ops on them cost more than the kernel on small layers)
        z, weight, bias, mv = ctx.saved_tensors
        n, c = z.shape[0], z.shape[1]
        s = z.numel() // (n * c)
        dt = z.dtype
        dz = _data_like(dz, z)
        # absent parameters: address 0, the kernel's ones and zeros; the variance is the second half of mv
        wv = None if weight is None else _vec(weight, c, dt)
        bv = None if bias is None else _vec(bias, c, dt)
        mv = _vec(mv, 2 * c, dt)
        dw, db = torch.empty(c, dtype=dt), torch.empty(c, dtype=dt)
        dx = torch.empty_like(z) if need_x else z  # (not written without need_x)
        k.channel_backward_ms(_LIKE[dt], dz.data_ptr(), z.data_ptr(), n, c, s, _channel_group(z, 2),
                              0 if wv is None else wv.data_ptr(), 0 if bv is None else bv.data_ptr(),
                              mv.data_ptr() + c * z.element_size(), float(ctx.eps),
                              *_kind_and_param(k, act, param, dt), _INVERSE_FLOOR[dt], float(n * s),
                              bool(ctx.training), bool(need_x), dw.data_ptr(), db.data_ptr(),
                              dx.data_ptr())  # fmt: skip
        ran_plan("act_backward/channels_ms")
        return (dx if need_x else None), dw, db
    z, _weight, _bias, w, b, _mean, _var, inv, extra = _saved(ctx)
    lost, xhat_lost = extra if ctx.has_lost else (None, None)
    m = ref.count_per_channel(z)
    dims = ref.reduction_dims(z)
    if k is not None:
        r, c, s = _rows(z)
        dt = z.dtype
        dz = _data_like(dz, z)
        bk = _vec(b, c, dt)
        row_g, row_gy = _row_sums(r)
        kargs = (_LIKE[dt], dz.data_ptr(), z.data_ptr(), r, c, s, bk.data_ptr(), *_kind_and_param(k, act, param, dt),
                 _INVERSE_FLOOR[dt])  # fmt: skip
        k.row_reduce_ms(*kargs, row_g.data_ptr(), row_gy.data_ptr())
        ran_plan("act_backward/rows_ms")
        sum_g, sum_g_ymb = _per_channel(row_g, c).to(w.dtype), _per_channel(row_gy, c).to(w.dtype)
        chunks = [(0, z.shape[0])]
    elif ek is not None:
        # ELU: torch's log1p into dx (the buffer it needs anyway) or, without dx, a chunk-sized buffer;
        # the reducing kernel turns it into y in place, the writing kernel reads y back
        dt = z.dtype
        c, s = z.shape[1], _rows(z)[2]
        dz = _data_like(dz, z)
        bk = _vec(b, c, dt)
        alpha = _kind_and_param(ek, act, param, dt)[1]
        chunks = [(0, z.shape[0])] if need_x else _batch_chunks(z)
        most = max(n1 - n0 for n0, n1 in chunks)
        dx = torch.empty_like(z) if need_x else None
        y_buf = dx.view(-1) if need_x else torch.empty(most * c * s, dtype=dt)
        row_g, row_gy = _row_sums(most * c)
        sum_g64, sum_gy64 = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        sample = c * s * z.element_size()  # bytes per sample of dz and z: a chunk's address is an offset
        for n0, n1 in chunks:
            zc, r = z[n0:n1], (n1 - n0) * c
            yc = _elu_log(zc, param, y_buf)  # (at the start of y_buf, which holds most * c * s >= r * s values)
            ek.row_reduce_ms_elu(_LIKE[dt], dz.data_ptr() + n0 * sample, z.data_ptr() + n0 * sample, yc.data_ptr(),
                                 r, c, s, bk.data_ptr(), alpha, _INVERSE_FLOOR[dt], _LOG_INVERSE_FLOOR[dt],
                                 row_g.data_ptr(), row_gy.data_ptr())  # fmt: skip
            sum_g64 += _per_channel(row_g[:r], c)
            sum_gy64 += _per_channel(row_gy[:r], c)
        sum_g, sum_g_ymb = sum_g64.to(w.dtype), sum_gy64.to(w.dtype)
        ran_plan("act_backward/rows_ms_elu")
    else:
        dz = bn_ops._like(dz, z)
        backend = backend_for(z)
        chunks = _batch_chunks(z)
        sum_g = torch.zeros_like(w)
        sum_g_ymb = torch.zeros_like(w)  # sum(g * (y - b))
        for n0, n1 in chunks:
            zc = z[n0:n1]
            g = activation_grad(dz[n0:n1], zc, act, param)
            s_g, s_gy = backend.backward_reduce(g, activation_inverse(zc, act, param), b)
            sum_g += s_g
            sum_g_ymb += s_gy
    sum_g_xhat = sum_g_ymb / torch.where(w == 0, torch.ones_like(w), w)
    if lost is not None:
        # the channels whose xhat is not in z: their own g, from small gathers
        g_lost = activation_grad(dz.index_select(1, lost), z.index_select(1, lost), act, param).to(w.dtype)
        sum_g_xhat[lost] = (g_lost * xhat_lost).sum(dims)
    if not need_x:
        return None, sum_g_xhat, sum_g

    a = w * inv
    if ctx.training:
        c1, c2 = sum_g / m, sum_g_xhat / m
        kk, cc = -inv * c2, -a * c1
    else:
        c1 = c2 = kk = cc = torch.zeros_like(w)
    if lost is not None:
        kk = kk.clone()
        kk[lost] = 0
    if k is not None or ek is not None:
        ak, kk, cc = _vec(a, c, dt), _vec(kk, c, dt), _vec(cc, c, dt)
    if k is not None:
        dx = torch.empty_like(z)
        k.row_input_ms(*kargs, ak.data_ptr(), kk.data_ptr(), cc.data_ptr(), dx.data_ptr())
    elif ek is not None:
        # dx holds y (see above); each element is read before it is overwritten
        ek.row_input_ms_elu(_LIKE[dt], dz.data_ptr(), z.data_ptr(), dx.data_ptr(), z.shape[0] * c, c, s,
                            bk.data_ptr(), alpha, ak.data_ptr(), kk.data_ptr(), cc.data_ptr(),
                            dx.data_ptr())  # fmt: skip
    else:
        dx = torch.empty_like(z)
        for n0, n1 in chunks:
            zc = z[n0:n1]
            g = activation_grad(dz[n0:n1], zc, act, param)
            dx[n0:n1].copy_(backend.backward_input(g, activation_inverse(zc, act, param), b, a, kk, cc))
    if lost is not None:
        cs = (1, lost.numel()) + tuple(ref.channel_shape(z)[2:])
        fix = a[lost].view(cs) * (g_lost - c1[lost].view(cs) - xhat_lost * c2[lost].view(cs))
        dx.index_copy_(1, lost, fix.to(dx.dtype))
    return dx, sum_g_xhat, sum_g


def batch_norm_act_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    activation: str,
    activation_param: float,
    memory_saving: bool,
    inplace: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(z, mean, var)``: fused batch norm + activation on an (N, C, *) input.

    ``training`` normalizes with the batch statistics (returned, var biased); otherwise
    with ``running_mean``/``running_var`` (and ``mean``/``var`` are ``None``). ``inplace``
    (memory-saving only) writes ``z`` into ``x`` and returns ``x``.
    """
    check_activation(activation, activation_param, memory_saving)
    if inplace and not memory_saving:
        raise ValueError("inplace=True needs memory_saving=True: the standard backward reads the input")
    # Whether autograd records this call: without a backward the memory-saving mode needs no
    # lost-channel side tensor (inference skips that check)
    for_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if _fwAD._current_level >= 0 and running_mean is not None and running_var is not None:
        if training:  # they only receive the update: their tangents play no part (torch's rule)
            running_mean, running_var = _fwAD.unpack_dual(running_mean).primal, _fwAD.unpack_dual(running_var).primal
        else:
            running_mean, running_var = bn_ops.constant_running_stats(x, running_mean, running_var, weight, bias)
    z, mv = _BatchNormAct.apply(
        x, weight, bias, running_mean, running_var, training, eps, activation, float(activation_param),
        memory_saving, inplace, for_backward,
    )
    if not training:
        return z, None, None
    mean, var = mv.view(2, -1).unbind()
    return z, mean, var
