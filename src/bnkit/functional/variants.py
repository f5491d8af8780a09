r"""Functional forms of the batch-norm variants (re-exported by :mod:`bnkit.functional`).

Every variant comes as a pure function that *returns* ``(output, new_running_mean,
new_running_var)`` (``*_pure``, what the modules call) and as a torch-style function that
writes the new running statistics into the given buffers in training mode. Arguments
follow torch's ``F.batch_norm`` (``input, running_mean, running_var, weight,
bias, training, momentum, eps``); variant options are keyword-only.

* :func:`batch_norm_act` - batch norm and an activation in one op; optional memory-saving
  mode (see :mod:`bnkit.fused`).
* :func:`batch_renorm` - batch renormalization (Ioffe 2017).
* :func:`ghost_batch_norm` - statistics per virtual batch (Hoffer et al. 2017).
* :func:`frozen_batch_norm` - fixed statistics and affine (torchvision's FrozenBatchNorm2d).

Running statistics follow bnkit's convention everywhere (:mod:`bnkit.reference`):
``running <- (1 - momentum) * running + momentum * batch`` with the unbiased batch variance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnkit import autograd
from bnkit import reference as ref
from bnkit.functional.args import _verify_batch_size, check_pure_args
from bnkit.functional.layout import from_channels_first, to_channels_first
from bnkit.functional.running import updated_running_stats, write_running_stats
from bnkit.functional.standard import batch_norm_pure
from bnkit.fused import apply_activation, batch_norm_act_forward, check_activation, one_call_act

__all__ = [
    "GHOST_RUNNING_STATS_UPDATES",
    "batch_norm_act",
    "batch_norm_act_pure",
    "batch_renorm",
    "batch_renorm_pure",
    "check_renorm_limits",
    "frozen_batch_norm",
    "ghost_batch_norm",
    "ghost_batch_norm_pure",
    "renorm_limits",
]

Stats = tuple[Tensor, Tensor | None, Tensor | None]


# --- fused batch norm + activation ------------------------------------------------------


def _train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)`` of a training batch norm: the eager fast path (backward and jvp of the kernels'
    formulas), or where a tracer or transform records the call plain ops (:func:`bnkit.autograd.inductor_train`
    under ``torch.compile``, else the reference's), as :func:`batch_norm_pure` routes."""
    if autograd.inductor_records():
        return autograd.inductor_train(x, weight, bias, eps)
    if autograd.needs_plain_ops():
        mean, var = ref.batch_stats(x)
        return ref.normalize(x, mean, ref.invstd(var, eps), weight, bias), mean, var
    return autograd.train(x, weight, bias, eps)


def batch_norm_act_pure(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "relu",
    activation_param: float = 0.01,
    memory_saving: bool = False,
    inplace: bool = False,
    channel_dim: int = 1,
) -> Stats:
    """``act(batch_norm(input))`` in one op; returns ``(output, new_running_mean, new_running_var)``.

    ``activation`` is one of ``identity, relu, leaky_relu, elu, silu, gelu``;
    ``activation_param`` is leaky_relu's negative slope or elu's alpha. ``memory_saving``
    (identity, leaky_relu, elu only) keeps only the output for the backward;
    ``inplace`` (memory saving only) writes the output over ``input``. Gradients equal
    those of batch norm followed by the activation.
    """
    check_activation(activation, activation_param, memory_saving)
    if training is True and channel_dim == 1 and type(channel_dim) is int:
        out = one_call_act(input, running_mean, running_var, weight, bias, momentum, eps, activation,
                           activation_param, memory_saving, inplace)  # fmt: skip
        if out is not None:
            return out
    x, channel_dim = to_channels_first(input, channel_dim)
    check_pure_args(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if x.numel() == 0 or autograd.needs_plain_ops():
        # an empty batch, or a call that a tracer records: the composed formulas (never in place)
        y, new_mean, new_var = ref.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return from_channels_first(apply_activation(y, activation, activation_param, False), channel_dim), \
            new_mean, new_var
    z, mean, var = batch_norm_act_forward(
        x, weight, bias, running_mean, running_var, training, eps, activation, activation_param, memory_saving,
        inplace,
    )
    new_mean, new_var = running_mean, running_var
    if training:
        new_mean, new_var = updated_running_stats(
            running_mean, running_var, mean, var, ref.count_per_channel(x), momentum
        )
    if inplace:
        return input, new_mean, new_var
    return from_channels_first(z, channel_dim), new_mean, new_var


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "relu",
    activation_param: float = 0.01,
    memory_saving: bool = False,
    inplace: bool = False,
    channel_dim: int = 1,
) -> Tensor:
    """:func:`batch_norm_act_pure` that updates the running statistics in place (torch style)."""
    y, new_mean, new_var = batch_norm_act_pure(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation=activation,
        activation_param=activation_param, memory_saving=memory_saving, inplace=inplace, channel_dim=channel_dim,
    )
    if training:
        write_running_stats(running_mean, running_var, new_mean, new_var)
    return y


# --- batch renormalization ----------------------------------------------------------------


def renorm_limits(
    step: int | Tensor,
    r_max: float = 3.0,
    d_max: float = 5.0,
    r_max_warmup: tuple[int, int] | None = None,
    d_max_warmup: tuple[int, int] | None = None,
) -> tuple[float, float]:
    """``(r_max, d_max)`` at training ``step`` under the paper's warm-up schedule.

    A warm-up ``(start, end)`` keeps the limit at its plain-BN value (r_max 1, d_max 0)
    up to ``start`` and ramps it linearly to the target at ``end``. Ioffe (2017) used
    r_max 1 -> 3 with ``(5000, 40000)`` and d_max 0 -> 5 with ``(5000, 25000)``.
    """
    s = float(step)

    def ramp(lo: float, hi: float, warmup: tuple[int, int] | None) -> float:
        if warmup is None:
            return hi
        start, end = warmup
        if s <= start:
            return lo
        if s >= end or end <= start:
            return hi
        return lo + (hi - lo) * (s - start) / (end - start)

    return ramp(1.0, r_max, r_max_warmup), ramp(0.0, d_max, d_max_warmup)


def check_renorm_limits(r_max: float, d_max: float) -> None:
    """Raise ``ValueError`` unless ``r_max >= 1`` and ``d_max >= 0`` (plain batch norm is 1 and 0)."""
    if not r_max >= 1:
        raise ValueError(f"r_max must be >= 1, got {r_max!r}")
    if not d_max >= 0:
        raise ValueError(f"d_max must be >= 0, got {d_max!r}")


def batch_renorm_pure(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    channel_dim: int = 1,
) -> Stats:
    r"""Batch renormalization (Ioffe 2017); returns ``(output, new_running_mean, new_running_var)``.

    Training, with the batch's ``mean``, biased ``var`` and bnkit's running statistics::

        sigma_B = sqrt(var + eps)                  sigma = sqrt(running_var + eps)
        r = clip(sigma_B / sigma, 1/r_max, r_max)  d = clip((mean - running_mean) / sigma, -d_max, d_max)
        y = w * ((x - mean) / sigma_B * r + d) + b

    ``r`` and ``d`` are constants for the gradient (stop-gradient), so the gradient is
    batch norm's with scale ``w * r``. The running statistics are updated exactly as batch
    norm's (``running_var`` with the unbiased batch variance) *after* ``r`` and ``d`` are
    computed from the old ones. Eval mode is batch norm's eval mode; ``r_max=1, d_max=0``
    is batch norm in training too. Without running statistics there is nothing to
    renormalize against and the result is plain batch norm.
    """
    check_renorm_limits(r_max, d_max)
    x, channel_dim = to_channels_first(input, channel_dim)
    if not training or running_mean is None or running_var is None or x.numel() == 0:
        y, new_mean, new_var = batch_norm_pure(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return from_channels_first(y, channel_dim), new_mean, new_var
    check_pure_args(x, running_mean, running_var, weight, bias, training, momentum, eps)
    y, mean, var = _train_forward(x, weight, bias, eps)
    sd = mean.dtype
    # r and d are stop-gradient constants: detached, since no_grad does not stop forward-mode tangents
    with torch.no_grad():
        sigma = (running_var.detach().to(sd) + eps).sqrt()
        r = ((var.detach() + eps).sqrt() / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean.detach() - running_mean.detach().to(sd)) / sigma).clamp(-d_max, d_max)
    # w * (xhat * r + d) + b  ==  r * y + ((1 - r) * b + w * d),  y = w * xhat + b
    shape = ref.channel_shape(x)
    shift = d if weight is None else weight.to(sd) * d
    if bias is not None:
        shift = shift + bias.to(sd) * (1 - r)
    y = y.mul(r.view(shape).to(y.dtype)).add_(shift.view(shape).to(y.dtype))
    new_mean, new_var = updated_running_stats(
        running_mean, running_var, mean, var, ref.count_per_channel(x), momentum
    )
    return from_channels_first(y, channel_dim), new_mean, new_var


def batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    channel_dim: int = 1,
) -> Tensor:
    """:func:`batch_renorm_pure` that updates the running statistics in place (torch style)."""
    y, new_mean, new_var = batch_renorm_pure(
        input, running_mean, running_var, weight, bias, training, momentum, eps, r_max=r_max, d_max=d_max,
        channel_dim=channel_dim,
    )
    if training:
        write_running_stats(running_mean, running_var, new_mean, new_var)
    return y


# --- ghost batch norm -------------------------------------------------------------------

GHOST_RUNNING_STATS_UPDATES = ("per_virtual_batch", "averaged")


def ghost_batch_norm_pure(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    virtual_batch_size: int,
    running_stats_update: str = "per_virtual_batch",
    channel_dim: int = 1,
) -> Stats:
    """Ghost batch norm (Hoffer et al. 2017); returns ``(output, new_running_mean, new_running_var)``.

    Training: the batch is cut along dim 0 into virtual batches of ``virtual_batch_size``
    samples, ``torch.split`` style: when N is not a multiple, the *last* virtual batch is
    smaller (N % virtual_batch_size samples); it must still hold more than one value per
    channel. Each virtual batch is normalized with its own statistics (gradients flow
    through each virtual batch's statistics only).

    Running statistics (``running_stats_update``):

    * ``"per_virtual_batch"`` (default, the paper's definition): one moving-average step
      per virtual batch, in order, each with that virtual batch's unbiased variance; a
      batch of k virtual batches moves the running statistics k times.
    * ``"averaged"`` (what Keras' ``virtual_batch_size`` does): one step per call with the
      plain mean of the virtual batches' means and unbiased variances.

    Eval mode is batch norm's eval mode.
    """
    if not isinstance(virtual_batch_size, int) or isinstance(virtual_batch_size, bool) or virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    if running_stats_update not in GHOST_RUNNING_STATS_UPDATES:
        raise ValueError(
            f"running_stats_update must be one of {', '.join(GHOST_RUNNING_STATS_UPDATES)}, "
            f"got {running_stats_update!r}"
        )
    x, channel_dim = to_channels_first(input, channel_dim)
    if not training or x.numel() == 0:
        y, new_mean, new_var = batch_norm_pure(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return from_channels_first(y, channel_dim), new_mean, new_var
    check_pure_args(x, running_mean, running_var, weight, bias, training, momentum, eps)
    outputs, stats = [], []
    for chunk in torch.split(x, virtual_batch_size, dim=0):
        _verify_batch_size(chunk.size())
        y, mean, var = _train_forward(chunk, weight, bias, eps)
        outputs.append(y)
        stats.append((mean.detach(), var.detach(), ref.count_per_channel(chunk)))
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    new_mean, new_var = running_mean, running_var
    if running_stats_update == "per_virtual_batch":
        for mean, var, count in stats:
            new_mean, new_var = updated_running_stats(new_mean, new_var, mean, var, count, momentum)
    elif running_mean is not None or running_var is not None:
        mean = torch.stack([s[0] for s in stats]).mean(0)
        unbiased = torch.stack([ref.unbiased_var(s[1], s[2]) for s in stats]).mean(0)
        # one step of bnkit.reference's moving average, the variance already unbiased
        if running_mean is not None:
            new_mean = ref.blend_running(running_mean, mean, momentum)
        if running_var is not None:
            new_var = ref.blend_running(running_var, unbiased, momentum)
    return from_channels_first(y, channel_dim), new_mean, new_var


def ghost_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    virtual_batch_size: int,
    running_stats_update: str = "per_virtual_batch",
    channel_dim: int = 1,
) -> Tensor:
    """:func:`ghost_batch_norm_pure` that updates the running statistics in place (torch style)."""
    y, new_mean, new_var = ghost_batch_norm_pure(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        virtual_batch_size=virtual_batch_size, running_stats_update=running_stats_update, channel_dim=channel_dim,
    )
    if training:
        write_running_stats(running_mean, running_var, new_mean, new_var)
    return y


# --- frozen batch norm ------------------------------------------------------------------


def frozen_batch_norm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str = "identity",
    activation_param: float = 0.01,
    channel_dim: int = 1,
) -> Tensor:
    """``act(w * (x - running_mean) / sqrt(running_var + eps) + b)`` in every mode.

    torchvision's ``FrozenBatchNorm2d`` math (eps inside the square root); gradients flow
    to ``input`` and, when they require grad, to ``weight``/``bias`` - never to the
    statistics, which are fixed.
    """
    if activation == "identity":
        return batch_norm_pure(input, running_mean, running_var, weight, bias, False, 0.0, eps,
                               channel_dim=channel_dim)[0]
    return batch_norm_act_pure(input, running_mean, running_var, weight, bias, False, 0.0, eps,
                               activation=activation, activation_param=activation_param, channel_dim=channel_dim)[0]
