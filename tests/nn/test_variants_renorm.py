"""Batch renormalization vs the equations of Ioffe (2017), written here in plain torch ops."""

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import TRAINING, VARIANT, assert_close
from torch import nn

import bnkit
import bnkit.functional as bf
from bnkit.functional import renorm_limits

EPS = 1e-5


def renorm_ref(x, rm, rv, w, b, momentum, r_max, d_max):
    """Algorithm 1 of the paper with sigma = sqrt(running_var + eps); r, d without gradient."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(((x - mu_b.view(shape)) ** 2).mean(dims) + EPS)
    sigma = torch.sqrt(rv + EPS)
    r = torch.clamp(sigma_b.detach() / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu_b.detach() - rm) / sigma, -d_max, d_max)
    xhat = (x - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    y = w.view(shape) * xhat + b.view(shape)
    m = x.numel() // x.shape[1]
    var_unbiased = ((x.detach() - mu_b.detach().view(shape)) ** 2).sum(dims) / (m - 1)
    new_rm = rm + momentum * (mu_b.detach() - rm)
    new_rv = rv + momentum * (var_unbiased - rv)
    return y, new_rm, new_rv


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.randn(c, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    # running statistics chosen so that r (batch sigma ~3) and d clip in some channels only
    rm = torch.tensor([0.0, 30.0, -2.0, 1.0], dtype=torch.float64)[:c]
    rv = torch.tensor([0.5, 9.0, 200.0, 4.0], dtype=torch.float64)[:c]
    return x, w, b, rm, rv


@pytest.mark.parametrize("shape", [(8, 4), (4, 4, 5), (3, 4, 3, 5), (2, 4, 2, 3, 2)])
@pytest.mark.parametrize("limits", [(3.0, 5.0), (1.5, 0.5)])
def test_functional_matches_paper(shape, limits):
    r_max, d_max = limits
    x, w, b, rm, rv = _data(shape)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    yr, rmr, rvr = renorm_ref(xr, rm, rv, wr, br, 0.1, r_max, d_max)
    xb, wb, bb = (t.clone().requires_grad_() for t in (x, w, b))
    rmb, rvb = rm.clone(), rv.clone()
    yb = bf.batch_renorm(xb, rmb, rvb, wb, bb, True, 0.1, EPS, r_max=r_max, d_max=d_max)
    g = torch.randn_like(yr)
    yr.backward(g)
    yb.backward(g)
    for got, want in ((yb, yr), (xb.grad, xr.grad), (wb.grad, wr.grad), (bb.grad, br.grad), (rmb, rmr), (rvb, rvr)):
        assert_close(got, want, table=VARIANT)


def test_clipping_happens_in_the_test_data():
    # guard: the data above really exercise the clipped branches of r and d
    x, w, b, rm, rv = _data((3, 4, 3, 5))
    sigma_b = x.var([0, 2, 3], unbiased=False).add(EPS).sqrt()
    sigma = (rv + EPS).sqrt()
    r = sigma_b / sigma
    d = (x.mean([0, 2, 3]) - rm) / sigma
    assert ((r > 3) | (r < 1 / 3)).any() and ((r < 3) & (r > 1 / 3)).any()
    assert (d.abs() > 5).any() and (d.abs() < 0.5).any()


def test_gradcheck():
    # Finite differences also see x -> (r, d); in the clipped regime r and d are locally
    # constant, so there the stop-gradient analytic gradient is the true one. (The
    # unclipped regime is covered against the paper's reference above.)
    x, w, b, _, _ = _data((3, 2, 2, 2))
    rm = torch.tensor([0.0, 30.0], dtype=torch.float64)
    rv = torch.tensor([0.5, 200.0], dtype=torch.float64)

    def f(x, w, b):
        return bf.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, r_max=2.0, d_max=0.5)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("cls,torch_cls,shape", [
    (bnkit.nn.BatchRenorm1d, nn.BatchNorm1d, (8, 4)),
    (bnkit.nn.BatchRenorm2d, nn.BatchNorm2d, (3, 4, 3, 5)),
    (bnkit.nn.BatchRenorm3d, nn.BatchNorm3d, (2, 4, 2, 3, 2)),
])
def test_limits_one_zero_is_plain_bn_and_eval_is_bn_eval(cls, torch_cls, shape):
    t = torch_cls(4).double()
    m = cls(4, r_max=1.0, d_max=0.0).double()
    m.load_state_dict(t.state_dict())
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 1
        assert_close(m(x), t(x), table=VARIANT)
    assert_close(m.running_var, t.running_var, table=TRAINING)
    full = cls(4).double()
    full.load_state_dict(t.state_dict())
    full.eval()
    t.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert_close(full(x), t(x), table=TRAINING)


def test_module_training_steps_match_paper():
    m = bnkit.nn.BatchRenorm2d(4, momentum=0.2, r_max=2.0, d_max=1.0).double()
    x, w, b, rm, rv = _data((3, 4, 3, 5))
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
    for step in range(3):
        x = torch.randn(3, 4, 3, 5, dtype=torch.float64) * (step + 1)
        y_ref, rm, rv = renorm_ref(x, rm, rv, w, b, 0.2, 2.0, 1.0)
        assert_close(m(x), y_ref, table=VARIANT)
        assert_close(m.running_mean, rm, table=TRAINING)
        assert_close(m.running_var, rv, table=TRAINING)
    assert int(m.num_batches_tracked) == 3


def test_warmup_schedule():
    assert renorm_limits(0, 3.0, 5.0, (5000, 40000), (5000, 25000)) == (1.0, 0.0)
    assert renorm_limits(5000, 3.0, 5.0, (5000, 40000), (5000, 25000)) == (1.0, 0.0)
    r, d = renorm_limits(15000, 3.0, 5.0, (5000, 40000), (5000, 25000))
    assert r == pytest.approx(1 + 2 * 10000 / 35000) and d == pytest.approx(5 * 10000 / 20000)
    assert renorm_limits(10**6, 3.0, 5.0, (5000, 40000), (5000, 25000)) == (3.0, 5.0)
    assert renorm_limits(7, 3.0, 5.0) == (3.0, 5.0)
    # the module follows num_batches_tracked: plain BN for the first steps, then renorm
    t = nn.BatchNorm2d(2).double()
    m = bnkit.nn.BatchRenorm2d(2, r_max=3.0, d_max=5.0, r_max_warmup=(2, 4), d_max_warmup=(2, 3)).double()
    with torch.no_grad():
        for mod in (t, m):
            mod.running_mean.fill_(10.0)
            mod.running_var.fill_(100.0)
    for step in range(2):
        x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(m(x), t(x))
        assert m.current_limits() == renorm_limits(step + 1, 3.0, 5.0, (2, 4), (2, 3))
    m(torch.randn(4, 2, 3, 3, dtype=torch.float64))
    assert m.current_limits() == (2.0, 5.0)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    assert not torch.allclose(m(x), F.batch_norm(x, None, None, m.weight, m.bias, True))


def test_errors_and_state_dict():
    with pytest.raises(ValueError, match="r_max"):
        bnkit.nn.BatchRenorm2d(3, r_max=0.5)
    with pytest.raises(ValueError, match="d_max"):
        bnkit.nn.BatchRenorm2d(3, d_max=-1.0)
    with pytest.raises(ValueError, match="r_max_warmup"):
        bnkit.nn.BatchRenorm2d(3, r_max_warmup=(10, 5))
    assert list(bnkit.nn.BatchRenorm2d(3).state_dict()) == list(nn.BatchNorm2d(3).state_dict())
