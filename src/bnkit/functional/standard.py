"""Batch norm as a function: ``batch_norm`` (torch's signature) and its pure twin.

* :func:`batch_norm` has exactly the signature, semantics and errors of
  torch's ``F.batch_norm``: in training mode it writes the new running
  statistics into ``running_mean``/``running_var`` in place.
* :func:`batch_norm_pure` computes the same thing and *returns*
  ``(output, new_running_mean, new_running_var)`` without mutating anything, so it can
  run under ``torch.func`` transforms (``functional_call``, ``vmap``, ``jacrev``).

Where a tracer or transform records the call (``torch.func``, ``torch.jit.trace``, ONNX export,
``torch.compile``; :func:`bnkit.autograd.needs_plain_ops`), both compute with
:func:`bnkit.reference.batch_norm` (plain differentiable torch ops) instead of the custom ops or
kernels; a training call that ``torch.compile`` records takes :func:`bnkit.autograd.inductor_train`
(statistics in the computation dtype, the hand-derived backward), which inductor fuses. Results are
the same to rounding; see ``docs/semantics.md``.

Both accept two keyword-only extensions that default to torch's behaviour:
``channel_dim`` (where the channels are, default 1) and ``mask`` (elements that count
towards the statistics; see :mod:`bnkit.functional.masked`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from bnkit import autograd
from bnkit import reference as ref
from bnkit.functional.args import _check_eps, _verify_batch_size, check_pure_args
from bnkit.functional.layout import as_torch_layout, from_channels_first, to_channels_first
from bnkit.functional.masked import masked_batch_norm_pure
from bnkit.functional.running import updated_running_stats, write_running_stats
from bnkit.kernels.base import is_running_vector

__all__ = ["batch_norm", "batch_norm_pure"]


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
        y, new_mean, new_var = masked_batch_norm_pure(
            x, running_mean, running_var, weight, bias, training, momentum, eps, mask
        )
    elif training and autograd.inductor_records():
        y, mean, var = autograd.inductor_train(x, weight, bias, eps)
        new_mean, new_var = updated_running_stats(
            running_mean, running_var, mean, var, ref.count_per_channel(x), momentum
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
