"""The textbook (bnkit.reference) against hand-derived values, float64 math and torch."""

import pytest
import torch
import torch.nn.functional as F

import bnkit
import bnkit.functional as BF
from bnkit import reference as ref


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_reference_matches_torch(shape, training):
    x = torch.randn(shape, dtype=torch.float64) * 3 - 2
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    y, nm, nv = ref.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-5)
    rm_t, rv_t = rm.clone(), rv.clone()
    torch.testing.assert_close(y, F.batch_norm(x, rm_t, rv_t, w, b, training, 0.2, 1e-5))
    torch.testing.assert_close(nm, rm_t)
    torch.testing.assert_close(nv, rv_t)


def test_statistics_by_hand():
    # channel 0: values 1, 2, 3, 6 -> mean 3, biased var (4 + 1 + 0 + 9) / 4 = 3.5, unbiased 14 / 3
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [6.0, 4.0]], dtype=torch.float64)
    mean, var = ref.batch_stats(x)
    torch.testing.assert_close(mean, torch.tensor([3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(var, torch.tensor([3.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(ref.unbiased_var(var, 4), torch.tensor([14 / 3, 4.0], dtype=torch.float64))
    new_mean, new_var = ref.update_running_stats(torch.zeros(2, dtype=torch.float64),
                                                 torch.ones(2, dtype=torch.float64), mean, var, 4, 0.25)
    torch.testing.assert_close(new_mean, torch.tensor([0.75, 0.25], dtype=torch.float64))
    torch.testing.assert_close(new_var, torch.tensor([0.75 + 0.25 * 14 / 3, 0.75 + 1.0], dtype=torch.float64))
    torch.testing.assert_close(ref.invstd(var, 0.5), 1 / torch.sqrt(var + 0.5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 1 / 3, 0.01])
def test_blend_running_is_torchs_update(dtype, momentum):
    # two samples m -/+ d per channel: torch's batch statistics are exact (mean m, unbiased var 2 d^2), so
    # its running statistics show its blend alone: in the statistics dtype, rounded once to the buffers'
    g = torch.Generator().manual_seed(5)
    m = torch.randint(-64, 64, (257,), generator=g).double() / 4
    d = torch.randint(1, 16, (257,), generator=g).double() / 8
    rm = (torch.randn(257, generator=g, dtype=torch.float64) * 3).to(dtype)
    rv = (torch.rand(257, generator=g, dtype=torch.float64) * 3 + 0.1).to(dtype)
    rm_t, rv_t = rm.clone(), rv.clone()
    F.batch_norm(torch.stack([m - d, m + d]).to(dtype), rm_t, rv_t, None, None, True, momentum, 1e-5)
    sd = ref.stats_dtype(dtype)
    new_mean, new_var = ref.blend_running(rm, m.to(sd), momentum), ref.blend_running(rv, (2 * d * d).to(sd), momentum)
    assert torch.equal(new_mean, rm_t) and torch.equal(new_var, rv_t)
    assert new_mean.dtype == dtype
    # update_running_stats is the blend with the variance made unbiased; the weight 1 - momentum given by a
    # caller that holds it (as a tensor of the statistics dtype) gives the same numbers
    both = ref.update_running_stats(rm, rv, m.to(sd), (d * d).to(sd), 2, momentum)
    assert torch.equal(both[0], new_mean) and torch.equal(both[1], new_var)
    take, keep = torch.tensor(momentum, dtype=sd), torch.tensor(1 - momentum, dtype=sd)
    assert torch.equal(ref.blend_running(rm, m.to(sd), take, keep), new_mean)


def test_merge_stats_is_chans_formula():
    x = torch.randn(10, dtype=torch.float64) * 5 + 100
    a, b = x[:3], x[3:]

    def part(t):
        return t.numel(), t.mean().reshape(1), ((t - t.mean()) ** 2).sum().reshape(1)

    n, mean, m2 = ref.merge_stats(*part(a), *part(b))
    assert n == 10
    torch.testing.assert_close(mean, x.mean().reshape(1))
    torch.testing.assert_close(m2, ((x - x.mean()) ** 2).sum().reshape(1))
    # an empty side leaves the other unchanged
    empty = (0, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    n2, mean2, m22 = ref.merge_stats(*empty, *part(x))
    assert n2 == 10
    torch.testing.assert_close(mean2, x.mean().reshape(1))
    torch.testing.assert_close(m22, m2)
    n3, _, _ = ref.merge_stats(*empty, *empty)
    assert n3 == 0


def test_momentum_none_is_the_cumulative_average():
    bn = bnkit.nn.BatchNorm1d(2, momentum=None).double()
    batches = [torch.randn(5, 2, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    for xb in batches:
        bn(xb)
    means = torch.stack([xb.mean(0) for xb in batches])
    variances = torch.stack([xb.var(0, unbiased=True) for xb in batches])
    # the running average starts from (0, 1) but the first batch has weight 1: plain average
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.num_batches_tracked.item() == 4


@pytest.mark.parametrize("impl", ["functional", "reference"])
def test_accuracy_large_mean_small_std_float32(impl):
    """mean 1e4, std 1e-2 in float32: no less accurate than torch against float64 math."""
    torch.manual_seed(0)
    x = (torch.randn(16, 3, 8, 8, dtype=torch.float64) * 1e-2 + 1e4).float()
    xd = x.double()  # the float64 reference sees exactly the float32 input
    dims = (0, 2, 3)
    mean64, var64 = xd.mean(dims), xd.var(dims, unbiased=True)
    y64 = (xd - mean64.view(1, -1, 1, 1)) / torch.sqrt(xd.var(dims, unbiased=False).view(1, -1, 1, 1) + 1e-5)

    def errors(fn):
        rm, rv = torch.zeros(3), torch.zeros(3)
        y = fn(x, rm, rv)  # momentum 1: the running stats are the batch's (unbiased) statistics
        return ((rm.double() - mean64).abs().max().item(),
                ((rv.double() - var64) / var64).abs().max().item(),
                (y.double() - y64).abs().max().item())

    def ours(x, rm, rv):
        if impl == "reference":
            y, nm, nv = ref.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)
            rm.copy_(nm)
            rv.copy_(nv)
            return y
        return BF.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)

    theirs = errors(lambda x, rm, rv: F.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5))
    mine = errors(ours)
    for name, a, t in zip(("mean", "var (relative)", "output"), mine, theirs, strict=True):
        assert a <= t, f"{name}: bnkit error {a:.3g} > torch error {t:.3g}"
    # and in absolute terms: the variance is right to float32 precision, not off by cancellation
    assert mine[1] < 1e-4
