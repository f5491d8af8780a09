"""Ghost batch norm vs its definition (Hoffer et al. 2017), written here in plain torch ops."""

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import OUTPUT, SHORT, TRAINING, VARIANT, assert_close
from torch import nn

import bnkit
import bnkit.functional as bf
from bnkit import autograd
from bnkit import reference as ref

EPS = 1e-5


def bn_train_ref(x, w, b):
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims)
    var = ((x - mean.view(shape)) ** 2).mean(dims)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS) * w.view(shape) + b.view(shape)
    m = x.numel() // x.shape[1]
    return y, mean.detach(), var.detach() * m / (m - 1)


def ghost_ref(x, rm, rv, w, b, vbs, momentum, update="per_virtual_batch"):
    """Virtual batches of vbs samples (the last one holds the remainder), one EMA step each."""
    ys, stats = [], []
    for start in range(0, x.shape[0], vbs):
        y, mean, uvar = bn_train_ref(x[start:start + vbs], w, b)
        ys.append(y)
        stats.append((mean, uvar))
    if update == "per_virtual_batch":
        for mean, uvar in stats:
            rm = (1 - momentum) * rm + momentum * mean
            rv = (1 - momentum) * rv + momentum * uvar
    else:
        mean = sum(s[0] for s in stats) / len(stats)
        uvar = sum(s[1] for s in stats) / len(stats)
        rm = (1 - momentum) * rm + momentum * mean
        rv = (1 - momentum) * rv + momentum * uvar
    return torch.cat(ys), rm, rv


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    w = torch.randn(c, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    return x, w, b, torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)


@pytest.mark.parametrize("n,vbs", [(8, 4), (10, 4), (10, 3), (5, 8)])  # even, uneven (4,4,2), (3,3,3,1), one
@pytest.mark.parametrize("update", ["per_virtual_batch", "averaged"])
def test_matches_definition(n, vbs, update):
    x, w, b, rm, rv = _data((n, 3, 2, 3))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    yr, rmr, rvr = ghost_ref(xr, rm, rv, wr, br, vbs, 0.1, update)
    xb, wb, bb = (t.clone().requires_grad_() for t in (x, w, b))
    rmb, rvb = rm.clone(), rv.clone()
    yb = bf.ghost_batch_norm(xb, rmb, rvb, wb, bb, True, 0.1, EPS, virtual_batch_size=vbs,
                             running_stats_update=update)
    g = torch.randn_like(yr)
    yr.backward(g)
    yb.backward(g)
    for got, want in ((yb, yr), (xb.grad, xr.grad), (wb.grad, wr.grad), (bb.grad, br.grad), (rmb, rmr), (rvb, rvr)):
        assert_close(got, want, table=VARIANT)


def test_running_stats_take_one_step_per_virtual_batch():
    # hand-derived: two virtual batches of constant channels 0 and 2 (unbiased var 0),
    # momentum 0.5: rm = 0.5 * (0.5 * 0 + 0.5 * 0) + 0.5 * 2 = 1.0 ... computed explicitly
    x = torch.cat([torch.zeros(2, 1, 2), torch.full((2, 1, 2), 2.0)]).double()
    x[0, 0, 0] = 1.0  # keep variance non-zero in the first virtual batch: values 1,0,0,0
    rm, rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    bf.ghost_batch_norm(x, rm, rv, None, None, True, 0.5, virtual_batch_size=2)
    # batch 1: mean 0.25, unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25; batch 2: mean 2, var 0
    # step 1: rm = 0.125, rv = 0.625; step 2: rm = 1.0625, rv = 0.3125
    torch.testing.assert_close(rm, torch.tensor([1.0625], dtype=torch.float64))
    torch.testing.assert_close(rv, torch.tensor([0.3125], dtype=torch.float64))


@pytest.mark.parametrize(
    "dtype, buffers",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float16),
     (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("update", ["averaged", "per_virtual_batch"])
def test_running_update_is_the_references(dtype, buffers, update):
    # bnkit.reference's moving average, bit for bit, from the statistics each virtual batch is normalized
    # with, for every buffer dtype the variant takes: blended in the statistics dtype and rounded once to
    # the buffers' dtype (torch's rule for float16/bfloat16 running statistics); one virtual batch is
    # torch's batch norm update
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(10, 16, 4, 5, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    rm = torch.randn(16, generator=g, dtype=torch.float64).to(buffers)
    rv = (torch.rand(16, generator=g, dtype=torch.float64) + 0.5).to(buffers)
    _, new_mean, new_var = bf.ghost_batch_norm_pure(
        x, rm, rv, None, None, True, 0.1, EPS, virtual_batch_size=4, running_stats_update=update
    )
    chunks = torch.split(x, 4)
    stats = [autograd.train(c, None, None, EPS)[1:] for c in chunks]
    unbiased = [ref.unbiased_var(var, ref.count_per_channel(c)) for (_, var), c in zip(stats, chunks, strict=True)]
    want_mean, want_var = rm, rv
    if update == "averaged":
        want_mean = ref.blend_running(rm, torch.stack([mean for mean, _ in stats]).mean(0), 0.1)
        want_var = ref.blend_running(rv, torch.stack(unbiased).mean(0), 0.1)
    else:
        for (mean, _), u in zip(stats, unbiased, strict=True):
            want_mean, want_var = ref.blend_running(want_mean, mean, 0.1), ref.blend_running(want_var, u, 0.1)
    assert new_mean.dtype == new_var.dtype == buffers
    assert torch.equal(new_mean, want_mean) and torch.equal(new_var, want_var)
    _, one_mean, one_var = bf.ghost_batch_norm_pure(
        x, rm, rv, None, None, True, 0.1, EPS, virtual_batch_size=10, running_stats_update=update
    )
    rm_t, rv_t = rm.clone(), rv.clone()
    F.batch_norm(x, rm_t, rv_t, None, None, True, 0.1, EPS)
    assert_close(one_mean, rm_t, table=OUTPUT)
    assert_close(one_var, rv_t, table=OUTPUT)


def test_gradcheck_uneven():
    x, w, b, rm, rv = _data((5, 2, 3))

    def f(x, w, b):
        return bf.ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=2)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("cls,torch_cls,shape", [
    (bnkit.nn.GhostBatchNorm1d, nn.BatchNorm1d, (10, 3)),
    (bnkit.nn.GhostBatchNorm2d, nn.BatchNorm2d, (10, 3, 2, 2)),
    (bnkit.nn.GhostBatchNorm3d, nn.BatchNorm3d, (10, 3, 2, 1, 2)),
])
def test_module(cls, torch_cls, shape):
    m = cls(3, 4, momentum=0.3).double()
    t = torch_cls(3).double()
    assert list(m.state_dict()) == list(t.state_dict())
    x, w, b, rm, rv = _data(shape)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    y_ref, rm_ref, rv_ref = ghost_ref(x, rm, rv, w, b, 4, 0.3)
    assert_close(m(x), y_ref, table=VARIANT)
    assert_close(m.running_mean, rm_ref, table=TRAINING)
    assert_close(m.running_var, rv_ref, table=TRAINING)
    assert int(m.num_batches_tracked) == 1  # counts forward calls, as torch
    m.eval()
    t.load_state_dict(m.state_dict())
    t.eval()
    assert_close(m(x), t(x), table=TRAINING)


def test_large_virtual_batch_is_plain_bn():
    m = bnkit.nn.GhostBatchNorm2d(3, 16).double()
    t = nn.BatchNorm2d(3).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x), t(x))
    torch.testing.assert_close(m.running_var, t.running_var)


def test_errors():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bnkit.nn.GhostBatchNorm2d(3, 0)
    with pytest.raises(ValueError, match="momentum=None"):
        bnkit.nn.GhostBatchNorm2d(3, 2, momentum=None)
    with pytest.raises(ValueError, match="running_stats_update"):
        bnkit.nn.GhostBatchNorm2d(3, 2, running_stats_update="keras")
    # a last virtual batch of a single value per channel cannot be normalized (torch's error)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnkit.nn.GhostBatchNorm1d(3, 4)(torch.randn(9, 3))
    with pytest.raises(NotImplementedError, match="mask"):
        bnkit.nn.GhostBatchNorm1d(3, 4)(torch.randn(8, 3), mask=torch.ones(8, dtype=torch.bool))


def test_channels_last_input():
    x = torch.randn(6, 3, 4, 4).to(memory_format=torch.channels_last)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    y = bf.ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=4)
    want = torch.cat([F.batch_norm(x[:4], None, None, w, b, True), F.batch_norm(x[4:], None, None, w, b, True)])
    assert_close(y, want, table=SHORT)
