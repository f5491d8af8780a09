"""bnkit.nn.BatchNorm* and Lazy* against torch.nn (the oracle), in every mode."""

import copy
import inspect

import pytest
import torch
from bn_tolerances import assert_close
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnkit

PAIRS = [
    (nn.BatchNorm1d, bnkit.nn.BatchNorm1d, (6, 3)),
    (nn.BatchNorm1d, bnkit.nn.BatchNorm1d, (4, 3, 5)),
    (nn.BatchNorm2d, bnkit.nn.BatchNorm2d, (4, 3, 3, 2)),
    (nn.BatchNorm3d, bnkit.nn.BatchNorm3d, (2, 3, 2, 3, 2)),
]
LAZY = [
    (nn.LazyBatchNorm1d, bnkit.nn.LazyBatchNorm1d, bnkit.nn.BatchNorm1d, (4, 3, 5)),
    (nn.LazyBatchNorm2d, bnkit.nn.LazyBatchNorm2d, bnkit.nn.BatchNorm2d, (4, 3, 3, 2)),
    (nn.LazyBatchNorm3d, bnkit.nn.LazyBatchNorm3d, bnkit.nn.BatchNorm3d, (2, 3, 2, 3, 2)),
]
ALL_CLASSES = [(t, b) for t, b, _ in PAIRS[1:]] + [(t, b) for t, b, _, _ in LAZY]


def twins(torch_cls, bnkit_cls, *args, dtype=torch.float64, **kwargs):
    t = torch_cls(*args, dtype=dtype, **kwargs)
    b = bnkit_cls(*args, dtype=dtype, **kwargs)
    if not isinstance(t, nn.modules.lazy.LazyModuleMixin):
        with torch.no_grad():
            for p in t.parameters():
                p.uniform_(0.5, 1.5)
            if t.running_mean is not None:
                t.running_mean.normal_()
                t.running_var.uniform_(0.5, 2.0)
        b.load_state_dict(t.state_dict())
    return t, b


def assert_same_state(b: nn.Module, t: nn.Module, dtype=None) -> None:
    sb, st = b.state_dict(), t.state_dict()
    assert list(sb) == list(st)
    for k in st:
        if st[k].dtype == torch.int64:
            assert torch.equal(sb[k], st[k]), k
        else:
            assert_close(sb[k], st[k], dtype)


def run_both(t, b, x, loss_weight=None):
    """Forward + backward through both twins with identical inputs; compare everything."""
    xt = x.detach().clone().requires_grad_(x.requires_grad)
    xb = x.detach().clone().requires_grad_(x.requires_grad)
    yt, yb = t(xt), b(xb)
    assert yb.dtype == yt.dtype and yb.shape == yt.shape
    assert_close(yb, yt)
    if yt.requires_grad:
        g = torch.randn_like(yt) if loss_weight is None else loss_weight
        yt.backward(g)
        yb.backward(g)
        if x.requires_grad:
            assert_close(xb.grad, xt.grad)
        for (name, pb), pt in zip(b.named_parameters(), t.parameters(), strict=True):
            assert (pb.grad is None) == (pt.grad is None), name
            if pt.grad is not None:
                assert_close(pb.grad, pt.grad)
    assert_same_state(b, t)
    return yt, yb


# --- drop-in surface ------------------------------------------------------------------


@pytest.mark.parametrize("torch_cls,bnkit_cls", ALL_CLASSES)
def test_constructor_signature_matches_torch(torch_cls, bnkit_cls):
    theirs = inspect.signature(torch_cls.__init__).parameters
    ours = inspect.signature(bnkit_cls.__init__).parameters
    for name, p in theirs.items():
        assert name in ours, name
        assert ours[name].default == p.default, name
        assert ours[name].kind == p.kind, name
    # torch's parameters first, in torch's order; bnkit's additions keyword-only with defaults
    assert list(ours)[: len(theirs)] == list(theirs)
    extra = [n for n in ours if n not in theirs]
    assert all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in extra)
    assert all(ours[n].default is not inspect.Parameter.empty for n in extra)
    assert issubclass(bnkit_cls, torch_cls) and issubclass(bnkit_cls, _BatchNorm)


@pytest.mark.parametrize("torch_cls,bnkit_cls,shape", PAIRS[1:])
@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None},
                                    {"bias": False}, {"eps": 1e-3, "momentum": 0.3}])
def test_params_buffers_state_dict_repr(torch_cls, bnkit_cls, shape, kwargs):
    t, b = torch_cls(5, **kwargs), bnkit_cls(5, **kwargs)
    assert [n for n, _ in b.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert [n for n, _ in b.named_buffers()] == [n for n, _ in t.named_buffers()]
    assert list(b.state_dict()) == list(t.state_dict())
    assert repr(b) == repr(t)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        tb, tt = getattr(b, name), getattr(t, name)
        assert (tb is None) == (tt is None)
        if tt is not None:
            assert torch.equal(tb, tt) and tb.dtype == tt.dtype


def test_state_dict_round_trip_unchanged():
    t = nn.BatchNorm2d(4)
    t.train()
    t(torch.randn(3, 4, 2, 2))
    sd = copy.deepcopy(t.state_dict())
    b = bnkit.nn.BatchNorm2d(4)
    b.load_state_dict(sd)
    back = nn.BatchNorm2d(4)
    back.load_state_dict(b.state_dict())
    for k, v in sd.items():
        assert torch.equal(back.state_dict()[k], v)
        assert back.state_dict()[k].dtype == v.dtype


def test_legacy_checkpoint_without_num_batches_tracked():
    t0 = nn.BatchNorm2d(3)
    sd = t0.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    t, b = nn.BatchNorm2d(3), bnkit.nn.BatchNorm2d(3)
    b.num_batches_tracked.fill_(7)
    t.num_batches_tracked.fill_(7)
    t.load_state_dict(sd)
    b.load_state_dict(sd)
    assert torch.equal(b.num_batches_tracked, t.num_batches_tracked)


def test_reset_running_stats_and_parameters():
    t, b = twins(nn.BatchNorm1d, bnkit.nn.BatchNorm1d, 3)
    b(torch.randn(4, 3, dtype=torch.float64))
    b.reset_running_stats()
    t.reset_running_stats()
    assert_same_state(b, t)
    b.reset_parameters()
    t.reset_parameters()
    assert_same_state(b, t)


# --- behaviour in every mode ------------------------------------------------------------


@pytest.mark.parametrize("torch_cls,bnkit_cls,shape", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_four_modes_with_toggling(torch_cls, bnkit_cls, shape, momentum, affine, track):
    t, b = twins(torch_cls, bnkit_cls, 3, momentum=momentum, affine=affine, track_running_stats=track)
    for training in (True, False, True, False):
        t.train(training)
        b.train(training)
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
        run_both(t, b, x)


@pytest.mark.parametrize("torch_cls,bnkit_cls,shape", PAIRS)
def test_no_grad_still_updates_running_stats(torch_cls, bnkit_cls, shape):
    t, b = twins(torch_cls, bnkit_cls, 3)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        yt, yb = run_both(t, b, x)
    assert not yb.requires_grad
    assert b.num_batches_tracked.item() == 1


@pytest.mark.parametrize("training", [True, False])
def test_frozen_weight_has_no_grad(training):
    t, b = twins(nn.BatchNorm2d, bnkit.nn.BatchNorm2d, 3)
    t.train(training)
    b.train(training)
    t.weight.requires_grad_(False)
    b.weight.requires_grad_(False)
    run_both(t, b, torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True))
    assert b.weight.grad is None and b.bias.grad is not None


@pytest.mark.parametrize("training", [True, False])
def test_detached_input(training):
    t, b = twins(nn.BatchNorm2d, bnkit.nn.BatchNorm2d, 3)
    t.train(training)
    b.train(training)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    yt, yb = run_both(t, b, (x * 2).detach())
    assert yb.requires_grad  # through weight and bias
    assert x.grad is None
    t.requires_grad_(False)
    b.requires_grad_(False)
    _, yb = run_both(t, b, (x * 2).detach())
    assert not yb.requires_grad


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("torch_cls,bnkit_cls,shape", [(nn.BatchNorm1d, bnkit.nn.BatchNorm1d, (0, 3)),
                                                       (nn.BatchNorm2d, bnkit.nn.BatchNorm2d, (0, 3, 2, 2))])
def test_empty_batch(torch_cls, bnkit_cls, shape, training):
    t, b = twins(torch_cls, bnkit_cls, 3, momentum=None)
    t.train(training)
    b.train(training)
    run_both(t, b, torch.randn(shape, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("torch_cls,bnkit_cls", ALL_CLASSES)
def test_errors_match_torch(torch_cls, bnkit_cls):
    def outcome(m, x):
        try:
            m(x)
            return "ok"
        except Exception as exc:  # noqa: BLE001 - the error itself is compared
            return type(exc), str(exc)

    ndim = {"1d": 2, "2d": 4, "3d": 5}[torch_cls.__name__[-2:]]
    shapes = [(2, 3), (2, 3, 4), (2, 3, 4, 4), (2, 3, 2, 2, 2), (2,), (2, 3, 1, 1, 1, 1),
              (2, 5) + (2,) * (ndim - 2), (1, 3) + (1,) * (ndim - 2)]
    for shape in shapes:
        for kwargs in ({}, {"track_running_stats": False}, {"affine": False}):
            if issubclass(torch_cls, nn.modules.lazy.LazyModuleMixin):
                t, b = torch_cls(**kwargs), bnkit_cls(**kwargs)
            else:
                t, b = torch_cls(3, **kwargs), bnkit_cls(3, **kwargs)
            x = torch.randn(shape)
            assert outcome(b, x) == outcome(t, x), (shape, kwargs)
            # torch counts a batch before F.batch_norm can raise: the same num_batches_tracked after
            nb, nt = b.num_batches_tracked, t.num_batches_tracked
            assert (nb is None) == (nt is None) and (nt is None or torch.equal(nb, nt)), (shape, kwargs)
    msg = outcome(bnkit.nn.BatchNorm2d(3), torch.randn(2, 3, 4))
    assert msg == (ValueError, "expected 4D input (got 3D input)")


@pytest.mark.parametrize("bad", ["one value per channel", "channel mismatch", "eps 0"])
def test_a_failed_training_batch_is_counted_as_torch_counts_it(bad):
    # torch.nn adds the batch to num_batches_tracked before F.batch_norm raises; with momentum=None
    # (the cumulative average, factor 1 / num_batches_tracked) the next batches then weigh the same
    eps = 0.0 if bad == "eps 0" else 1e-5
    t, b = twins(nn.BatchNorm2d, bnkit.nn.BatchNorm2d, 3, momentum=None, eps=eps)
    skip = bnkit.nn.BatchNorm2d(3, momentum=None, eps=eps, nonfinite="skip", dtype=torch.float64)
    x_bad = {"one value per channel": torch.randn(1, 3, 1, 1), "channel mismatch": torch.randn(2, 4, 2, 2),
             "eps 0": torch.randn(2, 3, 2, 2)}[bad].double()  # fmt: skip
    for m in (t, b, skip):
        with pytest.raises((ValueError, RuntimeError)):
            m(x_bad)
    assert t.num_batches_tracked.item() == 1 and b.num_batches_tracked.item() == 1
    assert skip.num_batches_tracked.item() == 0  # bnkit's own policy: a batch that failed is not counted
    if bad == "eps 0":
        return  # every training batch raises
    for _ in range(2):
        run_both(t, b, torch.randn(4, 3, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("torch_cls,bnkit_cls,shape,fmt", [
    (nn.BatchNorm2d, bnkit.nn.BatchNorm2d, (3, 4, 3, 2), torch.channels_last),
    (nn.BatchNorm3d, bnkit.nn.BatchNorm3d, (2, 4, 2, 3, 2), torch.channels_last_3d),
])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_keeps_memory_format(torch_cls, bnkit_cls, shape, fmt, training):
    t, b = twins(torch_cls, bnkit_cls, 4)
    t.train(training)
    b.train(training)
    x = torch.randn(shape, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    xt, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    assert xb.is_contiguous(memory_format=fmt)
    yt, yb = t(xt), b(xb)
    assert yb.is_contiguous(memory_format=fmt) == yt.is_contiguous(memory_format=fmt) is True
    assert_close(yb, yt)
    g = torch.randn_like(yt)
    yt.backward(g)
    yb.backward(g)
    assert_close(xb.grad, xt.grad)
    assert xb.grad.is_contiguous(memory_format=fmt) == xt.grad.is_contiguous(memory_format=fmt)
    assert_same_state(b, t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_dtypes_with_float32_parameters(dtype, training):
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    t, b = twins(nn.BatchNorm2d, bnkit.nn.BatchNorm2d, 3, dtype=pdtype)
    t.train(training)
    b.train(training)
    x = (torch.randn(4, 3, 3, 3, dtype=torch.float64) * 2 + 1).to(dtype).requires_grad_()
    xt, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    yt, yb = t(xt), b(xb)
    assert yb.dtype == yt.dtype == dtype
    assert_close(yb, yt)
    g = torch.randn_like(yt)
    yt.backward(g)
    yb.backward(g)
    assert_close(xb.grad, xt.grad)
    for pb, pt in zip(b.parameters(), t.parameters(), strict=True):
        assert pb.grad.dtype == pt.grad.dtype == pdtype
        # parameter gradients are sums over the batch: compare them at the input's precision
        assert_close(pb.grad, pt.grad, dtype)
    assert_same_state(b, t, dtype)


# --- the ecosystem's isinstance checks ---------------------------------------------------


def test_swa_update_bn_accepts_bnkit_modules():
    def net(bn_cls):
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 3), bn_cls(3), nn.ReLU(), nn.Linear(3, 2)).double()

    t, b = net(nn.BatchNorm1d), net(bnkit.nn.BatchNorm1d)
    b.load_state_dict(t.state_dict())
    loader = [torch.randn(5, 4, dtype=torch.float64) for _ in range(4)]
    torch.optim.swa_utils.update_bn(loader, t)
    torch.optim.swa_utils.update_bn(loader, b)
    assert b[1].momentum == t[1].momentum == 0.1  # restored
    assert_same_state(b, t)
    assert b[1].num_batches_tracked.item() == 4
    # update_bn's cumulative average differs from the default EMA: it really ran
    assert not torch.allclose(b[1].running_mean, torch.zeros(3, dtype=torch.float64))


def test_convert_sync_batchnorm_accepts_bnkit_modules():
    b = nn.Sequential(bnkit.nn.BatchNorm2d(3))
    b[0].running_mean.fill_(0.5)
    s = nn.SyncBatchNorm.convert_sync_batchnorm(b)
    assert isinstance(s[0], nn.SyncBatchNorm)
    assert torch.equal(s[0].running_mean, torch.full((3,), 0.5))


# --- lazy modules -------------------------------------------------------------------------


@pytest.mark.parametrize("torch_lazy,bnkit_lazy,target,shape", LAZY)
@pytest.mark.parametrize("kwargs", [{}, {"affine": False, "momentum": None}, {"track_running_stats": False}])
def test_lazy_materializes_into_bnkit_class(torch_lazy, bnkit_lazy, target, shape, kwargs):
    t, b = torch_lazy(dtype=torch.float64, **kwargs), bnkit_lazy(dtype=torch.float64, **kwargs)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    run_both(t, b, x)
    assert type(b) is target
    assert repr(b) == repr(t)
    run_both(t, b, x)
    t.eval()
    b.eval()
    run_both(t, b, x)


def test_track_running_stats_switched_off_after_construction():
    """torch's rule with buffers present but tracking off: train uses batch stats without
    updating them; eval still normalizes with the (frozen) running statistics."""
    t, b = twins(nn.BatchNorm2d, bnkit.nn.BatchNorm2d, 3)
    t.track_running_stats = False
    b.track_running_stats = False
    for training in (True, False):
        t.train(training)
        b.train(training)
        run_both(t, b, torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True))
    assert b.num_batches_tracked.item() == 0
