"""The hand-derived backward: float64 gradcheck/gradgradcheck, and agreement with autograd."""

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import BACKWARD_FORMULA, assert_close
from torch.autograd import gradcheck, gradgradcheck

import bnkit.functional as BF
from bnkit import autograd as bn_autograd
from bnkit import reference as ref

SHAPES = [(4, 3), (3, 2, 4), (2, 3, 2, 3), (2, 2, 2, 1, 3)]
# (has weight, has bias)
AFFINE = [(True, True), (False, False), (True, False), (False, True)]


def _inputs(shape, has_w, has_b, channels_last=False):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if has_w else None
    b = torch.randn(c, dtype=torch.float64).requires_grad_() if has_b else None
    rm = torch.randn(c, dtype=torch.float64)
    rv = torch.rand(c, dtype=torch.float64) + 0.5
    return x, w, b, rm, rv


# every rank with full affine, every affine variant on one shape
GRADCHECK_CASES = [(shape, True, True) for shape in SHAPES] + [((3, 2, 4), w, b) for w, b in AFFINE[1:]]


@pytest.mark.parametrize("shape,has_w,has_b", GRADCHECK_CASES)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(shape, has_w, has_b, training):
    x, w, b, rm, rv = _inputs(shape, has_w, has_b)
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if has_w else None
        bb = next(it) if has_b else None
        # fresh running stats each call: the in-place update must not leak between evaluations
        return BF.batch_norm(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-3)

    assert gradcheck(fn, inputs, fast_mode=True)
    assert gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_channels_last(training):
    x, w, b, rm, rv = _inputs((2, 3, 2, 3), True, True, channels_last=True)
    fn = lambda xx, ww, bb: BF.batch_norm(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-3)  # noqa: E731
    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_hand_derived_backward_matches_autograd_and_torch(shape, training):
    """Custom ops' backward vs autograd through the reference vs torch's own backward."""
    x, w, b, rm, rv = _inputs(shape, True, True)
    g = torch.randn(shape, dtype=torch.float64)
    grads = []
    for fn in (
        lambda xx, ww, bb: BF.batch_norm(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-5),
        lambda xx, ww, bb: ref.batch_norm(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-5)[0],
        lambda xx, ww, bb: F.batch_norm(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-5),
    ):
        xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
        grads.append(torch.autograd.grad(fn(xx, ww, bb), (xx, ww, bb), g))
    for ours, autograd_ref, oracle in zip(*grads, strict=True):
        assert_close(ours, autograd_ref, table=BACKWARD_FORMULA)
        assert_close(ours, oracle, table=BACKWARD_FORMULA)


def test_reference_backward_formulas_match_autograd():
    """ref.backward_train/backward_eval, the documented formulas, vs autograd of the forward."""
    x, w, b, rm, rv = _inputs((3, 2, 5), True, True)
    g = torch.randn_like(x)
    for training in (True, False):
        y = ref.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)[0]
        expected = torch.autograd.grad(y, (x, w, b), g)
        if training:
            mean, var = ref.batch_stats(x.detach())
            got = ref.backward_train(g, x.detach(), mean, ref.invstd(var, 1e-5), w.detach())
        else:
            got = ref.backward_eval(g, x.detach(), rm, ref.invstd(rv, 1e-5), w.detach())
        for a, e in zip(got, expected, strict=True):
            assert_close(a, e, table=BACKWARD_FORMULA)


@pytest.mark.parametrize("need_input,need_param", [(True, False), (False, True), (True, True)])
def test_backward_ops_honour_needs(need_input, need_param):
    x, w, _, rm, rv = _inputs((4, 3, 2), True, False)
    x = x.detach()
    g = torch.randn_like(x)
    mean, var = ref.batch_stats(x)
    inv = ref.invstd(var, 1e-5)
    dx, dw, db = bn_autograd.backward_train(g, x, w.detach(), mean, inv, need_input, need_param)
    ex, ew, eb = ref.backward_train(g, x, mean, inv, w.detach())
    if need_input:
        torch.testing.assert_close(dx, ex)
    else:
        assert dx.numel() == 0
    torch.testing.assert_close(dw, ew)
    torch.testing.assert_close(db, eb)
    dx, dw, db = bn_autograd.backward_eval(g, x, rm, rv, w.detach(), 1e-5, need_input, need_param)
    ex, ew, eb = ref.backward_eval(g, x, rm, ref.invstd(rv, 1e-5), w.detach())
    if need_input:
        torch.testing.assert_close(dx, ex)
    if need_param:
        torch.testing.assert_close(dw, ew)
        torch.testing.assert_close(db, eb)


def test_only_needed_gradients_are_computed():
    """A frozen weight gets no gradient; an input that needs none gets none."""
    x, w, b, rm, rv = _inputs((4, 3), True, True)
    w.requires_grad_(False)
    y = BF.batch_norm(x.detach(), rm, rv, w, b, training=True)
    y.sum().backward()
    assert w.grad is None and b.grad is not None


def test_input_gradient_is_orthogonal_to_shift_and_scale():
    """docs/math.md: sum(dx) = 0 and sum(dx * xhat) = 0 per channel (the latter as eps -> 0)."""
    x, w, b, _, _ = _inputs((5, 3, 4), True, True)
    eps = 1e-14
    y = BF.batch_norm(x, None, None, w, b, training=True, eps=eps)
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    mean, var = ref.batch_stats(x.detach())
    xhat = (x.detach() - mean.view(1, 3, 1)) * ref.invstd(var, eps).view(1, 3, 1)
    # zero up to the rounding of float64 sums of 20 values of order one: an absolute 1e-12
    torch.testing.assert_close(dx.sum((0, 2)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close((dx * xhat).sum((0, 2)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
