"""Fused BN + activation vs batch norm followed by the activation, written here in plain torch ops."""

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import GRAD, OUTPUT, UNIT_SCALE, VARIANT, assert_close
from torch import nn

import bnkit
import bnkit.functional as bf
from bnkit import fused
from bnkit.kernels import forced_road, recorded_plans

EPS = 1e-5
ACTS = ["identity", "relu", "leaky_relu", "elu", "silu", "gelu"]
INVERTIBLE = ["identity", "leaky_relu", "elu"]
PARAM = {"leaky_relu": 0.1, "elu": 0.7}


def act_ref(y, activation, p):
    """The activations from their definitions."""
    if activation == "identity":
        return y
    if activation == "relu":
        return torch.where(y > 0, y, torch.zeros_like(y))
    if activation == "leaky_relu":
        return torch.where(y > 0, y, p * y)
    if activation == "elu":
        return torch.where(y > 0, y, p * (torch.exp(y) - 1))
    if activation == "silu":
        return y * torch.sigmoid(y)
    return 0.5 * y * (1 + torch.erf(y / 2**0.5))


def bn_act_ref(x, rm, rv, w, b, training, momentum, activation, p):
    """BN from its equations (biased var to normalize, unbiased to update), then the activation."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean = x.mean(dims)
        var = ((x - mean.view(shape)) ** 2).mean(dims)
        m = x.numel() // x.shape[1]
        new_rm = (1 - momentum) * rm + momentum * mean.detach()
        new_rv = (1 - momentum) * rv + momentum * var.detach() * m / (m - 1)
    else:
        mean, var, new_rm, new_rv = rm, rv, rm, rv
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS) * w.view(shape) + b.view(shape)
    return act_ref(y, activation, p), new_rm, new_rv


def _data(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5
    w = torch.randn(c, generator=g, dtype=dtype)
    b = torch.randn(c, generator=g, dtype=dtype) * 0.5
    rm = torch.randn(c, generator=g, dtype=dtype) * 0.1
    rv = torch.rand(c, generator=g, dtype=dtype) + 0.5
    return x, w, b, rm, rv


def _compare(activation, memory_saving, training, shape, dtype=torch.float64, w_override=None, inplace=False):
    x, w, b, rm, rv = _data(shape, dtype)
    if w_override is not None:
        w = w_override.to(dtype)
    p = PARAM.get(activation, 0.01)
    gz = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    # reference in float64
    xr, wr, br = (t.double().clone().requires_grad_() for t in (x, w, b))
    zr, rmr, rvr = bn_act_ref(xr, rm.double(), rv.double(), wr, br, training, 0.1, activation, p)
    zr.backward(gz.double())
    # bnkit
    xb = x.clone().requires_grad_()
    xin = xb * 1 if inplace else xb  # in-place needs a non-leaf
    wb, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
    rmb, rvb = rm.clone(), rv.clone()
    zb = bf.batch_norm_act(xin, rmb, rvb, wb, bb, training, 0.1, EPS, activation=activation, activation_param=p,
                           memory_saving=memory_saving, inplace=inplace)
    if inplace:
        assert zb is xin
    zb.backward(gz)
    # against the equations in float64; the parameter gradients are sums over the batch
    for got, want in ((zb.detach(), zr.detach()), (xb.grad, xr.grad), (rmb, rmr), (rvb, rvr)):
        assert_close(got.double(), want, dtype, table=VARIANT)
    assert_close(wb.grad.double(), wr.grad, dtype, table=GRAD)
    assert_close(bb.grad.double(), br.grad, dtype, table=GRAD)


@pytest.fixture
def composed():
    """The path composed from the backend primitives, whatever backend runs (kernels are tested below)."""
    with fused.forced_act_road("composed"):
        yield


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTS)
def test_standard_matches_reference(composed, activation, training):
    _compare(activation, False, training, (4, 3, 5, 6))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", INVERTIBLE)
@pytest.mark.parametrize("inplace", [False, True])
def test_memory_saving_matches_reference(composed, activation, training, inplace):
    _compare(activation, True, training, (4, 3, 5, 6), inplace=inplace)


@pytest.mark.parametrize("activation", ["leaky_relu", "silu"])
def test_float32_and_1d_3d(activation):
    _compare(activation, activation == "leaky_relu", True, (6, 3, 4, 5), dtype=torch.float32)
    _compare(activation, False, True, (7, 3))
    _compare(activation, False, True, (2, 3, 3, 4, 2))


@pytest.mark.parametrize("activation", INVERTIBLE)
def test_memory_saving_zero_and_tiny_weight_channels(composed, activation):
    # channel 0: w == 0 (xhat is gone from the output), channel 1: |w| << |b|, channel 2: normal
    w = torch.tensor([0.0, 1e-6, 1.3], dtype=torch.float64)
    for training in (True, False):
        _compare(activation, True, training, (4, 3, 5, 6), w_override=w)
        _compare(activation, True, training, (4, 3, 5, 6), w_override=w, inplace=True)


def test_memory_saving_chunks(composed):
    # several batch chunks, with a remainder, give the same gradients
    x, *_ = _data((5, 3, 4, 4))
    with fused.forced_act_road(chunk_elements=2 * x[0].numel()):
        _compare("leaky_relu", True, True, (5, 3, 4, 4))
        _compare("elu", True, True, (5, 3, 4, 4), w_override=torch.tensor([0.0, 1.0, 2.0]))


@fused.forced_act_road("kernels", chunk_elements=2 * 3 * 16)  # chunks of 2, 2 and 1 samples
def test_memory_saving_elu_kernels():
    # ELU's memory-saving backward: log1p from torch into dx (one pass) or, for dw/db alone, into a
    # chunk buffer (several chunks with a remainder); zero and tiny weight channels; float64, float32
    shape = (5, 3, 4, 4)
    for training in (True, False):
        for dtype in (torch.float64, torch.float32):
            with recorded_plans() as ran:
                _compare("elu", True, training, shape, dtype=dtype)
                _compare("elu", True, training, shape, dtype=dtype, w_override=torch.tensor([0.0, 1e-6, 1.3]))
            assert [p for p in ran if p.startswith("act_backward/")] == ["act_backward/rows_ms_elu"] * 2, ran
            # dw and db alone
            x, w, b, rm, rv = _data(shape, dtype)
            gz = torch.randn(shape, dtype=dtype)
            wr, br = w.double().clone().requires_grad_(), b.double().clone().requires_grad_()
            bn_act_ref(x.double(), rm.double(), rv.double(), wr, br, training, 0.1, "elu", 0.7)[0].backward(gz.double())
            wb, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
            with recorded_plans() as ran:
                bf.batch_norm_act(x, rm.clone(), rv.clone(), wb, bb, training, activation="elu", activation_param=0.7,
                                  memory_saving=True).backward(gz)
            assert [p for p in ran if p.startswith("act_backward/")] == ["act_backward/rows_ms_elu"], ran
            assert_close(wb.grad.double(), wr.grad, dtype, table=GRAD)
            assert_close(bb.grad.double(), br.grad, dtype, table=GRAD)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_memory_saving_elu_saturated_kernels_match_composed(dtype):
    # outputs saturated at -alpha (y < log(eps)) cannot be inverted; the kernels must clamp the way
    # the composed path does (finite gradients, the same ones), alpha == 1 (no division) and not
    x, _, b, *_ = _data((4, 3, 5, 6), dtype)
    w = torch.tensor([40.0, 1.0, 30.0], dtype=dtype)
    gz = torch.randn(x.shape, dtype=dtype)
    for alpha in (1.0, 0.7):
        grads = []
        for road in ("kernels", "composed"):
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            with fused.forced_act_road(road):
                z = bf.batch_norm_act(xs, None, None, ws, bs, True, activation="elu", activation_param=alpha,
                                      memory_saving=True)
                assert (z == -alpha).any()
                z.backward(gz)
            grads.append((xs.grad, ws.grad, bs.grad))
        for kern, comp in zip(*grads, strict=True):
            assert torch.isfinite(kern).all()
            assert_close(kern, comp, table=UNIT_SCALE)


@pytest.mark.parametrize("activation,memory_saving", [(a, False) for a in ACTS] + [(a, True) for a in INVERTIBLE])
def test_gradcheck(activation, memory_saving):
    x, w, b, rm, rv = _data((3, 2, 2, 3))
    p = PARAM.get(activation, 0.01)
    for training in (True, False):
        def f(x, w, b, training=training):
            return bf.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, activation=activation,
                                     activation_param=p, memory_saving=memory_saving)
        assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("activation", ACTS)
def test_gradgradcheck(activation):
    # relu and leaky_relu have kinks: keep the values away from 0 (the data is random, the
    # perturbation of gradgradcheck is 1e-6)
    x, w, b, rm, rv = _data((3, 2, 2, 3))
    p = PARAM.get(activation, 0.01)
    for training in (True, False):
        def f(x, w, b, training=training):
            return bf.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, activation=activation,
                                     activation_param=p)
        assert torch.autograd.gradgradcheck(f, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


def test_double_backward_matches_composed_and_memory_saving_says_no():
    x, w, b, rm, rv = _data((4, 3, 2, 2))
    penalties = []
    for ours_first in (True, False):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        if ours_first:
            z = bf.batch_norm_act(xs, rm.clone(), rv.clone(), ws, bs, True, activation="silu")
        else:  # the oracle: torch's batch norm, then torch's activation
            z = F.silu(F.batch_norm(xs, rm.clone(), rv.clone(), ws, bs, True))
        (gx,) = torch.autograd.grad(z.pow(2).sum(), xs, create_graph=True)
        gx.pow(2).sum().backward()  # a gradient penalty
        penalties.append((xs.grad, ws.grad, bs.grad))
    for ours, theirs in zip(*penalties, strict=True):
        assert_close(ours, theirs, table=GRAD)
    xs = x.clone().requires_grad_()
    z = bf.batch_norm_act(xs, None, None, w, b, True, activation="leaky_relu", memory_saving=True)
    with pytest.raises(RuntimeError, match="memory_saving=True has no double backward"):
        torch.autograd.grad(z.sum(), xs, create_graph=True)


def test_memory_saving_saves_only_the_output():
    x, w, b, *_ = _data((4, 3, 5, 6))
    x.requires_grad_()
    w.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = bf.batch_norm_act(x * 1, None, None, w, b, True, activation="leaky_relu", memory_saving=True,
                              inplace=True)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == z.data_ptr()
    # besides z only per-channel vectors: the parameters and the (2*C,) batch mean and variance
    assert all(t.numel() <= 2 * x.shape[1] for t in saved if t.numel() != x.numel())
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        xin = x * 1
        bf.batch_norm_act(xin, None, None, w, b, True, activation="gelu")
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == xin.data_ptr()  # standard mode, gelu: the input only
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        xin = x * 1
        z = bf.batch_norm_act(xin, None, None, w, b, True, activation="relu")
    # relu: the input and the output (act'(y) reads off it), what batch norm followed by torch's relu keeps
    assert sorted(t.data_ptr() for t in saved if t.numel() == x.numel()) == sorted([xin.data_ptr(), z.data_ptr()])


def _ops(fn) -> set[str]:
    """The names of the torch ops ``fn`` runs (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_memory_saving_lost_channel_check_only_when_autograd_records():
    # the lost-channel side tensor serves the backward only: inference (no_grad, or nothing that
    # requires grad) skips the check, so the lost channel's input is never gathered; with a graph it is,
    # and the gradients stay exact
    x, w, b, *_ = _data((4, 3, 5, 6))
    w = w.clone()
    w[1] = 0.0  # a lost channel
    out = []
    with torch.no_grad():
        ops = _ops(lambda: out.append(bf.batch_norm_act(x, None, None, w, b, True, activation="leaky_relu",
                                                        memory_saving=True)))
    ops |= _ops(lambda: out.append(bf.batch_norm_act(x, None, None, w, b, True, activation="leaky_relu",
                                                     memory_saving=True)))
    assert "aten::index_select" not in ops and torch.equal(out[0], out[1])
    wg = w.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    ops = _ops(lambda: out.append(bf.batch_norm_act(xg, None, None, wg, b, True, activation="leaky_relu",
                                                    memory_saving=True)))
    assert "aten::index_select" in ops
    z = out[-1]
    g = torch.randn_like(z)
    dx, dw = torch.autograd.grad(z, (xg, wg), g)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref_z = F.leaky_relu(F.batch_norm(x64, None, None, w64, b.double(), True), 0.01)
    rdx, rdw = torch.autograd.grad(ref_z, (x64, w64), g.double())
    assert_close(dx.double(), rdx, torch.float32, table=GRAD)  # float32 gradients against float64 math
    assert_close(dw.double(), rdw, torch.float32, table=GRAD)


def _peak_bytes(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_memory_saving_backward_is_chunked(activation):
    # Besides dx, the backward allocates only chunk-sized temporaries: with 16 chunks the
    # peak above the start stays well under two full-size tensors (dx + a little), while an
    # unchunked backward would need dx plus several full-size temporaries.
    shape = (16, 8, 32, 32)
    x = torch.randn(shape).requires_grad_()
    w = torch.rand(8).add_(0.5).requires_grad_()
    b = torch.randn(8).requires_grad_()
    with fused.forced_act_road(chunk_elements=x[0].numel()):
        z = bf.batch_norm_act(x, None, None, w, b, True, activation=activation, memory_saving=True)
        g = torch.randn(shape)
        full = x.numel() * x.element_size()
        peak = _peak_bytes(lambda: z.backward(g))
    assert peak < 1.75 * full, (peak, full)
    ref = torch.randn(shape).requires_grad_()
    zr = getattr(F, activation)(F.batch_norm(ref, None, None, w, b, True))
    assert _peak_bytes(lambda: zr.backward(g)) > peak


def test_errors():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="invertible"):
        bf.batch_norm_act(x, None, None, training=True, activation="relu", memory_saving=True)
    with pytest.raises(ValueError, match="activation_param > 0"):
        bf.batch_norm_act(x, None, None, training=True, activation="leaky_relu", activation_param=0.0,
                          memory_saving=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        bf.batch_norm_act(x, None, None, training=True, activation="tanh")
    with pytest.raises(ValueError, match="inplace=True needs memory_saving"):
        bf.batch_norm_act(x, None, None, training=True, inplace=True)
    with pytest.raises(ValueError, match="invertible"):
        bnkit.nn.BatchNormAct2d(3, activation="gelu", memory_saving=True)
    with pytest.raises(ValueError, match="more than 1 value"):
        bf.batch_norm_act(torch.randn(1, 3), None, None, training=True)


@pytest.mark.parametrize("cls,torch_cls,shape", [
    (bnkit.nn.BatchNormAct1d, nn.BatchNorm1d, (6, 3, 4)),
    (bnkit.nn.BatchNormAct2d, nn.BatchNorm2d, (4, 3, 5, 5)),
    (bnkit.nn.BatchNormAct3d, nn.BatchNorm3d, (2, 3, 3, 3, 2)),
])
@pytest.mark.parametrize("memory_saving", [False, True])
def test_module_loads_plain_bn_and_matches(cls, torch_cls, shape, memory_saving):
    t = torch_cls(3).double()
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.normal_()
        t.running_mean.normal_()
    m = cls(3, activation="leaky_relu", activation_param=0.2, memory_saving=memory_saving).double()
    m.load_state_dict(t.state_dict())
    assert list(m.state_dict()) == list(t.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(t, mode)()
        getattr(m, mode)()
        assert_close(m(x), F.leaky_relu(t(x), 0.2), table=OUTPUT)
        assert_close(m.running_mean, t.running_mean, table=OUTPUT)
        assert_close(m.running_var, t.running_var, table=OUTPUT)
    assert int(m.num_batches_tracked) == int(t.num_batches_tracked) == 1


def test_module_inplace_and_channels_last():
    m = bnkit.nn.BatchNormAct2d(3, activation="elu", activation_param=1.0, memory_saving=True, inplace=True)
    t = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    xr = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    inner = xb * 1
    out = m(inner)
    assert out is inner and out.is_contiguous(memory_format=torch.channels_last)
    ref = F.elu(t(xr))
    assert_close(out, ref, table=UNIT_SCALE)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert_close(xb.grad, xr.grad, table=UNIT_SCALE)
    assert_close(m.weight.grad, t.weight.grad, table=UNIT_SCALE)


def test_freeze_keeps_activation():
    m = nn.Sequential(bnkit.nn.BatchNormAct2d(3, activation="leaky_relu", activation_param=0.3))
    m(torch.randn(4, 3, 2, 2))
    x = torch.randn(4, 3, 2, 2)
    expected = F.leaky_relu(F.batch_norm(x, m[0].running_mean, m[0].running_var, m[0].weight, m[0].bias), 0.3)
    bnkit.freeze(m)
    torch.testing.assert_close(m(x), expected)


@pytest.fixture
def kernels():
    """Force the numba kernels of bnkit.kernels.cpu.act (used by default under the cpu backend)."""
    with fused.forced_act_road("kernels"):
        yield


@pytest.mark.parametrize("activation", ACTS)
def test_kernels_match_reference(kernels, activation):
    for training in (True, False):
        _compare(activation, False, training, (4, 3, 5, 6))
        _compare(activation, False, training, (6, 3, 4, 5), dtype=torch.float32)
        if activation in INVERTIBLE:
            for inplace in (False, True):
                _compare(activation, True, training, (4, 3, 5, 6), inplace=inplace)
                _compare(activation, True, training, (4, 3, 5, 6), inplace=inplace,
                         w_override=torch.tensor([0.0, 1e-6, 1.3]))
            _compare(activation, True, training, (6, 3, 4, 5), dtype=torch.float32)


@pytest.mark.parametrize("activation,memory_saving", [("gelu", False), ("elu", True)])
def test_kernels_gradcheck(kernels, activation, memory_saving):
    x, w, b, rm, rv = _data((3, 2, 2, 3))

    def f(x, w, b):
        return bf.batch_norm_act(x, None, None, w, b, True, activation=activation, activation_param=0.7,
                                 memory_saving=memory_saving)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))




@pytest.mark.parametrize("memory_saving", [False, True])
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
def test_kernels_row_fallback(kernels, activation, memory_saving):
    # Few channels for the threads (C < TASKS_PER_THREAD * threads on an input big enough to run
    # threaded) -> the memory-saving backward runs the row-parallel kernels instead of one task per
    # channel; the standard backward has no kernel of its own (torch's activation backward, then the batch
    # norm's backward).
    import numba

    if min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS) < 2:
        pytest.fail("this test needs torch and numba to allow 2 threads (CI has 2 cores)")
    shape = (4, 3, 64, 64)  # 49152 elements >= SERIAL_NUMEL, 3 channels
    backward = ["act_backward/rows_ms"] if memory_saving else []
    for training in (True, False):
        # float32 only: each dtype is another numba compilation of the row kernels (~3 s each, cold)
        with recorded_plans() as ran:
            _compare(activation, memory_saving, training, shape, dtype=torch.float32)
        assert [p for p in ran if p.startswith("act_backward/")] == backward, ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("memory_saving", [False, True])
def test_channel_kernels_take_groups_of_short_rows(kernels, dtype, memory_saving):
    # (5, 67, 12, 12): short rows -> the kernel backward takes groups of channels per task (the last one
    # partial); a training call this small runs plain batch norm's and torch's activation's instead
    shape = (5, 67, 12, 12)
    x = torch.empty(shape, dtype=dtype)
    g = fused._channel_group(x, 2)  # the backward reads dz and z
    assert 1 < g < 67 and 67 % g, g
    for training in (True, False):
        with recorded_plans() as ran:
            _compare("leaky_relu", memory_saving, training, shape, dtype=dtype)
        backward = ["act_backward/channels_ms"] if memory_saving else ([] if training else ["act_backward/channels"])
        # training: the batch norm's own forward (train/*), the activation in place; eval: one normalize pass
        forward = [] if training else ["act_forward/rows"]
        assert [p for p in ran if p.startswith("act_")] == [*forward, *backward], ran
        if training:
            assert any(p.startswith("train/") for p in ran), ran
        if training and not memory_saving:
            assert any(p.startswith("backward/small") for p in ran), ran


@pytest.mark.parametrize("memory_saving", [False, True])
def test_kernels_copy_strided_parameters_and_gradients(kernels, memory_saving):
    # the kernels read raw addresses: a strided weight and bias, and a gradient with other strides, reach them
    # as contiguous copies, with the numbers of contiguous ones bit for bit (both on the checked road: plain
    # batch norm's one-call road declines strided parameters)
    shape = (5, 67, 12, 12)
    x, w, b, rm, rv = _data(shape, torch.float32)
    gz = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    gz_strided = gz.transpose(2, 3).contiguous().transpose(2, 3)

    def run(strided, training):
        wb, bb = (torch.stack((t, torch.zeros_like(t)), 1).requires_grad_() for t in (w, b))  # (C, 2)
        weight, bias = (wb[:, 0], bb[:, 0]) if strided else (wb[:, 0].contiguous(), bb[:, 0].contiguous())
        xb = x.clone().requires_grad_()
        with forced_road("checked"), recorded_plans() as ran:
            z = bf.batch_norm_act(xb, rm.clone(), rv.clone(), weight, bias, training, activation="leaky_relu",
                                  activation_param=0.1, memory_saving=memory_saving)
            z.backward(gz_strided if strided else gz)
        return [z, xb.grad, wb.grad[:, 0], bb.grad[:, 0]], [p for p in ran if p.startswith("act_backward/")]

    for training in (True, False):
        want, ran = run(False, training)
        got, ran_strided = run(True, training)
        assert ran_strided == ran == ["act_backward/channels_ms" if memory_saving else "act_backward/channels"]
        for g, e in zip(got, want, strict=True):
            assert torch.equal(g, e)


@pytest.mark.parametrize(
    "shape,path",
    [((5, 67, 12, 12), "train/groups"), ((4, 3, 40, 40), "train/long"), ((64, 5, 3, 3), "train/rows")],
)
@pytest.mark.parametrize("memory_saving,inplace", [(False, False), (True, False), (True, True)])
def test_training_takes_the_planned_paths(shape, path, memory_saving, inplace):
    # plain eager training takes plain batch norm's one-call plan (the planned drivers once the small kernels
    # are ruled out); with inplace=True the plan's kernel writes y over x. The standard backward: one kernel
    # per group of channels where they keep the threads busy, else torch's activation backward and the plan's
    with forced_road("planned"), recorded_plans() as ran:
        _compare("leaky_relu", memory_saving, True, shape, dtype=torch.float32, inplace=inplace)
    assert path in ran, ran
    if not memory_saving:
        assert ("act_backward/channels" in ran) != any(p.startswith("backward/") for p in ran), ran


# --- bnkit.fused.forced_act_road -----------------------------------------------------------------------


def _act_kernels_ran(activation: str) -> bool:
    """Whether an eval call with ``activation`` took the act kernels' normalize (``act_forward/rows``), its
    output checked against the equations."""
    x, w, b, rm, rv = _data((4, 3, 5, 6))
    p = PARAM.get(activation, 0.01)
    with recorded_plans() as ran:
        z = bf.batch_norm_act(x, rm, rv, w, b, False, activation=activation, activation_param=p)
    assert_close(z, bn_act_ref(x, rm, rv, w, b, False, 0.1, activation, p)[0], table=OUTPUT)
    return "act_forward/rows" in ran


@pytest.mark.parametrize(
    "road,activation,kernels",
    [(None, "relu", True), (None, "silu", False), ("kernels", "silu", True), ("composed", "relu", False)],
)
def test_forced_act_road_runs_the_road_it_names(road, activation, kernels):
    # by default the kernels run for the piecewise-linear activations only
    with fused.forced_act_road(road):
        assert _act_kernels_ran(activation) == kernels


@pytest.mark.parametrize(
    "kwargs,message",
    [({"road": "fused"}, "road must be one of kernels, composed or None, got 'fused'"),
     ({"chunk_elements": 0}, "chunk_elements must be a positive int or None, got 0"),
     ({"chunk_elements": 2.0}, "chunk_elements must be a positive int or None, got 2.0"),
     ({"chunk_elements": True}, "chunk_elements must be a positive int or None, got True")],
)  # fmt: skip
def test_forced_act_road_rejects_other_values(kwargs, message):
    with fused.forced_act_road("composed"):
        with pytest.raises(ValueError, match=message):
            with fused.forced_act_road(**kwargs):
                pass
        assert not _act_kernels_ran("relu")  # the outer road holds


def test_forced_act_roads_nest_and_restore_after_an_error():
    with pytest.raises(RuntimeError, match="raised inside"):
        with fused.forced_act_road("composed", chunk_elements=7):
            assert not _act_kernels_ran("relu")
            raise RuntimeError("raised inside")
    assert _act_kernels_ran("relu")
    with fused.forced_act_road("composed"):
        with fused.forced_act_road(chunk_elements=7):  # a size alone keeps the road around the block
            assert not _act_kernels_ran("relu")
            with fused.forced_act_road("kernels"):
                assert _act_kernels_ran("silu")
            assert not _act_kernels_ran("relu")
        assert not _act_kernels_ran("relu")
    assert _act_kernels_ran("relu") and not _act_kernels_ran("silu")
