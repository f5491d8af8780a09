r"""The textbook: batch normalization written in plain torch ops.

This module is the specification of bnkit. Every fast kernel is tested against it,
and it is tested against ``torch.nn.BatchNorm*``. Everything here is a pure function:
nothing is mutated, new running statistics are *returned* (they are copied into
buffers in one thin place, :func:`bnkit.functional.write_running_stats`, which the
modules call from ``_commit_running_stats``).

Symbols (the same in code, docstrings and ``docs/math.md``)::

    x        input of shape (N, C, *), channel c along dim 1
    M        number of elements per channel = N * prod(spatial)
    mean     per-channel batch mean            mean[c] = sum(x[:, c]) / M
    var      per-channel *biased* variance     var[c]  = sum((x[:, c] - mean[c])**2) / M
    invstd   1 / sqrt(var + eps)               (eps inside the square root)
    xhat     (x - mean) * invstd               normalized input
    y        w * xhat + b                      output (w = 1, b = 0 without affine)

Forward (training): normalize with the *biased* variance of the batch, then update the
running statistics with the *unbiased* variance ``var * M / (M - 1)``::

    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var  + momentum * var * M / (M - 1)

``momentum=None`` means the cumulative moving average: the module passes
``momentum = 1 / num_batches_tracked`` (after incrementing it), so after k batches the
running statistics are the plain average of the k batch statistics.

Forward (eval): ``y = w * (x - running_mean) / sqrt(running_var + eps) + b``.

Backward (training), with ``dy`` the gradient of the loss with respect to ``y``. Since
``d xhat_i / d x_j = (invstd / M) * (M * delta_ij - 1 - xhat_i * xhat_j)`` (mean and
invstd both depend on every x_j of the channel), the chain rule gives::

    db = sum(dy)                  dw = sum(dy * xhat)
    dx = (w * invstd / M) * (M * dy - sum(dy) - xhat * sum(dy * xhat))

Backward (eval): the running statistics are constants, so ``dx = w * invstd * dy``,
``dw = sum(dy * xhat)`` and ``db = sum(dy)`` with xhat built from the running statistics.
The derivation of every line is in ``docs/math.md``.

Numerics policy (stated once, here; reasons in ``docs/math.md``): statistics are computed in two passes (mean first,
then the mean of squared deviations), never as ``E[x^2] - E[x]^2``, which cancels
catastrophically when |mean| >> std. Accumulation happens in float64 on devices that
support it (float32 elsewhere); the statistics returned have the *statistics dtype*:
float64 for float64 inputs, float32 for float32, float16 and bfloat16 inputs (torch's
mixed-precision convention). Outputs are computed in the statistics dtype and rounded
once to the input dtype. Gradients and tangents take the same care as the statistics:
``x`` is centered with the mean in the accumulation dtype *before* any product
(``xhat = (x - mean) * invstd``, never ``x * invstd - mean * invstd``), and ``sum(dy)``,
``sum(dy * xhat)`` accumulate there too, so ``dw`` on offset data (``x ~ 1000 + N(0, 1)``)
is as accurate as the forward; per-channel results are rounded once to the statistics dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "backward_eval",
    "backward_train",
    "batch_norm",
    "batch_stats",
    "blend_running",
    "channel_shape",
    "invstd",
    "jvp_eval",
    "jvp_train",
    "merge_stats",
    "normalize",
    "reduction_dims",
    "stats_dtype",
    "unbiased_var",
    "update_running_stats",
]


def reduction_dims(x: Tensor) -> list[int]:
    """Every dim except the channel dim 1: the dims a statistic is reduced over."""
    return [0, *range(2, x.dim())]


def channel_shape(x: Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector against ``x``: (1, C, 1, ..., 1)."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def count_per_channel(x: Tensor) -> int:
    """M = N * prod(spatial): how many values feed each channel's statistics."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics, parameters and running stats for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    # float64 accumulation where the device has it: the reference trades speed for accuracy.
    if x.device.type in ("cpu", "cuda"):
        return torch.float64
    return torch.float32


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``mean`` and *biased* ``var`` of ``x`` (two passes, see numerics policy).

    Returns tensors of shape (C,) in :func:`stats_dtype` of ``x``.
    """
    dims = reduction_dims(x)
    xa = x.to(_accumulation_dtype(x))
    mean = xa.mean(dims)
    var = (xa - mean.view(channel_shape(x))).square().mean(dims)
    out = stats_dtype(x.dtype)
    return mean.to(out), var.to(out)


def merge_stats(
    count_a: Tensor | int, mean_a: Tensor, m2_a: Tensor, count_b: Tensor | int, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor | int, Tensor, Tensor]:
    """Chan's parallel formula: combine (count, mean, M2) of two disjoint sets.

    ``M2 = sum((x - mean)**2) = count * var``. With ``n = n_a + n_b`` and
    ``delta = mean_b - mean_a``::

        mean = mean_a + delta * n_b / n
        M2   = M2_a + M2_b + delta**2 * n_a * n_b / n

    An empty side (count 0) leaves the other unchanged. (Chan, Golub, LeVeque 1979.)
    """
    n = count_a + count_b
    if isinstance(n, int) and n == 0:
        return 0, torch.zeros_like(mean_a), torch.zeros_like(m2_a)
    n_t = torch.as_tensor(n, dtype=mean_a.dtype, device=mean_a.device)
    nb = torch.as_tensor(count_b, dtype=mean_a.dtype, device=mean_a.device)
    na = torch.as_tensor(count_a, dtype=mean_a.dtype, device=mean_a.device)
    safe_n = torch.where(n_t > 0, n_t, torch.ones_like(n_t))
    delta = mean_b - mean_a
    mean = mean_a + delta * (nb / safe_n)
    m2 = m2_a + m2_b + delta.square() * (na * nb / safe_n)
    return n, mean, m2


def invstd(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``: eps sits inside the square root."""
    return torch.rsqrt(var + eps)


def unbiased_var(var: Tensor, count: int) -> Tensor:
    """Bessel's correction: ``var * M / (M - 1)`` (the running variance is unbiased)."""
    return var * (count / (count - 1))


def blend_running(
    running: Tensor, batch: Tensor, momentum: float | Tensor, keep: float | Tensor | None = None
) -> Tensor:
    """One step of the moving average, returned: ``(1 - momentum) * running + momentum * batch``.

    torch's convention: ``momentum`` is the weight of the *new* batch (Keras and Flax call
    ``1 - momentum`` their momentum/decay). ``keep`` is ``1 - momentum``, given by a caller that
    holds both weights already (as scalar tensors that give the Python scalars' numbers); by
    default it is computed here.
    """
    # Blend in the dtype of both promoted (the statistics dtype, float32 at least) and round once
    # to the running statistic's dtype, as torch does for float16/bfloat16 running statistics.
    dt = torch.promote_types(batch.dtype, running.dtype)
    if keep is None:
        keep = 1 - momentum
    # (converted only where a dtype differs: a conversion to the same dtype still costs a microsecond)
    r = running if running.dtype == dt else running.to(dt)
    b = batch if batch.dtype == dt else batch.to(dt)
    new = r * keep + b * momentum
    return new if new.dtype == running.dtype else new.to(running.dtype)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """New running statistics (returned, not written): an exponential moving average.

    :func:`blend_running` of each, ``running <- (1 - momentum) * running + momentum * batch``,
    with the batch variance made unbiased first (:func:`unbiased_var`).
    """
    return blend_running(running_mean, mean, momentum), blend_running(running_var, unbiased_var(var, count), momentum)


def normalize(x: Tensor, mean: Tensor, inv: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``y = (x - mean) * invstd * w + b``, computed in the statistics dtype, rounded once.

    Subtracting the mean before scaling keeps ``y`` accurate when |mean| >> std (the
    folded form ``x * scale + shift`` cancels catastrophically there).
    """
    shape = channel_shape(x)
    scale = inv if weight is None else inv * weight.to(inv.dtype)
    y = (x.to(inv.dtype) - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.to(inv.dtype).view(shape)
    return y.to(x.dtype)


def backward_train(
    dy: Tensor, x: Tensor, mean: Tensor, inv: Tensor, weight: Tensor | None, acc: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Gradients of the training-mode forward, where mean and invstd depend on x.

    With ``c1 = sum(dy) / M`` and ``c2 = sum(dy * xhat) / M`` (the names of
    ``docs/math.md``)::

        dx = w * invstd * (dy - c1 - xhat * c2)
        dw = sum(dy * xhat) = M * c2,   db = sum(dy) = M * c1

    which is ``(w * invstd / M) * (M * dy - sum(dy) - xhat * sum(dy * xhat))``.
    Returns ``(dx, dw, db)``; ``dw``/``db`` are per channel in the statistics dtype. ``acc`` is the dtype
    everything is centered, reduced and combined in: by default the numerics policy's accumulation dtype
    (:func:`bnkit.autograd.inductor_train` passes the statistics dtype, the speed road under ``torch.compile``).
    """
    dims = reduction_dims(x)
    shape = channel_shape(x)
    m = count_per_channel(x)
    dt = inv.dtype
    acc = acc or _accumulation_dtype(x)  # numerics policy: centered and reduced in the accumulation dtype
    inv_ = inv.to(acc)
    dy_ = dy.to(acc)
    xhat = (x.to(acc) - mean.to(acc).view(shape)) * inv_.view(shape)
    sum_dy = dy_.sum(dims)
    sum_dy_xhat = (dy_ * xhat).sum(dims)
    c1 = sum_dy / m
    c2 = sum_dy_xhat / m
    scale = (weight.to(acc) * inv_).view(shape) if weight is not None else inv_.view(shape)
    dx = scale * (dy_ - c1.view(shape) - xhat * c2.view(shape))
    return dx.to(x.dtype), sum_dy_xhat.to(dt), sum_dy.to(dt)


def backward_eval(
    dy: Tensor, x: Tensor, mean: Tensor, inv: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the eval-mode forward: mean and invstd are constants.

    ``dx = w * invstd * dy``, ``dw = sum(dy * xhat)``, ``db = sum(dy)``.
    """
    dims = reduction_dims(x)
    shape = channel_shape(x)
    dt = inv.dtype
    scale = inv if weight is None else inv * weight.to(dt)
    dx = dy.to(dt) * scale.view(shape)
    acc = _accumulation_dtype(x)  # numerics policy: centered and reduced in the accumulation dtype
    dy_ = dy.to(acc)
    xhat = (x.to(acc) - mean.to(acc).view(shape)) * inv.to(acc).view(shape)
    return dx.to(x.dtype), (dy_ * xhat).sum(dims).to(dt), dy_.sum(dims).to(dt)


def _tangent(t: Tensor | None, shape: list[int], dt: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dt).view(shape)


def jvp_train(
    tx: Tensor | None,
    tw: Tensor | None,
    tb: Tensor | None,
    x: Tensor,
    mean: Tensor,
    inv: Tensor,
    weight: Tensor | None,
) -> Tensor | None:
    r"""Tangent of the training-mode output (forward-mode AD) for tangents ``tx``, ``tw``, ``tb``.

    Mean and invstd depend on x, so (``docs/math.md``, "Forward mode")::

        d(xhat) = invstd * (tx - mean(tx) - xhat * mean(tx * xhat))
        dy      = w * d(xhat) + tw * xhat + tb

    Any tangent may be ``None`` (zero); ``None`` when all are. Plain torch ops only, so the
    tangents may be functorch-batched. The result has ``x``'s dtype.
    """
    if tx is None and tw is None and tb is None:
        return None
    dims = reduction_dims(x)
    shape = channel_shape(x)
    dt = _accumulation_dtype(x)  # as the backward: centered and reduced in the accumulation dtype
    inv_ = inv.to(dt).view(shape)
    xhat = (x.to(dt) - mean.to(dt).view(shape)) * inv_
    dy = None
    if tx is not None:
        t = tx.to(dt)
        dxhat = inv_ * (t - t.mean(dims, keepdim=True) - xhat * (t * xhat).mean(dims, keepdim=True))
        dy = dxhat if weight is None else dxhat * weight.to(dt).view(shape)
    return _affine_tangent(dy, tw, tb, xhat, shape, dt).to(x.dtype)


def jvp_eval(
    tx: Tensor | None,
    tw: Tensor | None,
    tb: Tensor | None,
    x: Tensor,
    mean: Tensor,
    inv: Tensor,
    weight: Tensor | None,
) -> Tensor | None:
    """Tangent of the eval-mode output: the running statistics are constants, so
    ``dy = w * invstd * tx + tw * xhat + tb`` (``None`` when every tangent is)."""
    if tx is None and tw is None and tb is None:
        return None
    shape = channel_shape(x)
    dt = _accumulation_dtype(x)
    xhat = (x.to(dt) - mean.to(dt).view(shape)) * inv.to(dt).view(shape)
    dy = None
    if tx is not None:
        scale = inv if weight is None else inv * weight.to(inv.dtype)  # the forward's scale, then widened
        dy = tx.to(dt) * scale.to(dt).view(shape)
    return _affine_tangent(dy, tw, tb, xhat, shape, dt).to(x.dtype)


def _affine_tangent(
    dy: Tensor | None, tw: Tensor | None, tb: Tensor | None, xhat: Tensor, shape: list[int], dt: torch.dtype
) -> Tensor:
    # dy + tw * xhat + tb, each term present only when its tangent is (the sum has xhat's shape)
    if tw is not None:
        term = xhat * _tangent(tw, shape, dt)
        dy = term if dy is None else dy + term
    if tb is not None:
        term = _tangent(tb, shape, dt)
        dy = torch.zeros_like(xhat) + term if dy is None else dy + term
    return dy


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The whole layer as one pure, autograd-differentiable function.

    Returns ``(y, new_running_mean, new_running_var)``; the new running statistics are
    ``None`` when not given, and equal the inputs when nothing updates them (eval mode).
    Gradients come from autograd through these plain ops: this is the twin that the
    hand-derived backward formulas are tested against.

    Batch statistics never carry gradient into the running statistics (they are
    buffers in torch); an empty batch (M = 0) leaves them unchanged, as torch does.
    """
    if not training:
        if running_mean is None or running_var is None:
            raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
        inv = invstd(running_var.to(stats_dtype(x.dtype)), eps)
        return normalize(x, running_mean.to(inv.dtype), inv, weight, bias), running_mean, running_var
    m = count_per_channel(x)
    if m == 0:
        y = x.clone()
        if weight is not None and weight.numel():
            y = y * weight[0]
        if bias is not None and bias.numel():
            y = y + bias[0]
        return y, running_mean, running_var
    mean, var = batch_stats(x)
    y = normalize(x, mean, invstd(var, eps), weight, bias)
    if running_mean is None or running_var is None:
        return y, running_mean, running_var
    new_mean, new_var = update_running_stats(
        running_mean, running_var, mean.detach(), var.detach(), m, momentum
    )
    return y, new_mean, new_var
