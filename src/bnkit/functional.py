"""Public functional API: ``batch_norm`` (torch's signature) and its pure twin.

* :func:`batch_norm` has exactly the signature, semantics and errors of
  ``torch.nn.functional.batch_norm``: in training mode it writes the new running
  statistics into ``running_mean``/``running_var`` in place.
* :func:`batch_norm_pure` computes the same thing and *returns*
  ``(output, new_running_mean, new_running_var)`` without mutating anything, so it can
  run under ``torch.func`` transforms (``functional_call``, ``vmap``, ``jacrev``).

Both accept two keyword-only extensions that default to torch's behaviour:
``channel_dim`` (where the channels are, default 1) and ``mask`` (elements that count
towards the statistics; see :mod:`bnkit.masked`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnkit import autograd
from bnkit import reference as ref

__all__ = ["batch_norm", "batch_norm_pure", "check_batch_norm_args"]


def _verify_batch_size(size: torch.Size) -> None:
    # torch's wording and rule: more than one value per channel in training
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def check_batch_norm_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
) -> None:
    """Raise torch's errors for arguments ``torch.nn.functional.batch_norm`` rejects.

    ``input`` must already have its channels in dim 1.
    """
    if input.dim() < 2:
        raise ValueError(f"batch_norm expects an input with at least 2 dims (N, C, ...), got {input.dim()}D input")
    if not input.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for \'{_dtype_name(input.dtype)}\'')
    if training:
        _verify_batch_size(input.size())
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
    if not training:
        if running_mean is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")
        if running_var is None:
            raise RuntimeError("running_var must be defined in evaluation mode")
    _check_dtypes(input, running_mean, running_var, weight, bias)


def _dtype_name(dtype: torch.dtype) -> str:
    names = {torch.int32: "Int", torch.int64: "Long", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
             torch.bool: "Bool"}
    return names.get(dtype, str(dtype).replace("torch.", ""))


def _check_dtypes(input: Tensor, *others: Tensor | None) -> None:
    # torch's rule: parameters and running stats share the input's dtype, except that
    # float16/bfloat16 inputs may come with float32 ones (all of them, not a mix).
    dtypes = {t.dtype for t in others if t is not None}
    if not dtypes or dtypes == {input.dtype}:
        return
    if input.dtype in (torch.float16, torch.bfloat16) and input.device.type == "cpu":
        if dtypes == {torch.float32}:
            return
        if torch.float32 in dtypes:
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
    if input.dtype in (torch.float16, torch.bfloat16) and dtypes == {torch.float32}:
        return
    if input.device.type == "cpu":
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
    other = next(d for d in dtypes if d != input.dtype)
    raise RuntimeError(f"expected scalar type {_dtype_name(input.dtype)} but found {_dtype_name(other)}")


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
    if channel_dim != 1 or type(channel_dim) is not int:
        # A view, not a copy: (N, L, C) becomes an (N, C, L) view of channels-last memory.
        channel_dim = _check_channel_dim(input, channel_dim)
        x = input.movedim(channel_dim, 1)
    else:
        x = input
    check_batch_norm_args(x, running_mean, running_var, weight, bias, training)
    if mask is not None:
        from bnkit.masked import masked_batch_norm_pure

        y, new_mean, new_var = masked_batch_norm_pure(
            x, running_mean, running_var, weight, bias, training, momentum, eps, mask
        )
    elif x.numel() == 0:
        y, new_mean, new_var = ref.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    elif not training:
        y = autograd.forward_eval(x, running_mean, running_var, weight, bias, eps)
        new_mean, new_var = running_mean, running_var
    else:
        y, mean, var = autograd.forward_train(x, weight, bias, eps)
        new_mean, new_var = running_mean, running_var
        if running_mean is not None or running_var is not None:
            m = ref.count_per_channel(x)
            rm = running_mean if running_mean is not None else mean.detach()
            rv = running_var if running_var is not None else var.detach()
            um, uv = ref.update_running_stats(rm, rv, mean.detach(), var.detach(), m, momentum)
            new_mean = um if running_mean is not None else None
            new_var = uv if running_var is not None else None
    if channel_dim != 1:
        y = y.movedim(1, channel_dim)
    return y, new_mean, new_var


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
    """Drop-in for ``torch.nn.functional.batch_norm``, computed by bnkit.

    In training mode with running statistics given, they are updated in place:
    ``running = (1 - momentum) * running + momentum * batch_stat`` with the *unbiased*
    batch variance, while the output is normalized with the *biased* one.
    """
    y, new_mean, new_var = batch_norm_pure(
        input, running_mean, running_var, weight, bias, training, momentum, eps, mask=mask, channel_dim=channel_dim
    )
    if training:
        write_running_stats(running_mean, running_var, new_mean, new_var)
    return y


def write_running_stats(
    running_mean: Tensor | None, running_var: Tensor | None, new_mean: Tensor | None, new_var: Tensor | None
) -> None:
    """Copy new running statistics into their buffers: the one place bnkit mutates them."""
    with torch.no_grad():
        if running_mean is not None and new_mean is not None and new_mean is not running_mean:
            running_mean.copy_(new_mean)
        if running_var is not None and new_var is not None and new_var is not running_var:
            running_var.copy_(new_var)
