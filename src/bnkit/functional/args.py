"""Argument checks of the functional batch norms, with torch's errors in torch's order.

Channels are in dim 1 here (:mod:`bnkit.functional.layout` moves them there first). The
everyday valid call takes a few attribute reads (:func:`_plain_args`); anything else gets the
full checks, which mirror ATen's.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_batch_norm_args", "check_pure_args"]


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
    """Every check of :func:`bnkit.functional.batch_norm_pure` (and its variants), in torch's order; channels in dim 1.

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
