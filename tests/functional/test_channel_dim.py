"""channel_dim: equal to transposing, running torch's batch norm and transposing back."""

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import GRAD, assert_close
from torch import nn

import bnkit
from bnkit.functional import batch_norm, batch_norm_pure

D = torch.float64

# (bnkit class, torch class, input shape, channel_dim)
CASES = [
    (bnkit.nn.BatchNorm1d, nn.BatchNorm1d, (4, 6, 3), 2),  # (N, L, C)
    (bnkit.nn.BatchNorm1d, nn.BatchNorm1d, (4, 6, 3), -1),
    (bnkit.nn.BatchNorm1d, nn.BatchNorm1d, (5, 3), -1),  # (N, C) with a negative dim
    (bnkit.nn.BatchNorm2d, nn.BatchNorm2d, (2, 4, 5, 3), -1),  # (N, H, W, C)
    (bnkit.nn.BatchNorm2d, nn.BatchNorm2d, (2, 4, 3, 5), 2),  # (N, H, C, W)
    (bnkit.nn.BatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 4, 3), 4),  # (N, D, H, W, C)
    (bnkit.nn.BatchNorm2d, nn.BatchNorm2d, (3, 2, 4, 5), 0),  # (C, N, H, W): any axis
]


def _pair(bcls, tcls, c, cd, **kw):
    t = tcls(c, **kw).double()
    with torch.no_grad():
        t.weight.uniform_(0.5, 2)
        t.bias.uniform_(-1, 1)
    b = bcls(c, channel_dim=cd, **kw).double()
    b.load_state_dict(t.state_dict())  # the same state_dict, both ways
    assert b.state_dict().keys() == t.state_dict().keys()
    return b, t


@pytest.mark.parametrize("bcls,tcls,shape,cd", CASES)
def test_module_equals_transpose_torch_transpose_back(bcls, tcls, shape, cd):
    c = shape[cd]
    b, t = _pair(bcls, tcls, c, cd, momentum=None)
    for step in range(2):
        x = (torch.randn(shape, dtype=D) * 2 + step).requires_grad_()
        dy = torch.randn(shape, dtype=D)
        y_t = t(x.movedim(cd, 1)).movedim(1, cd)
        g_t = torch.autograd.grad(y_t, (x, t.weight, t.bias), dy)
        y_b = b(x)
        g_b = torch.autograd.grad(y_b, (x, b.weight, b.bias), dy)
        assert_close(y_b, y_t)
        for got, want in zip(g_b, g_t, strict=True):
            assert_close(got, want, table=GRAD)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(b, name), getattr(t, name))
    b.eval()
    t.eval()
    x = torch.randn(shape, dtype=D)
    assert_close(b(x), t(x.movedim(cd, 1)).movedim(1, cd))


@pytest.mark.parametrize("training", [True, False])
def test_functional_channels_last(training):
    x = torch.randn(3, 4, 5, 6, dtype=D)  # (N, H, W, C)
    w, b = torch.randn(6, dtype=D), torch.randn(6, dtype=D)
    rm, rv = torch.randn(6, dtype=D), torch.rand(6, dtype=D) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, training, 0.2, 1e-4, channel_dim=-1)
    y_t = F.batch_norm(x.permute(0, 3, 1, 2), rm2, rv2, w, b, training, 0.2, 1e-4).permute(0, 2, 3, 1)
    assert_close(y, y_t)
    assert_close((rm, rv), (rm2, rv2))
    assert y.shape == x.shape


def test_movedim_is_a_view_with_channels_last_strides():
    # What the backend receives for (N, H, W, C) memory: an (N, C, H, W) tensor laid out
    # channels-last, so the fast kernels see their native layout and nothing is copied.
    x = torch.randn(2, 4, 5, 3)
    v = x.movedim(-1, 1)
    assert v.data_ptr() == x.data_ptr()
    assert v.is_contiguous(memory_format=torch.channels_last)
    y, _, _ = batch_norm_pure(x, None, None, training=True, channel_dim=-1)
    assert y.shape == x.shape


@pytest.mark.parametrize("lcls,tcls,shape,cd", [
    (bnkit.nn.LazyBatchNorm1d, nn.BatchNorm1d, (4, 6, 3), -1),
    (bnkit.nn.LazyBatchNorm2d, nn.BatchNorm2d, (2, 4, 5, 3), 3),
    (bnkit.nn.LazyBatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 4, 5), -1),
])
def test_lazy_modules_read_channels_from_channel_dim(lcls, tcls, shape, cd):
    lazy = lcls(channel_dim=cd, dtype=D)
    x = torch.randn(shape, dtype=D)
    y = lazy(x)
    assert lazy.num_features == shape[cd]
    assert type(lazy) is lcls.cls_to_become and lazy.channel_dim == cd
    t = tcls(shape[cd]).double()
    assert_close(y, t(x.movedim(cd, 1)).movedim(1, cd))
    assert_close(lazy.running_var, t.running_var)


def test_repr_names_channel_dim():
    assert "channel_dim=-1" in repr(bnkit.nn.BatchNorm1d(3, channel_dim=-1))
    assert "channel_dim" not in repr(bnkit.nn.BatchNorm1d(3))


def test_errors():
    x = torch.randn(3, 4, 5)
    for cd in (3, -4, 7):
        with pytest.raises(IndexError, match=r"Dimension out of range \(expected to be in range of \[-3, 2\]"):
            batch_norm(x, None, None, training=True, channel_dim=cd)
        with pytest.raises(IndexError, match="Dimension out of range"):
            bnkit.nn.BatchNorm1d(5, channel_dim=cd)(x)
    with pytest.raises(TypeError, match="channel_dim must be an int"):
        batch_norm(x, None, None, training=True, channel_dim=1.0)
    with pytest.raises(TypeError, match="channel_dim must be an int"):
        bnkit.nn.BatchNorm1d(5, channel_dim="last")
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 5"):
        bnkit.nn.BatchNorm1d(5, channel_dim=1)(x)  # channel count read from channel_dim
    with pytest.raises(RuntimeError, match="should contain 5 elements not 4"):
        batch_norm(x, torch.zeros(4), torch.ones(4), training=True, channel_dim=-1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bnkit.nn.BatchNorm1d(5, channel_dim=-1)(torch.randn(1, 1, 5))
    with pytest.raises(ValueError, match="cannot convert"):
        bnkit.convert(bnkit.nn.BatchNorm1d(5, channel_dim=-1), to="torch")
