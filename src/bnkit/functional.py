"""Public functional API: ``batch_norm`` (torch's signature) and its pure twin.

* :func:`batch_norm` has exactly the signature, semantics and errors of
  torch's ``F.batch_norm``: in training mode it writes the new running
  statistics into ``running_mean``/``running_var`` in place.
* :func:`batch_norm_pure` computes the same thing and *returns*
  ``(output, new_running_mean, new_running_var)`` without mutating anything, so it can
  run under ``torch.func`` transforms (``functional_call``, ``vmap``, ``jacrev``).

Where a tracer or transform records the call (``torch.func``, ``torch.jit.trace``, ONNX export,
``torch.compile``; :func:`bnkit.autograd.needs_plain_ops`), both compute with
:func:`bnkit.reference.batch_norm` (plain differentiable torch ops) instead of the custom ops or
kernels. Results are the same to rounding; see ``docs/semantics.md``.

Both accept two keyword-only extensions that default to torch's behaviour:
``channel_dim`` (where the channels are, default 1) and ``mask`` (elements that count
towards the statistics; see :mod:`bnkit.masked`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad as _fwAD
from torch.autograd.graph import increment_version

from bnkit import autograd
from bnkit import reference as ref
from bnkit.kernels.base import is_running_vector

__all__ = ["batch_norm", "batch_norm_pure", "check_batch_norm_args"]


def _verify_batch_size(size: torch.Size) -> None:
    # torch's wording and rule (``F._verify_batch_size``): more than one value per channel
    # in training. ``size[0]`` of a 0-D input raises IndexError, exactly as torch does.
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _check_eps(eps: float, training: bool) -> None:
    # torch >= 2.13 rejects a non-positive eps in training and a negative one in eval.
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_batch_norm_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
) -> None:
    """Raise torch's error, in torch's order, for arguments ``F.batch_norm`` rejects.

    ``input`` must already have its channels in dim 1 and be non-empty (torch returns
    an empty batch before checking anything else, see :func:`batch_norm_pure`). The
    order mirrors ATen's ``_batch_norm_impl_index`` and CPU kernels: channel counts
    (running_mean, running_var, weight, bias) and the running statistics' presence in
    eval, then rank, dtype and parameter dtypes (rank first in training, last in eval).
    """
    if _plain_args(input, running_mean, running_var, weight, bias, training):
        return
    # ATen reads the channel count as 0 for inputs of fewer than 2 dims.
    c = input.shape[1] if input.dim() >= 2 else 0
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            _check_numel(name, c, t)
        elif not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_numel(name, c, t)
    # ATen's training kernel checks the rank first; its eval kernel checks dtypes first.
    if training:
        _check_rank(input)
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dim() == 0:
        # ATen's eval kernel sizes a buffer with dim() - 2 and overflows; say what it says.
        raise RuntimeError(
            "SmallVector unable to grow. Requested capacity (18446744073709551615) is larger than maximum value "
            "for size type (4294967295)"
        )
    if not input.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for \'{_dtype_name(input.dtype)}\'')
    mixed = _check_dtypes(input, weight, bias, running_mean, running_var)
    _check_rank(input)
    _check_same_dtypes(input, mixed, weight, bias, running_mean, running_var)
    for t in (running_mean, running_var):
        if t is not None and t.dim() != 1:
            raise RuntimeError(f"TensorAccessor expected 1 dims but tensor has {t.dim()}")


_PLAIN_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _plain_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
) -> bool:
    """Whether the arguments are the everyday valid case, in which every check below passes.

    A floating input of rank >= 2, running statistics both given (or both absent in training)
    as 1-d tensors of C values, weight and bias absent or of C values, all of the input's dtype.
    A few attribute reads, so a call on a small tensor does not pay for the full checks;
    anything else (mixed precision included) takes them.
    """
    try:
        if input.dim() < 2 or (running_mean is None) != (running_var is None):
            return False
        dtype = input.dtype
        if dtype not in _PLAIN_DTYPES:
            return False
        c = input.shape[1]
        if running_mean is None:
            if not training:
                return False
        elif (
            running_mean.dim() != 1 or running_mean.shape[0] != c or running_mean.dtype != dtype
            or running_var.dim() != 1 or running_var.shape[0] != c or running_var.dtype != dtype
        ):
            return False
        for t in (weight, bias):
            if t is not None and (t.numel() != c or t.dtype != dtype):
                return False
        return True
    except (AttributeError, TypeError):  # not tensors: the full checks raise torch's error
        return False


def _check_rank(input: Tensor) -> None:
    if input.dim() < 2:
        d = max(input.dim(), 1)
        raise IndexError(f"Dimension out of range (expected to be in range of [{-d}, {d - 1}], but got 1)")


def _check_numel(name: str, c: int, t: Tensor) -> None:
    if t.numel() != c:
        raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")


# ATen's ScalarType names, as torch's error messages spell them.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
    torch.complex32: "ComplexHalf",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check_dtypes(input: Tensor, *params: Tensor | None) -> bool:
    """torch's CPU rule (ATen ``mixed_type.h``), parameters in the order weight, bias, mean, var.

    The first defined parameter decides: if its dtype differs from the input's, the call
    is "mixed" and every parameter must be float32 with a float16/bfloat16 input
    (checked here); otherwise every parameter must have the input's dtype (checked by
    :func:`_check_same_dtypes`, later, where ATen's kernel reads the data). Returns
    whether the call is mixed.
    """
    defined = [t for t in params if t is not None]
    mixed = bool(defined) and defined[0].dtype != input.dtype
    if mixed and input.device.type == "cpu":
        if any(t.dtype != torch.float32 for t in defined):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if input.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
    return mixed


def _check_same_dtypes(input: Tensor, mixed: bool, *params: Tensor | None) -> None:
    defined = [t for t in params if t is not None]
    if mixed and input.dtype in (torch.float16, torch.bfloat16) and all(t.dtype == torch.float32 for t in defined):
        return  # mixed precision: half/bfloat16 input, float32 parameters
    for t in defined:
        if t.dtype != input.dtype:
            raise RuntimeError(f"expected scalar type {_dtype_name(input.dtype)} but found {_dtype_name(t.dtype)}")


def _empty_batch(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # torch's rule for an empty input (ATen ``_batch_norm_impl_index``), checked before
    # anything else: a copy (never a view) scaled by weight[0] and shifted by bias[0] so
    # gradients reach the parameters; running statistics untouched.
    y = x.clone()
    if weight is not None:
        y = y * weight.select(0, 0)
    if bias is not None:
        y = y + bias.select(0, 0)
    return y, running_mean, running_var


def _check_channel_dim(input: Tensor, channel_dim: int) -> int:
    """``channel_dim`` as a non-negative dim of ``input``; torch's IndexError when out of range."""
    if isinstance(channel_dim, bool) or not hasattr(type(channel_dim), "__index__"):
        raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
    channel_dim = channel_dim.__index__()
    ndim = input.dim()
    if not -ndim <= channel_dim < ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], "
                         f"but got {channel_dim}): channel_dim for an input of shape {tuple(input.shape)}")
    return channel_dim % ndim


def to_channels_first(input: Tensor, channel_dim: int) -> tuple[Tensor, int]:
    """``input`` with its channels in dim 1 (a view, never a copy), and ``channel_dim`` checked.

    (N, L, C) becomes an (N, C, L) view of channels-last memory, the fast kernels' layout.
    """
    if channel_dim == 1 and type(channel_dim) is int:
        return input, 1
    channel_dim = _check_channel_dim(input, channel_dim)
    return input.movedim(channel_dim, 1), channel_dim


def from_channels_first(y: Tensor, channel_dim: int) -> Tensor:
    """Undo :func:`to_channels_first` on an output."""
    return y if channel_dim == 1 else y.movedim(1, channel_dim)


def check_pure_args(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor | None,
    eps: float,
) -> None:
    """Every check of :func:`batch_norm_pure` (and its variants), in torch's order; channels in dim 1.

    An empty ``x`` skips the argument checks, as torch returns before making them.
    """
    if training:
        _verify_batch_size(x.size())
        if momentum is None:
            raise TypeError(
                "momentum must be a float or a tensor in training mode, got None "
                "(the modules turn momentum=None into 1 / num_batches_tracked)"
            )
    _check_eps(eps, training)
    if x.numel():
        check_batch_norm_args(x, running_mean, running_var, weight, bias, training)


def updated_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | Tensor,
) -> tuple[Tensor | None, Tensor | None]:
    """New running statistics after a batch with ``(mean, biased var)`` over ``count`` values.

    Each one given is updated (:func:`bnkit.reference.update_running_stats`); one that is
    ``None`` stays ``None``. The batch statistics are detached: running statistics are
    buffers and carry no gradient.
    """
    if running_mean is None and running_var is None:
        return None, None
    if _fwAD._current_level >= 0:
        # buffers: their forward-mode tangents play no part in the update (torch's rule)
        running_mean, running_var = _primal(running_mean), _primal(running_var)
    if (
        type(momentum) is float
        and running_mean is not None
        and running_var is not None
        and running_mean.dtype == running_var.dtype == mean.dtype == var.dtype
        and running_mean.is_cpu
        and not (running_mean.requires_grad or running_var.requires_grad)
        and autograd._eager(running_mean)
    ):
        # The everyday case, with the numbers of reference.update_running_stats (whose dtype
        # conversions are no-ops here): the Python scalars come as cached 0-d tensors of the
        # statistics dtype, which torch rounds to exactly as it rounds a Python scalar, without
        # the cost of wrapping a new scalar per op (several microseconds on a small vector).
        dt = mean.dtype
        scalar = autograd.cached_scalar
        ratio, keep, take = scalar(count / (count - 1), dt), scalar(1 - momentum, dt), scalar(momentum, dt)
        batch_var = var.detach() * ratio
        new_mean = running_mean * keep + mean.detach() * take
        new_var = running_var * keep + batch_var * take
        return new_mean, new_var
    rm = running_mean if running_mean is not None else mean.detach()
    rv = running_var if running_var is not None else var.detach()
    new_mean, new_var = ref.update_running_stats(rm, rv, mean.detach(), var.detach(), count, momentum)
    return (new_mean if running_mean is not None else None), (new_var if running_var is not None else None)


# torch's batch norm allocates its output in the input's suggested memory format: channels-last for a 4-d
# (5-d) channels-last input, contiguous for everything else. bnkit's kernels write the input's own layout,
# which differs for an (N, C, L) view of (N, L, C) memory, a transposed (N, C) input and other permuted
# strides, where code written for torch may then `.view()` the output.
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def as_torch_layout(y: Tensor) -> Tensor:
    """``y`` in the memory format torch's batch norm gives its output (a copy only when ``y``'s differs)."""
    if y.is_contiguous():
        return y
    fmt = _CHANNELS_LAST.get(y.dim())
    if fmt is not None and y.is_contiguous(memory_format=fmt):
        return y
    return y.contiguous()


def batch_norm_pure(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    channel_dim: int = 1,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Batch norm that returns ``(output, new_running_mean, new_running_var)``.

    Nothing is mutated. In training mode the new running statistics are
    ``(1 - momentum) * running + momentum * batch`` (unbiased batch variance); in eval
    mode, or when ``running_mean``/``running_var`` is ``None``, they are returned as
    given. ``momentum`` may be a tensor (e.g. ``1 / num_batches_tracked`` for the
    cumulative average), which keeps ``torch.compile`` graphs free of host syncs.
    """
    if mask is None and channel_dim == 1 and type(channel_dim) is int:
        out = autograd.one_call(input, running_mean, running_var, weight, bias, training, momentum, eps, False)
        if out is not None:
            return as_torch_layout(out[0]), out[1], out[2]
        y, new_mean, new_var = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                           None, 1, False)  # fmt: skip
        return as_torch_layout(y), new_mean, new_var
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, mask, channel_dim,
                       False)


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    mask: Tensor | None,
    channel_dim: int,
    inplace: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`batch_norm_pure`, past the one-call road (:func:`bnkit.autograd.one_call`). With ``inplace``
    a training call may write the new running statistics into their buffers itself (then it returns the
    buffers, and :func:`write_running_stats` has nothing to copy)."""
    x, channel_dim = to_channels_first(input, channel_dim)
    check_pure_args(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if x.numel() == 0:
        y, new_mean, new_var = _empty_batch(x, running_mean, running_var, weight, bias)
        return from_channels_first(y, channel_dim), new_mean, new_var
    if mask is not None:
        from bnkit.masked import masked_batch_norm_pure

        y, new_mean, new_var = masked_batch_norm_pure(
            x, running_mean, running_var, weight, bias, training, momentum, eps, mask
        )
    elif autograd.needs_plain_ops():
        y, new_mean, new_var = ref.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    elif not training:
        y = autograd.evaluate(x, running_mean, running_var, weight, bias, eps)
        new_mean, new_var = running_mean, running_var
    else:
        running = _compiled_update(x, running_mean, running_var, momentum, inplace)
        out = None if running is None else autograd.train_updating(x, weight, bias, eps, running)
        if out is not None:
            y = out[0]
            new_mean, new_var = running[2], running[3]
            if new_mean is running_mean:
                # written through raw memory: tell autograd, as copy_ would
                increment_version((running_mean, running_var))
        else:
            y, mean, var = autograd.train(x, weight, bias, eps)
            new_mean, new_var = updated_running_stats(
                running_mean, running_var, mean, var, ref.count_per_channel(x), momentum
            )
    return from_channels_first(y, channel_dim), new_mean, new_var


def _compiled_update(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float | Tensor, inplace: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, float] | None:
    """The ``running`` argument of :func:`bnkit.autograd.train_updating` when the running statistics
    can be updated inside the ``cpu`` backend's compiled call, else ``None`` (torch ops update them).

    That takes two plain contiguous CPU vectors of the statistics dtype that need no gradient and a
    float momentum; the update goes to the buffers themselves with ``inplace``, else to new vectors.
    In place, per channel, the mean is written before the variance is read, as torch's kernel does:
    one buffer passed as both gets torch's numbers (the torch ops read both first).
    """
    if (
        type(momentum) is not float
        or type(running_mean) is not Tensor
        or type(running_var) is not Tensor
        or not x.is_cpu
    ):
        return None
    sd, c = ref.stats_dtype(x.dtype), x.shape[1]
    if not (is_running_vector(running_mean, c, sd) and is_running_vector(running_var, c, sd)):
        return None
    if inplace:
        return running_mean, running_var, running_mean, running_var, momentum
    return running_mean, running_var, torch.empty_like(running_mean), torch.empty_like(running_var), momentum


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    channel_dim: int = 1,
) -> Tensor:
    """Drop-in for torch's ``F.batch_norm``, computed by bnkit.

    In training mode with running statistics given, they are updated in place:
    ``running = (1 - momentum) * running + momentum * batch_stat`` with the *unbiased*
    batch variance, while the output is normalized with the *biased* one.
    """
    if momentum is None:
        # torch's argument parser rejects None after F.batch_norm's own Python checks.
        if training:
            _verify_batch_size(input.size())
        _check_eps(eps, training)
        raise TypeError("batch_norm(): argument 'momentum' (position 7) must be float, not NoneType")
    plain = mask is None and channel_dim == 1 and type(channel_dim) is int
    if plain:
        out = autograd.one_call(input, running_mean, running_var, weight, bias, training, momentum, eps, True)
        if out is not None:  # running statistics already updated in place
            return as_torch_layout(out[0])
    y, new_mean, new_var = _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, mask, channel_dim, True
    )
    if training:
        write_running_stats(running_mean, running_var, new_mean, new_var)
    return as_torch_layout(y) if plain else y


def _primal(t: Tensor | None) -> Tensor | None:
    # t without its forward-mode tangent (a view of the same memory); t itself when it has none
    if t is None:
        return None
    unpacked = _fwAD.unpack_dual(t)
    return t if unpacked.tangent is None else unpacked.primal


def write_running_stats(
    running_mean: Tensor | None, running_var: Tensor | None, new_mean: Tensor | None, new_var: Tensor | None
) -> None:
    """Copy new running statistics into their buffers: the one place bnkit mutates them."""
    if _fwAD._current_level >= 0 and not (new_mean is running_mean and new_var is running_var):
        # write the values only: a buffer's tangent stays as it was, as in torch
        running_mean, running_var = _primal(running_mean), _primal(running_var)
    if (
        running_mean is not None and running_var is not None and new_mean is not None and new_var is not None
        and not (running_mean.requires_grad or running_var.requires_grad
                 or new_mean.requires_grad or new_var.requires_grad)
        and autograd._eager(running_mean)
    ):
        # eager, and nothing here is tracked by autograd: copy without entering no_grad (the same writes)
        if new_mean is not running_mean:
            running_mean.copy_(new_mean)
        if new_var is not running_var:
            running_var.copy_(new_var)
        return
    with torch.no_grad():
        if running_mean is not None and new_mean is not None and new_mean is not running_mean:
            running_mean.copy_(new_mean)
        if running_var is not None and new_var is not None and new_var is not running_var:
            running_var.copy_(new_var)

# Variants (bnkit.functional_variants), re-exported here; imported last because they build on the above.
from bnkit.functional_variants import (  # noqa: E402
    batch_norm_act,
    batch_norm_act_pure,
    batch_renorm,
    batch_renorm_pure,
    frozen_batch_norm,
    ghost_batch_norm,
    ghost_batch_norm_pure,
)

__all__ += [
    "batch_norm_act",
    "batch_norm_act_pure",
    "batch_renorm",
    "batch_renorm_pure",
    "frozen_batch_norm",
    "ghost_batch_norm",
    "ghost_batch_norm_pure",
]
