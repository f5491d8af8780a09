"""The numba ``cpu`` backend against the reference backend, torch (the oracle) and float64.

Every primitive runs on every layout the backend accepts (contiguous (N,C,*), (N,C),
channels_last 2d/3d, an (N,C,L) view of (N,L,C) memory) and every dtype, on odd sizes,
with sizes chosen to hit both the serial path and the split-channel / split-row parallel paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import CPU_KERNEL, CPU_STATS, UNIT_SCALE, assert_close

import bnkit
from bnkit.kernels import backend_for, get_backend, last_backend, last_plan, recorded_plans, use_backend
from bnkit.kernels import base as kbase
from bnkit.kernels.cpu.plan import SERIAL_NUMEL, layout_of
from bnkit.kernels.reference import ReferenceBackend

REF = ReferenceBackend()

# Each primitive against the reference backend: outputs within CPU_KERNEL, per-channel reductions within
# CPU_STATS (bn_tolerances).
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _make(shape: tuple[int, ...], layout: str, dtype: torch.dtype, offset: float = 0.0, scale: float = 1.0):
    """A tensor of logical shape ``shape`` (N, C, *) with the memory ``layout`` asks for."""
    if layout == "ncl_view":  # (N, C, L) view of (N, L, C) memory
        n, c, length = shape
        return (torch.randn(n, length, c) * scale + offset).to(dtype).transpose(1, 2)
    x = (torch.randn(shape) * scale + offset).to(dtype)
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


# (layout, shapes): odd sizes (C=1, spatial 1, primes) and sizes above SERIAL_NUMEL that take the
# parallel paths (few channels: channels cut into parts; channels innermost: rows cut into parts).
CASES = [
    # short rows (S < ROW_STATS_MAX_S: statistics in memory order), a long-row fused case, few channels cut in parts
    # short rows of at most SHORT_ROW_S values (one loop per sample: ncs_affine_short), serial and cut in
    # segments; 7x7 rows in parallel row ranges
    # groups of channels for short float32/float64 rows (ncs_train_groups), the last group partial in (5, 67, 12, 12)
    ("contiguous", [(3, 5, 7, 11), (2, 1, 13), (5, 3, 1, 1), (2, 2, 3, 5, 7), (4, 64, 13, 11), (3, 11, 1031),
                    (6, 7, 3, 3), (3, 2000, 3, 3), (3, 600, 7, 7), (5, 67, 12, 12)]),
    ("contiguous_split", [(1, 2, 20000), (2, 1, 5, 4099)]),
    ("nc", [(7, 5), (2, 1), (1, 3), (11003, 3)]),
    ("channels_last", [(3, 5, 7, 11), (2, 4, 1, 1), (2, 3, 2, 3, 5), (16, 3, 31, 29)]),
    ("ncl_view", [(3, 5, 7), (2, 1, 11), (8, 13, 401)]),
]


def test_cases_reach_the_parallel_paths():
    assert sum(torch.Size(s).numel() > SERIAL_NUMEL for _, shapes in CASES for s in shapes) >= 4


def test_cases_reach_the_short_row_kernel():
    # (3, 2000, 3, 3) must run ncs_affine_short (T = 0 and its 4 x C*S constant tables) with its samples
    # cut into segments (Q > 1) when two threads share the work
    from bnkit.kernels.cpu import plan

    t, q, tab = plan._ncs_affine_plan(2, 3, 2000, 9, np.float32)
    assert t == 0 and q > 1 and tab.shape == (4, 2000 * 9) and plan.SHORT_ROW_S >= 9
    x = torch.randn(3, 2000, 3, 3)
    y = get_backend("cpu").forward_eval(x, torch.zeros(2000), torch.ones(2000), torch.zeros(2000))
    assert last_plan() == "affine/ncs"
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cases_reach_the_group_kernels(dtype):
    # (5, 67, 12, 12) must take groups of channels both ways, its last group partial
    from bnkit.kernels.cpu import plan

    nt = min(torch.get_num_threads(), 2)
    forward = plan.train_plan(nt, "ncs", 5, 67, 144, dtype)
    backward = plan.backward_plan(nt, "ncs", 5, 67, 144, dtype)
    assert forward[0] == "groups" and 1 < forward[1] < 67 and 67 % forward[1]
    assert backward[0] == "fused" and 1 < backward[1] < 67 and 67 % backward[1]
    cpu = get_backend("cpu")
    x = torch.randn(5, 67, 12, 12, dtype=dtype)
    with recorded_plans() as ran:
        y, mean, var = cpu.forward_train(x, None, None, 1e-5)
        cpu.backward_train(torch.randn_like(x), x, mean, torch.rsqrt(var + 1e-5), None)
    assert ran == ["train/groups", "backward/fused"]
    torch.testing.assert_close(y, REF.forward_train(x, None, None, 1e-5)[0])


def _close(actual, expected, dtype, table):
    """``actual`` against ``expected`` in float64, with the entry of the data's ``dtype`` in ``table``."""
    assert_close(actual.double(), expected.double(), dtype, table=table)


@pytest.fixture(scope="module")
def cpu():
    backend = get_backend("cpu")
    assert backend is not None, "numba backend failed to load"
    return backend


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,shapes", CASES, ids=[c[0] for c in CASES])
def test_primitives_match_reference(cpu, layout, shapes, dtype):
    for shape in shapes:
        x = _make(shape, layout, dtype, offset=3.0, scale=2.0)
        assert cpu.supports(x), (shape, layout, x.stride())
        c = shape[1]
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        w, b = torch.randn(c, dtype=sd), torch.randn(c, dtype=sd)

        y, mean, var = cpu.forward_train(x, w, b, 1e-5)
        y_r, mean_r, var_r = REF.forward_train(x, w, b, 1e-5)
        assert y.stride() == x.stride() and y.dtype == dtype and mean.dtype == sd and var.dtype == sd
        _close(mean, mean_r, dtype, CPU_STATS)
        _close(var, var_r, dtype, CPU_STATS)
        _close(y, y_r, dtype, CPU_KERNEL)

        scale, shift = torch.rand(c, dtype=sd) + 0.5, torch.randn(c, dtype=sd)
        e = cpu.forward_eval(x, mean_r, scale, shift)
        assert e.stride() == x.stride()
        _close(e, REF.forward_eval(x, mean_r, scale, shift), dtype, CPU_KERNEL)

        dy = _make(shape, layout, dtype)
        s0, s1 = cpu.backward_reduce(dy, x, mean_r)
        r0, r1 = REF.backward_reduce(dy, x, mean_r)
        m = x.numel() // c
        _close(s0 / m, r0 / m, dtype, CPU_STATS)
        _close(s1 / m, r1 / m, dtype, CPU_STATS)

        a, k, cc = torch.randn(c, dtype=sd), torch.randn(c, dtype=sd), torch.randn(c, dtype=sd)
        dx = cpu.backward_input(dy, x, mean_r, a, k, cc)
        assert dx.stride() == x.stride()
        _close(dx, REF.backward_input(dy, x, mean_r, a, k, cc), dtype, CPU_KERNEL)

        # Optional fused methods against their definition composed from the reference's primitives.
        inv = torch.rsqrt(var_r + 1e-5)
        for wt in (w, None):
            got = cpu.backward_train(dy, x, mean_r, inv, wt)
            want = kbase.backward_train(REF, dy, x, mean_r, inv, wt)
            assert got[0].stride() == x.stride() and got[0].dtype == dtype and got[1].dtype == sd
            _close(got[0], want[0], dtype, CPU_KERNEL)
            _close(got[1] / m, want[1] / m, dtype, CPU_STATS)
            _close(got[2] / m, want[2] / m, dtype, CPU_STATS)
        got = cpu.backward_eval(dy, x, mean_r, scale, inv)
        want = kbase.backward_eval(REF, dy, x, mean_r, scale, inv)
        assert got[0].stride() == x.stride() and got[0].dtype == dtype
        _close(got[0], want[0], dtype, CPU_KERNEL)
        _close(got[1] / m, want[1] / m, dtype, CPU_STATS)
        _close(got[2] / m, want[2] / m, dtype, CPU_STATS)


def test_eval_single_sample(cpu):
    x = torch.randn(1, 3, 1, 1)
    mean, scale, shift = torch.randn(3), torch.rand(3), torch.randn(3)
    _close(cpu.forward_eval(x, mean, scale, shift), REF.forward_eval(x, mean, scale, shift), torch.float32, CPU_KERNEL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_rounding_is_torchs(cpu, dtype):
    """Every 16-bit pattern, scaled by powers of two (exact in float32), rounds back as torch rounds:
    this covers the widening, round-to-nearest-even, subnormals, overflow to inf and NaN."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(1, 1, -1).expand(2, 1, -1).contiguous()  # 2 rows, 1 channel
    zero = torch.zeros(1)
    for p in (0, -3, -9, -14, 5, 13):
        k = torch.full((1,), 2.0**p)
        y = cpu.forward_eval(x, zero, k, zero)
        expected = (x.float() * 2.0**p).to(dtype)
        torch.testing.assert_close(y, expected, atol=0, rtol=0, equal_nan=True)


def test_unsupported_strides_fall_back(cpu):
    x = torch.randn(4, 3, 8, 8)[:, :, ::2]  # not dense: the kernels never see it
    assert layout_of(x) is None and not cpu.supports(x)
    assert not cpu.supports(torch.randn(4, 3, dtype=torch.complex64))
    with use_backend("cpu"):
        assert backend_for(x).name == "reference"
        y = bnkit.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))


def test_bad_input_raises_before_the_kernel(cpu):
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="mean"):
        cpu.forward_eval(x, torch.zeros(4), torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="weight"):
        cpu.forward_train(x, torch.ones(2), None, 1e-5)
    with pytest.raises(ValueError, match="unsupported"):
        cpu.forward_train(x[:, :, ::2], None, None, 1e-5)
    # dy with other strides than x: the reference does that call instead of a crash
    dy = torch.randn(4, 5, 3).transpose(1, 2)
    s0, _ = cpu.backward_reduce(dy, x, torch.zeros(3))
    _close(s0, dy.double().sum((0, 2)), torch.float32, CPU_STATS)


@pytest.mark.parametrize("layout", ["contiguous", "contiguous_long", "channels_last", "ncl_view"])
def test_gradients_through_functional(bn_path, layout):
    # contiguous_long: rows of >= 1024 values take the fused in-cache training backward.
    shape = {"ncl_view": (6, 4, 15), "contiguous_long": (3, 4, 1031)}.get(layout, (6, 4, 5, 3))
    layout = "contiguous" if layout == "contiguous_long" else layout
    x0 = _make(shape, layout, torch.float32, offset=1.0, scale=2.0)
    w0, b0 = torch.rand(4) + 0.5, torch.randn(4)
    dy = torch.randn(shape)
    results = {}
    for name in ("cpu", "reference", "torch"):
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        rm, rv = torch.zeros(4), torch.ones(4)
        for training in (True, False):
            if name == "torch":
                y = F.batch_norm(x, rm, rv, w, b, training=training)
            else:
                with use_backend(name):
                    y = bnkit.functional.batch_norm(x, rm, rv, w, b, training=training)
                    assert last_backend() == name
            (y * dy).sum().backward()
            grads = (x.grad.clone(), w.grad.clone(), b.grad.clone())
            results[name, training] = (y.detach(), *grads, rm.clone(), rv.clone())
            x.grad = w.grad = b.grad = None
    for training in (True, False):
        for other in ("reference", "torch"):
            for got, want in zip(results["cpu", training], results[other, training], strict=True):
                assert_close(got, want, table=UNIT_SCALE)


@pytest.mark.parametrize(
    "layout", ["contiguous", "contiguous-long-rows", "contiguous-groups", "channels_last", "nc", "ncl_view"]
)
def test_mean_accurate_on_offset_data(cpu, layout):
    """mean error <= 1e-4 sigma on data offset by 1000 (torch's channels_last path misses this)."""
    shape = {"nc": (4096, 8), "ncl_view": (16, 8, 256), "contiguous-long-rows": (4, 8, 40, 40),
             "contiguous-groups": (8, 16, 12, 12)}.get(layout, (16, 8, 16, 16))  # fmt: skip
    x = _make(shape, layout.split("-")[0], torch.float32, offset=1000.0)
    _, mean, var = cpu.forward_train(x, None, None, 1e-5)
    dims = [0, *range(2, x.dim())]
    x64 = x.double()
    sigma = x64.std(dims)
    assert ((mean.double() - x64.mean(dims)).abs() / sigma).max() <= 1e-4
    # the variance to the same 1e-4, relative only: the claim of this test, not a kind of comparison
    torch.testing.assert_close(var.double(), x64.var(dims, unbiased=False), rtol=1e-4, atol=0)


@pytest.mark.parametrize("kind", ["normal", "hard", "drifting"])
@pytest.mark.parametrize(
    "layout", ["contiguous", "contiguous-two-pass", "contiguous-long-rows", "channels_last", "nc"]
)
def test_max_error_no_worse_than_torch(cpu, kind, layout):
    """Max error of y against float64 no worse than torch's own (hard: mean 1e4, std 1e-2).

    drifting: each sample (and each position) carries its own offset of up to 30 standard
    deviations, so the blocks the kernels shift by their first value have means far from it.
    """
    offset, scale = (0.0, 1.0) if kind != "hard" else (1e4, 1e-2)
    # (8, 16, 12, 12) takes groups of channels (ncs_train_groups), (64, 16, 7, 7) the two passes
    shape = {"contiguous-long-rows": (4, 16, 36, 36), "nc": (2048, 16), "contiguous-two-pass": (64, 16, 7, 7)}.get(
        layout, (8, 16, 12, 12)
    )
    x = _make(shape, layout.split("-")[0], torch.float32, offset=offset, scale=scale)
    if kind == "drifting":
        ramp = torch.linspace(-30.0, 30.0, x.numel() // x.shape[1]).reshape(x.shape[0], *x.shape[2:])
        x = x + ramp.unsqueeze(1).to(memory_format=torch.contiguous_format).expand_as(x) + 100.0
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    exact = F.batch_norm(x.double(), None, None, w.double(), b.double(), training=True)
    ours = cpu.forward_train(x, w, b, 1e-5)[0].double()
    theirs = F.batch_norm(x, None, None, w, b, training=True).double()
    err_ours = (ours - exact).abs().max().item()
    err_torch = (theirs - exact).abs().max().item()
    assert err_ours <= err_torch * 1.05, (err_ours, err_torch)


def test_cpu_backend_ran_under_auto():
    x = torch.randn(4, 3, 5, 5)
    with use_backend("auto"):
        bnkit.functional.batch_norm(x, None, None, training=True)
    assert last_backend() == "cpu"


@pytest.mark.parametrize("training, running_stats", [(True, True), (False, True), (True, False)])
def test_gradcheck_float64_through_cpu_backend(bn_path, training, running_stats):
    # first and second derivatives (the double backward rebuilds the statistics in plain ops)
    x = (torch.randn(3, 2, 4, dtype=torch.float64) + 2).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        stats = (rm.clone(), rv.clone()) if running_stats else (None, None)
        return bnkit.functional.batch_norm(x, *stats, w, b, training=training)

    with use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))
        assert last_backend() == "cpu"


def test_launch_after_backend_load_uses_torchs_thread_count():
    # load_backend sets numba to one thread while it starts numba's threading layer; a launcher
    # that had already set two threads must not go on believing two are set.
    import numba

    from bnkit.kernels import cpu
    from bnkit.kernels.cpu import plan

    if min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS) < 2:
        pytest.fail("this test needs torch and numba to allow 2 threads (CI has 2 cores)")
    want = plan.threads(SERIAL_NUMEL)
    cpu.load_backend()
    assert plan.threads(SERIAL_NUMEL) == want
    assert numba.get_num_threads() == want


@pytest.mark.parametrize("layout", ["contiguous", "contiguous-groups", "contiguous-long-rows", "channels_last", "nc"])
@pytest.mark.parametrize("kind", ["sample-offsets", "outlier-first"])
def test_shifted_statistics_stay_accurate(cpu, layout, kind):
    """The kernels sum x - K around a shift K taken from the data (a value, or the mean so far).

    sample-offsets: each sample sits 1e3 away from the others with a spread of 1e-2, so a later
    row's mean is far (1e5 of its own standard deviations) from the shift it inherits.
    outlier-first: the first value of every channel, a natural shift, is 1e3 standard deviations out.
    """
    shape = {"contiguous-long-rows": (6, 4, 40, 40), "nc": (4096, 4), "contiguous-groups": (6, 16, 12, 12)}.get(
        layout, (6, 4, 12, 12)
    )
    x = _make(shape, layout.split("-")[0], torch.float32, scale=1e-2 if kind == "sample-offsets" else 1.0)
    if kind == "sample-offsets":
        offsets = torch.linspace(-1e3, 1e3, x.shape[0]).view(-1, *[1] * (x.dim() - 1))
        x = x + offsets  # keeps x's memory format
    else:  # the first value of every channel, in either memory order
        x = x.clone()
        x[(0, slice(None)) + (0,) * (x.dim() - 2)] = 1e3
    dims = [0, *range(2, x.dim())]
    _, mean, var = cpu.forward_train(x, None, None, 1e-5)
    x64 = x.double()
    # relative only, a few float32 ulps (2**-23 is 1.2e-7): a shift lost to the far samples costs digits
    torch.testing.assert_close(var.double(), x64.var(dims, unbiased=False), rtol=2e-6, atol=0)
    assert ((mean.double() - x64.mean(dims)).abs() / x64.std(dims)).max() <= 1e-4


@pytest.mark.parametrize("shape, path", [((256, 4, 7, 7), "rows"), ((48, 64, 12, 12), "groups")])
def test_short_rows_first_sample_far_from_the_rest(cpu, shape, path):
    """Short rows are summed around a shift taken from the channel's first row. With a first sample 1e4
    away from the rest the variance must still be float64's rounded to float32 (at most 2**-24 relative):
    float32 row sums around that shift would not keep that bound."""
    from bnkit.kernels.cpu import plan

    nt = min(torch.get_num_threads(), 2)
    assert plan.train_plan(nt, "ncs", shape[0], shape[1], shape[2] * shape[3], torch.float32)[0] == path
    x = torch.randn(shape)
    x[0] += 1e4
    dims = [0, 2, 3]
    _, mean, var = cpu.forward_train(x, None, None, 1e-5)
    assert last_plan() == "train/" + path
    x64 = x.double()
    torch.testing.assert_close(var.double(), x64.var(dims, unbiased=False), rtol=1.2e-7, atol=0)
    assert ((mean.double() - x64.mean(dims)).abs() / x64.std(dims)).max() <= 1e-6


@pytest.mark.parametrize("offset", [1e4, 1e6, 1e8], ids=["folded", "unfolded", "unfolded-constant"])
def test_channels_last_normalize_rounds_once(cpu, offset):
    """float32 channels-innermost training outputs are float64's, rounded once (within an ulp).

    With |mean * scale| <= FOLD_MAX (mean 1e4, std 1e-2: about 2**20) the normalize runs as
    x * scale + (shift - mean * scale); above it (mean 1e6: about 2**27) as (x - mean) * scale + shift.
    At 1e8 every float32 value is the mean (std 0, scale 1/sqrt(eps)): y must be the bias, where the
    folded form would be off by about 2**-52 * |mean * scale|, 1e-5 here.
    """
    from bnkit.kernels.cpu import passes as kcpu

    x = _make((16, 8, 9, 7), "channels_last", torch.float32, offset=offset, scale=1e-2)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    y, mean, var = cpu.forward_train(x, w, b, 1e-5)
    x64 = x.double()
    m64, v64 = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    scale = w.double() / (v64 + 1e-5).sqrt()
    assert ((m64.abs() * scale).max().item() <= kcpu.FOLD_MAX) == (offset == 1e4)
    exact = (x64 - m64.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
    torch.testing.assert_close(y.double(), exact, atol=2**-26, rtol=2**-23)


# One shape per training-forward path of the launcher: groups of channels (float32/float64; 16-bit
# data takes the short rows there), short rows in memory order, long rows fused per channel, few
# channels cut in parts, channels innermost (channels_last, (N, C)).
RUNNING_CASES = [
    ("contiguous", (5, 67, 12, 12)),
    ("contiguous", (3, 67, 7, 7)),
    ("contiguous", (4, 67, 300)),
    ("contiguous", (1, 2, 20000)),
    ("channels_last", (16, 67, 5, 7)),
    ("nc", (300, 67)),
]


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "new-vectors"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,shape", RUNNING_CASES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in RUNNING_CASES])
def test_running_update_in_the_kernel_call_is_the_reference_update(cpu, layout, shape, dtype, inplace):
    # forward_train(..., running) updates the running statistics in its compiled call: the same
    # bits as reference.update_running_stats on the batch statistics (the torch ops it replaces;
    # 67 channels: a fused multiply-add would change some), and the same y, mean and var
    from bnkit import reference as ref

    x = _make(shape, layout, dtype, offset=3.0)
    c = shape[1]
    sd = ref.stats_dtype(dtype)
    w, b = torch.rand(c, dtype=sd) + 0.5, torch.randn(c, dtype=sd)
    y0, mean0, var0 = cpu.forward_train(x, w, b, 1e-5)
    count = x.numel() // c
    for momentum in (0.1, 1 / 3):
        rm, rv = torch.randn(c, dtype=sd), torch.rand(c, dtype=sd) + 0.5
        exp_mean, exp_var = ref.update_running_stats(rm, rv, mean0, var0, count, momentum)
        if inplace:
            new_mean, new_var = rm, rv
        else:
            new_mean, new_var = torch.full_like(rm, float("nan")), torch.full_like(rv, float("nan"))
            rm0, rv0 = rm.clone(), rv.clone()
        y, mean, var = cpu.forward_train(x, w, b, 1e-5, (rm, rv, new_mean, new_var, momentum))
        assert torch.equal(y, y0) and torch.equal(mean, mean0) and torch.equal(var, var0)
        assert torch.equal(new_mean, exp_mean) and torch.equal(new_var, exp_var)
        if not inplace:
            assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_running_update_rejects_vectors_it_cannot_write(cpu):
    x = torch.randn(4, 3, 5)
    good = torch.zeros(3)
    bads = (torch.zeros(4), torch.zeros(3, dtype=torch.float64), torch.zeros(6)[::2], torch.zeros(3).requires_grad_())
    for bad in bads:
        with pytest.raises(ValueError, match="cpu backend: running_var"):
            cpu.forward_train(x, None, None, 1e-5, (good, bad, good.clone(), good.clone(), 0.1))
    with pytest.raises(ValueError, match="at least 2 values"):
        cpu.forward_train(torch.randn(1, 3), None, None, 1e-5, (good, good.clone(), good, good, 0.1))


@pytest.mark.parametrize("inplace", [False, True], ids=["new-vectors", "in-place"])
@pytest.mark.parametrize("count", [2, 3, 49, 1000])
@pytest.mark.parametrize("momentum", [0.1, 0.5, 1 / 3, 0.0, 1.0, 0.01])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compiled_running_update_is_the_reference_bit_for_bit(dtype, momentum, count, inplace):
    # cpu.update_running, the one compiled update every training driver ends with, against
    # reference.update_running_stats: the same bits, written to new vectors or into the buffers themselves
    from bnkit import reference as ref
    from bnkit.kernels.cpu import passes as kcpu

    g = torch.Generator().manual_seed(count)
    c = 37
    rm = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) * 3
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    mean = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    var = (torch.rand(c, generator=g, dtype=torch.float64) * 5).to(dtype)
    want_mean, want_var = ref.update_running_stats(rm, rv, mean, var, count, momentum)
    np_sd = np.float32 if dtype == torch.float32 else np.float64
    scalars = (np_sd(count / (count - 1)), np_sd(1 - momentum), np_sd(momentum))
    if inplace:
        new_mean, new_var = rm, rv
    else:
        new_mean, new_var = torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype)
        rm0, rv0 = rm.clone(), rv.clone()
    running = (rm.numpy(), rv.numpy(), new_mean.numpy(), new_var.numpy(), *scalars)
    kcpu.update_running(mean.numpy(), var.numpy(), running)
    assert torch.equal(new_mean, want_mean) and torch.equal(new_var, want_var)
    if not inplace:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_kernel_modules_do_not_import_their_launcher():
    # layers: the launcher (backend) imports the kernel modules and the plan, never the other way round
    import ast
    from pathlib import Path

    from bnkit.kernels.cpu import backend

    folder = Path(backend.__file__).parent
    for name in ("passes", "half", "drivers", "act", "plan", "cache"):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "bnkit.kernels.cpu.backend" not in imported, name
