"""mask=: statistics over the unmasked elements only, against hand-built references.

The reference for a masked batch is torch's own batch norm (the oracle) run on the
unmasked elements gathered into an (n, C) matrix; masked positions are checked against
the formula ``w * (x - mean) * invstd + b`` with those statistics.
"""

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import ELEMENTWISE, FLOAT64_REFERENCE, GRAD, assert_close
from torch import nn

import bnkit
from bnkit.functional import batch_norm, batch_norm_pure

D = torch.float64


def gather(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n, C) matrix of the unmasked elements of x (channels in dim 1)."""
    full = mask.expand(x.shape[0], *x.shape[2:])
    return x.movedim(1, -1)[full]


def hand_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    xs = gather(x, mask).double()
    return xs.mean(0), xs.var(0, unbiased=False), xs.shape[0]


def channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


# (input shape with channels in dim 1, mask shape)
SHAPES = [
    ((4, 3, 7), (4, 7)),  # padded sequences (N, C, L) / (N, L)
    ((3, 2, 4, 5), (3, 4, 5)),  # images (N, C, H, W) / (N, H, W)
    ((3, 2, 4, 5), (1, 4, 5)),  # one spatial mask shared over the batch
    ((5, 3, 4), (5, 1)),  # whole samples masked
    ((2, 3, 3, 4, 2), (2, 3, 4, 2)),  # volumes
    ((6, 3), (6,)),  # (N, C) features / (N,)
]


@pytest.mark.parametrize("shape,mshape", SHAPES)
def test_training_matches_bn_on_unmasked_elements(shape, mshape):
    x = torch.randn(shape, dtype=D) * 2 + 3
    mask = torch.rand(mshape) > 0.4
    mask.view(-1)[:2] = True
    c = shape[1]
    w, b = torch.randn(c, dtype=D), torch.randn(c, dtype=D)
    rm, rv = torch.randn(c, dtype=D), torch.rand(c, dtype=D) + 0.5
    y, nm, nv = batch_norm_pure(x, rm, rv, w, b, True, 0.3, 1e-5, mask=mask)

    xs = gather(x, mask)
    trm, trv = rm.clone(), rv.clone()
    ys = F.batch_norm(xs, trm, trv, w, b, True, 0.3, 1e-5)  # oracle on the data alone
    assert_close(gather(y, mask), ys)
    assert_close(nm, trm)
    assert_close(nv, trv)  # unbiased with n = count of unmasked
    # masked positions: normalized with the same statistics
    mean, var, _ = hand_stats(x, mask)
    expect = (x - channel(mean, x)) / channel((var + 1e-5).sqrt(), x) * channel(w, x) + channel(b, x)
    assert_close(y, expect)


def test_unbiased_running_var_uses_unmasked_count():
    x = torch.tensor([[[1.0, 2.0, 4.0, 100.0]]], dtype=D)  # (1, 1, 4), last one is padding
    mask = torch.tensor([[True, True, True, False]])
    _, nm, nv = batch_norm_pure(x, torch.zeros(1, dtype=D), torch.zeros(1, dtype=D), None, None, True, 1.0, 1e-5,
                                mask=mask)
    assert nm.item() == pytest.approx(7 / 3)
    # deviations -4/3, -1/3, 5/3 -> sum of squares 42/9, unbiased: / (3 - 1)
    assert nv.item() == pytest.approx(42 / 9 / 2)


@pytest.mark.parametrize("shape,mshape", SHAPES[:3])
def test_all_true_mask_equals_plain_batch_norm(shape, mshape):
    x = torch.randn(shape, dtype=D, requires_grad=True)
    c = shape[1]
    t = nn.BatchNorm1d(c) if len(shape) <= 3 else nn.BatchNorm2d(c)
    t = t.double()
    with torch.no_grad():
        t.weight.uniform_(0.5, 2)
        t.bias.uniform_(-1, 1)
    b = (bnkit.nn.BatchNorm1d(c) if len(shape) <= 3 else bnkit.nn.BatchNorm2d(c)).double()
    b.load_state_dict(t.state_dict())
    dy = torch.randn(shape, dtype=D)
    y_t = t(x)
    (gx_t, gw_t, gb_t) = torch.autograd.grad(y_t, (x, t.weight, t.bias), dy)
    y_b = b(x, mask=torch.ones(mshape, dtype=torch.bool))
    (gx_b, gw_b, gb_b) = torch.autograd.grad(y_b, (x, b.weight, b.bias), dy)
    for got, want in ((y_b, y_t), (gx_b, gx_t), (gw_b, gw_t), (gb_b, gb_t), (b.running_mean, t.running_mean),
                      (b.running_var, t.running_var), (b.num_batches_tracked, t.num_batches_tracked)):
        assert_close(got, want, table=GRAD)


def test_gradients_equal_bn_on_unmasked_elements_when_loss_ignores_padding():
    x = torch.randn(4, 3, 6, dtype=D, requires_grad=True)
    w = torch.randn(3, dtype=D, requires_grad=True)
    b = torch.randn(3, dtype=D, requires_grad=True)
    mask = torch.rand(4, 6) > 0.5
    mask[0, :2] = True
    dy = torch.randn(4, 3, 6, dtype=D) * mask.unsqueeze(1)  # the loss ignores padded positions
    y = batch_norm(x, None, None, w, b, training=True, mask=mask)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)

    xs = gather(x.detach(), mask).requires_grad_()
    ys = F.batch_norm(xs, None, None, w, b, True)
    gxs, gws, gbs = torch.autograd.grad(ys, (xs, w, b), gather(dy, mask))
    assert_close(gather(gx, mask), gxs)
    assert_close(gw, gws)
    assert_close(gb, gbs)
    assert torch.equal(gather(gx, ~mask), torch.zeros_like(gather(gx, ~mask)))


def test_gradients_match_hand_derived_formula_for_any_dy():
    # dx_i = w*invstd*(dy_i - c1 - xhat_i*c2) on unmasked i, w*invstd*dy_i on masked i,
    # with c1 = sum_all(dy)/n, c2 = sum_all(dy*xhat)/n (docs/beyond.md).
    x = torch.randn(3, 2, 5, 4, dtype=D, requires_grad=True)
    w = torch.randn(2, dtype=D)
    mask = torch.rand(3, 5, 4) > 0.3
    dy = torch.randn(3, 2, 5, 4, dtype=D)
    eps = 1e-3
    y = batch_norm(x, None, None, w, None, training=True, eps=eps, mask=mask)
    (gx,) = torch.autograd.grad(y, (x,), dy)

    mean, var, n = hand_stats(x.detach(), mask)
    inv = channel((var + eps).rsqrt(), x)
    xhat = (x.detach() - channel(mean, x)) * inv
    c1 = channel(dy.sum((0, 2, 3)) / n, x)
    c2 = channel((dy * xhat).sum((0, 2, 3)) / n, x)
    m = mask.unsqueeze(1)
    expect = torch.where(m, channel(w, x) * inv * (dy - c1 - xhat * c2), channel(w, x) * inv * dy)
    assert_close(gx, expect)


def test_gradcheck_float64():
    x = torch.randn(3, 2, 4, dtype=D, requires_grad=True)
    w = torch.randn(2, dtype=D, requires_grad=True)
    b = torch.randn(2, dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)

    def f(x, w, b):
        return batch_norm(x, None, None, w, b, training=True, mask=mask, eps=1e-3)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_padding_values_never_reach_the_statistics():
    x = torch.randn(4, 3, 6, dtype=D)
    mask = torch.rand(4, 6) > 0.5
    mask[0, :2] = True
    garbage = x.clone()
    garbage.movedim(1, -1)[~mask] = float("nan")
    y1, m1, v1 = batch_norm_pure(x, torch.zeros(3, dtype=D), torch.ones(3, dtype=D), training=True, mask=mask)
    y2, m2, v2 = batch_norm_pure(garbage, torch.zeros(3, dtype=D), torch.ones(3, dtype=D), training=True, mask=mask)
    torch.testing.assert_close((m2, v2), (m1, v1), rtol=0, atol=0)
    torch.testing.assert_close(gather(y2, mask), gather(y1, mask), rtol=0, atol=0)


def test_eval_mode_ignores_mask_but_validates_it():
    x = torch.randn(4, 3, 6, dtype=D)
    rm, rv = torch.randn(3, dtype=D), torch.rand(3, dtype=D) + 0.5
    mask = torch.zeros(4, 6, dtype=torch.bool)  # nothing unmasked: fine in eval
    y = batch_norm(x, rm, rv, training=False, mask=mask)
    assert_close(y, F.batch_norm(x, rm, rv, training=False), table=ELEMENTWISE)
    with pytest.raises(ValueError, match="does not match"):
        batch_norm(x, rm, rv, training=False, mask=torch.ones(4, 3, dtype=torch.bool))


def test_float32_input_against_float64_reference():
    x = torch.randn(8, 4, 16) * 3 + 100  # |mean| >> std: two-pass statistics matter
    mask = torch.rand(8, 16) > 0.3
    y, nm, nv = batch_norm_pure(x, torch.zeros(4), torch.ones(4), training=True, mask=mask)
    assert y.dtype == nm.dtype == torch.float32
    ys = F.batch_norm(gather(x, mask).double(), None, None, training=True)
    assert_close(gather(y, mask).double(), ys, torch.float32, table=FLOAT64_REFERENCE)


def test_module_forward_with_mask_and_channel_dim():
    # (N, L, C) sequences with channel_dim=-1 and an (N, L) padding mask
    x = torch.randn(4, 7, 3, dtype=D) + 1
    lengths = torch.tensor([7, 5, 2, 4])
    mask = torch.arange(7) < lengths[:, None]
    bn = bnkit.nn.BatchNorm1d(3, channel_dim=-1, momentum=None).double()
    y = bn(x, mask=mask)
    xs = x[mask]  # (n, C)
    assert_close(y[mask], F.batch_norm(xs, None, None, training=True))
    assert_close(bn.running_mean, xs.mean(0))  # momentum=None, 1st batch
    assert_close(bn.running_var, xs.var(0))
    assert bn.num_batches_tracked.item() == 1


def test_errors():
    x = torch.randn(4, 3, 6)
    with pytest.raises(TypeError, match="torch.bool"):
        batch_norm(x, None, None, training=True, mask=torch.ones(4, 6))
    with pytest.raises(TypeError, match="torch.Tensor"):
        batch_norm(x, None, None, training=True, mask=[[True] * 6] * 4)
    with pytest.raises(ValueError, match=r"expected the input's shape without the channel dim, \(4, 6\)"):
        batch_norm(x, None, None, training=True, mask=torch.ones(4, 3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        batch_norm(x, None, None, training=True, mask=torch.ones(6, dtype=torch.bool))  # no right-alignment
    with pytest.raises(ValueError, match="does not match"):
        batch_norm(x, None, None, training=True, mask=torch.ones(4, 5, dtype=torch.bool))
    one = torch.zeros(4, 6, dtype=torch.bool)
    one[2, 3] = True
    with pytest.raises(ValueError, match="more than 1 unmasked value per channel when training, got 1"):
        batch_norm(x, None, None, training=True, mask=one)
    with pytest.raises(ValueError, match="got 0"):
        bnkit.nn.BatchNorm1d(3)(x, mask=torch.zeros(4, 6, dtype=torch.bool))
