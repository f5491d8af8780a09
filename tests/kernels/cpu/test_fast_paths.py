"""The per-call fast paths give the numbers of the slow paths they stand in for, bit for bit.

Each fast path (cheap argument checks, eval coefficients in one kernel, running statistics with
cached scalars, autograd skipped when nothing needs a gradient, cached layouts and numpy views)
is compared with the torch expression it replaces, which is what bnkit computed before.
"""

import pytest
import torch
from bn_tolerances import ELEMENTWISE, assert_close

import bnkit.functional as F
from bnkit import autograd
from bnkit import reference as ref
from bnkit.functional.args import _plain_args
from bnkit.kernels import get_backend, use_backend

cpu = get_backend("cpu")
needs_cpu = pytest.mark.skipif(cpu is None, reason="numba backend failed to load")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _awkward(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Positive, zero, negative, tiny, huge, inf and nan values."""
    g = torch.Generator().manual_seed(n)
    v = torch.randn(n, generator=g, dtype=torch.float64).exp() ** 3
    special = [0.0, -0.0, -1.0, 1e-45, 1e-39, 1e38, float("inf"), float("nan"), -1e-6]
    special = torch.tensor(special, dtype=torch.float64)
    return torch.cat([v, special]).to(dtype)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-5, 0.0, 0.1, 1e-3])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_coefficients_match_torch_ops(dtype, eps, affine):
    # the eval forward with scale/shift from cpu.eval_coeffs == forward_eval with autograd's torch ops
    rv = _awkward(200, dtype)
    c = rv.numel()
    g = torch.Generator().manual_seed(1)
    rm = torch.randn(c, generator=g, dtype=dtype)
    w = torch.randn(c, generator=g, dtype=dtype) if affine else None
    b = torch.randn(c, generator=g, dtype=dtype) if affine else None
    x = torch.randn(3, c, 5, generator=g, dtype=dtype)
    inv = torch.rsqrt(rv + eps)
    scale = inv if w is None else inv * w
    shift = torch.zeros_like(scale) if b is None else b
    expected = cpu.forward_eval(x, rm, scale, shift)
    got = cpu.forward_eval_running(x, rm, rv, w, b, eps)
    assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.5, 1.0, 0.0, 1 / 3])
@pytest.mark.parametrize("count", [2, 7, 1024, 100003])
def test_running_stats_fast_path_matches_reference(dtype, momentum, count):
    g = torch.Generator().manual_seed(count)
    rm, rv, mean = (torch.randn(37, generator=g, dtype=dtype) * 100 for _ in range(3))
    var = torch.rand(37, generator=g, dtype=dtype) * 50
    exp_mean, exp_var = ref.update_running_stats(rm, rv, mean, var, count, momentum)
    new_mean, new_var = F.updated_running_stats(rm, rv, mean, var, count, momentum)
    assert new_mean is not rm and new_var is not rv  # new tensors, nothing mutated
    assert torch.equal(_bits(new_mean), _bits(exp_mean))
    assert torch.equal(_bits(new_var), _bits(exp_var))


def test_running_stats_fast_path_reads_scalars_as_given():
    # the same (value, dtype) from the cache twice, and a different one for another momentum
    rm, rv, mean, var = torch.zeros(3), torch.ones(3), torch.ones(3), torch.full((3,), 2.0)
    a = F.updated_running_stats(rm, rv, mean, var, 3, 0.25)
    b = F.updated_running_stats(rm, rv, mean, var, 3, 0.25)
    c = F.updated_running_stats(rm, rv, mean, var, 3, 0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], torch.full((3,), 0.25))
    torch.testing.assert_close(a[1], torch.full((3,), 0.75 + 0.25 * 3.0))
    torch.testing.assert_close(c[1], torch.full((3,), 0.5 + 0.5 * 3.0))


@pytest.mark.parametrize("training", [True, False])
def test_no_graph_when_nothing_needs_a_gradient(bn_path, training):
    # grad mode on but no input requires grad, or grad mode off: same output, no graph, same stats
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    stats = [(rm.clone(), rv.clone()) for _ in range(3)]
    y_graph = F.batch_norm(x, *stats[0], w, b, training=training)
    with torch.no_grad():
        y_nograd = F.batch_norm(x, *stats[1], w, b, training=training)
    y_plain = F.batch_norm(x, *stats[2], w.detach(), b.detach(), training=training)
    assert y_graph.grad_fn is not None
    assert y_nograd.grad_fn is None and not y_nograd.requires_grad
    assert y_plain.grad_fn is None and not y_plain.requires_grad
    assert torch.equal(y_graph.detach(), y_nograd) and torch.equal(y_nograd, y_plain)
    for m, v in stats[1:]:
        assert torch.equal(m, stats[0][0]) and torch.equal(v, stats[0][1])


def test_forward_ad_still_reaches_the_function():
    # a dual input under a forward-AD level goes through the autograd.Function (not the graph-free fast
    # call), whose jvp gives torch's tangent
    x, tx = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    fwad = torch.autograd.forward_ad
    tangents = []
    for bn in (F.batch_norm, torch.nn.functional.batch_norm):
        with fwad.dual_level():
            y = bn(fwad.make_dual(x, tx), torch.zeros(3), torch.ones(3), training=True)
            tangents.append(fwad.unpack_dual(y).tangent)
    assert tangents[0] is not None
    torch.testing.assert_close(tangents[0], tangents[1])


@pytest.mark.parametrize(
    "args, training",
    [
        ((torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3)), True),
        ((torch.zeros(3), torch.ones(3), None, None), False),
        ((None, None, torch.ones(3), None), True),
    ],
)
def test_plain_args_accepts_only_what_the_full_checks_accept(args, training):
    x = torch.randn(4, 3, 2)
    assert _plain_args(x, *args, training)
    F.check_batch_norm_args(x, *args, training)


@pytest.mark.parametrize(
    "x, args, training",
    [
        (torch.randn(4, 3), (torch.zeros(4), torch.ones(3), None, None), True),  # running_mean size
        (torch.randn(4, 3), (None, None, None, None), False),  # eval without running stats
        (torch.randn(4, 3), (torch.zeros(3), None, None, None), True),  # only one running stat
        (torch.randn(4, 3), (torch.zeros(3, 1), torch.ones(3), None, None), True),  # 2-d running stat
        (torch.randn(4, 3), (torch.zeros(3, dtype=torch.float64), torch.ones(3), None, None), True),  # dtype
        (torch.randn(4, 3).bfloat16(), (torch.zeros(3), torch.ones(3), None, None), False),  # mixed precision
        (torch.randn(4, 3), (torch.zeros(3), torch.ones(3), torch.ones(2), None), True),  # weight size
        (torch.randn(4, 3), (torch.zeros(3), torch.ones(3), None, torch.ones(3).half()), True),  # bias dtype
        (torch.randn(4, 3), ([0.0, 0.0, 0.0], torch.ones(3), None, None), True),  # not a tensor
        (torch.randn(4), (torch.zeros(4), torch.ones(4), None, None), True),  # rank 1
        (torch.randint(0, 3, (4, 3)), (torch.zeros(3), torch.ones(3), None, None), True),  # integer input
    ],
)
def test_plain_args_leaves_everything_else_to_the_full_checks(x, args, training):
    assert not _plain_args(x, *args, training)


@needs_cpu
def test_layout_cache_keys_on_shape_and_strides():
    from bnkit.kernels.cpu.plan import _layout_uncached, layout_of

    x = torch.randn(2, 3, 4, 5)
    cases = [x, x.to(memory_format=torch.channels_last), x.transpose(2, 3), x[:, :, ::2], torch.randn(6, 4),
             torch.randn(5, 7, 3).transpose(1, 2), torch.randn(2, 1, 4, 4), torch.randn(0, 3, 2)]
    for _ in range(2):  # computed, then cached
        for t in cases:
            assert layout_of(t) == _layout_uncached(t)


def test_eager_scalar_cache_gives_python_scalar_numbers():
    v = torch.rand(50) * 1e3
    for value in (1e-5, 0.1, 1 / 3, 1 - 0.1):
        for dtype in (torch.float32, torch.float64):
            t = v.to(dtype)
            assert torch.equal(t * autograd.cached_scalar(value, dtype), t * value)
            assert torch.equal(t + autograd.cached_scalar(value, dtype), t + value)


@needs_cpu
def test_module_steps_match_functional(bn_path):
    # the module's fast paths (buffer reads, num_batches_tracked increment) keep torch's bookkeeping
    import bnkit.nn as bnn

    torch.manual_seed(0)
    m = bnn.BatchNorm2d(4, momentum=None)
    t = torch.nn.BatchNorm2d(4, momentum=None)
    with use_backend("cpu"):
        for _ in range(3):
            x = torch.randn(5, 4, 3, 3)
            torch.testing.assert_close(m(x), t(x))
    assert m.num_batches_tracked.item() == 3 and m.num_batches_tracked.dtype == torch.long
    torch.testing.assert_close(m.running_mean, t.running_mean)
    torch.testing.assert_close(m.running_var, t.running_var)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in every other element of a longer vector: running statistics that the compiled update
    does not take (it writes contiguous vectors through raw memory), so the torch ops update them."""
    out = torch.zeros(2 * t.numel(), dtype=t.dtype)[::2]
    return out.copy_(t)


def _spec_update(x, rm, rv, momentum):
    """reference.update_running_stats from the batch statistics the checked road normalizes ``x`` with."""
    _, mean, var = autograd.train(x.detach(), None, None, 1e-5)
    return ref.update_running_stats(rm, rv, mean, var, ref.count_per_channel(x), momentum)


@needs_cpu
@pytest.mark.parametrize("bn_path", ["regular"], indirect=True)  # the checked road: one set of kernels for both
@pytest.mark.parametrize("grad", [False, True], ids=["no-graph", "graph"])
@pytest.mark.parametrize(
    "dtype,layout", [(torch.float32, "contiguous"), (torch.float64, "contiguous"), (torch.float32, "channels_last"),
                     (torch.bfloat16, "contiguous"), (torch.float16, "channels_last")],
)  # fmt: skip
def test_compiled_running_update_matches_the_torch_ops(bn_path, dtype, layout, grad):
    # batch_norm (in place), batch_norm_pure and a module step, with contiguous running statistics (updated
    # in the cpu backend's compiled call) and with the same values in strided vectors (updated by the torch
    # ops): each road's running statistics are the spec's bits, y and the gradients are the same bits on
    # both; the buffers' versions move as copy_ moves them, and batch_norm_pure mutates nothing
    from bnkit.nn import BatchNorm2d

    sd = ref.stats_dtype(dtype)
    x0 = (torch.randn(6, 67, 9, 8) * 2 + 3).to(dtype)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    w0, b0 = torch.rand(67, dtype=sd) + 0.5, torch.randn(67, dtype=sd)
    rm0, rv0 = torch.randn(67, dtype=sd), torch.rand(67, dtype=sd) + 0.5
    dy = torch.randn_like(x0)

    def step(mode, lay_out):
        x, w, b = (t.clone().requires_grad_(grad) for t in (x0, w0, b0))
        rm, rv = lay_out(rm0.clone()), lay_out(rv0.clone())
        versions = rm._version, rv._version
        if mode == "inplace":
            y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
            out = (rm, rv)
            assert (rm._version, rv._version) == (versions[0] + 1, versions[1] + 1)
        elif mode == "pure":
            y, new_mean, new_var = F.batch_norm_pure(x, rm, rv, w, b, True, 1 / 3, 1e-5)
            assert torch.equal(rm, rm0) and torch.equal(rv, rv0) and new_mean is not rm
            out = (new_mean, new_var)
        else:
            m = BatchNorm2d(67, dtype=sd)
            with torch.no_grad():
                m.weight.copy_(w0)
                m.bias.copy_(b0)
            m.running_mean, m.running_var = rm, rv
            y = m(x)
            out = (m.running_mean, m.running_var, m.num_batches_tracked)
        grads = ()
        if grad:
            y.backward(dy)
            grads = (x.grad, w.grad, b.grad) if mode != "module" else (x.grad, m.weight.grad, m.bias.grad)
        return y, *out, *grads

    with use_backend("cpu"):
        for mode in ("inplace", "pure", "module"):
            spec = _spec_update(x0, rm0, rv0, 1 / 3 if mode == "pure" else 0.1)
            compiled, torch_ops = step(mode, lambda t: t), step(mode, _strided)
            if mode != "pure":  # the buffers themselves: still strided, so the torch ops wrote them
                assert not torch_ops[1].is_contiguous()
            for got in (compiled, torch_ops):
                assert torch.equal(_bits(got[1]), _bits(spec[0])) and torch.equal(_bits(got[2]), _bits(spec[1])), mode
            assert len(compiled) == len(torch_ops)
            for a, e in zip(compiled, torch_ops, strict=True):
                assert torch.equal(_bits(a), _bits(e)), mode


@needs_cpu
def test_one_buffer_as_both_running_statistics_gets_torchs_numbers(bn_path):
    # torch's kernel writes the running mean before it reads the running variance: with one buffer
    # passed as both, the variance's update starts from the updated mean (the torch ops would not)
    x = torch.randn(6, 5, 9, 8) + 2
    shared = torch.rand(5) + 0.5
    expected = shared.clone()
    torch.nn.functional.batch_norm(x, expected, expected, None, None, True, 0.1, 1e-5)
    with use_backend("cpu"):
        F.batch_norm(x, shared, shared, None, None, True, 0.1, 1e-5)
    assert_close(shared, expected, table=ELEMENTWISE)


@needs_cpu
def test_compiled_running_update_leaves_odd_statistics_to_torch_ops(bn_path):
    # a tensor momentum and 16-bit running statistics (the compiled update takes a float momentum and vectors
    # of the statistics dtype): the torch ops update them, with the spec's bits and torch's numbers
    x = torch.randn(6, 5, 9, 8) + 2
    with use_backend("cpu"):
        rm, rv = torch.zeros(5), torch.ones(5)
        momentum = torch.tensor(0.1)
        F.batch_norm(x, rm, rv, None, None, True, momentum, 1e-5)
        spec = _spec_update(x, torch.zeros(5), torch.ones(5), momentum)
        assert torch.equal(rm, spec[0]) and torch.equal(rv, spec[1])
        rm_t, rv_t = torch.zeros(5), torch.ones(5)
        torch.nn.functional.batch_norm(x, rm_t, rv_t, None, None, True, 0.1, 1e-5)
        torch.testing.assert_close((rm, rv), (rm_t, rv_t))
        xb = x.bfloat16()
        rm, rv = torch.zeros(5, dtype=torch.bfloat16), torch.ones(5, dtype=torch.bfloat16)
        F.batch_norm(xb, rm, rv, None, None, True)
        spec = _spec_update(xb, torch.zeros(5, dtype=torch.bfloat16), torch.ones(5, dtype=torch.bfloat16), 0.1)
        assert torch.equal(rm, spec[0]) and torch.equal(rv, spec[1])
        rm_t, rv_t = rm.clone().zero_(), rv.clone().fill_(1)
        torch.nn.functional.batch_norm(xb, rm_t, rv_t, None, None, True)
        torch.testing.assert_close((rm, rv), (rm_t, rv_t))
