"""bnkit.convert: torch -> bnkit -> torch, with state, flags, device and dtype preserved."""

import copy
import warnings

import pytest
import torch
from bn_tolerances import NETWORK, assert_close
from torch import nn

import bnkit


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=None),
        nn.ReLU(),
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(36, 5),
        nn.BatchNorm1d(5, track_running_stats=False),
    )
    m.train()
    m(torch.randn(3, 3, 5, 5))
    return m


def _snapshot(model):
    return [(name, type(mod), mod.training) for name, mod in model.named_modules()]


def test_round_trip_preserves_everything():
    t = _model()
    t[1].eval()  # a mixed training flag must survive
    ref_state = copy.deepcopy(t.state_dict())
    before = _snapshot(t)
    params = {n: p for n, p in t.named_parameters()}
    b = bnkit.convert(t)
    assert b is t
    assert type(b[1]) is bnkit.nn.BatchNorm2d and type(b[6]) is bnkit.nn.BatchNorm1d
    assert type(b[0]) is nn.Conv2d and type(b[5]) is nn.Linear  # nothing else changes
    assert [(n, m.training) for n, m in b.named_modules()] == [(n, tr) for n, _, tr in before]
    # the very same parameter objects (an optimizer built before keeps working)
    assert all(p is params[n] for n, p in b.named_parameters())
    for k, v in b.state_dict().items():
        assert torch.equal(v, ref_state[k]) and v.dtype == ref_state[k].dtype
    assert b[1].momentum is None and b[6].track_running_stats is False
    back = bnkit.convert(b, to="torch")
    assert _snapshot(back) == before
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref_state[k])
    assert repr(back) == repr(_model_with_flags())


def _model_with_flags():
    m = _model()
    m[1].eval()
    return m


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_and_device_preserved_and_outputs_match(dtype):
    t = _model().to(dtype)
    b = bnkit.convert(copy.deepcopy(t))
    for mt, mb in zip(t.modules(), b.modules(), strict=True):
        for (_, pt), (_, pb) in zip(mt.named_buffers(recurse=False), mb.named_buffers(recurse=False), strict=True):
            assert pb.dtype == pt.dtype and pb.device == pt.device
    x = torch.randn(3, 3, 5, 5, dtype=dtype)
    assert_close(b(x), t(x), table=NETWORK)
    b.eval()
    t.eval()
    assert_close(b(x), t(x), table=NETWORK)


@pytest.mark.parametrize("torch_cls,bnkit_cls", [(nn.BatchNorm1d, bnkit.nn.BatchNorm1d),
                                                   (nn.BatchNorm2d, bnkit.nn.BatchNorm2d),
                                                   (nn.BatchNorm3d, bnkit.nn.BatchNorm3d)])
def test_convert_a_bare_layer(torch_cls, bnkit_cls):
    bn = torch_cls(3, affine=False, eps=1e-3)
    bn.running_var.fill_(2.0)
    out = bnkit.convert(bn)
    assert out is bn and type(out) is bnkit_cls and out.eps == 1e-3
    assert torch.equal(out.running_var, torch.full((3,), 2.0))
    assert type(bnkit.convert(out, to="torch")) is torch_cls


def test_subclasses_are_left_alone_and_bad_arguments_raise():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(MyBN(3))
    bnkit.convert(m)
    assert type(m[0]) is MyBN
    with pytest.raises(ValueError, match="to must be"):
        bnkit.convert(m, to="jax")
    with pytest.raises(TypeError, match="nn.Module"):
        bnkit.convert(3)


def test_convert_reports_what_it_left_alone():
    from models import TimmStyleBatchNormAct2d, mobilenet_style, timm_norm_act

    torch.manual_seed(0)
    net = mobilenet_style(timm_norm_act)
    timm_layers = sorted(n for n, m in net.named_modules() if isinstance(m, TimmStyleBatchNormAct2d))
    with pytest.warns(UserWarning, match=r"swapped 0 batch-norm layer\(s\) and left 10 as they were: 1: .*forward"):
        out, report = bnkit.convert(net, return_report=True)
    assert out is net and list(report) == [] and sorted(s.name for s in report.skipped) == timm_layers
    assert all(type(m) is TimmStyleBatchNormAct2d for n, m in net.named_modules() if n in timm_layers)

    mixed = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), TimmStyleBatchNormAct2d(4))
    with pytest.warns(UserWarning, match="swapped 1 batch-norm layer"):
        _, report = bnkit.convert(mixed, return_report=True)
    assert list(report) == ["1"] and [s.name for s in report.skipped] == ["2"]
    assert type(mixed[1]) is bnkit.nn.BatchNorm2d

    # nothing to report: no warning
    plain = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm1d(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = bnkit.convert(plain, return_report=True)
    assert list(report) == ["0", "1"] and report.skipped == []


def test_convert_back_to_torch_names_layers_without_a_twin():
    model = nn.Sequential(bnkit.nn.BatchNorm2d(3), bnkit.nn.BatchNormAct2d(3), bnkit.nn.FrozenBatchNorm2d(3))
    with pytest.warns(UserWarning, match="left 2"):
        _, report = bnkit.convert(model, to="torch", return_report=True)
    assert list(report) == ["0"] and [s.name for s in report.skipped] == ["1", "2"]
    assert "no torch twin" in report.skipped[0].reason


def test_convert_sync_reports_subclasses():
    from models import TimmStyleBatchNormAct2d

    model = nn.Sequential(nn.BatchNorm2d(3), TimmStyleBatchNormAct2d(3))
    with pytest.warns(UserWarning, match="SyncBatchNorm"):
        out, report = bnkit.convert(model, sync=True, return_report=True)
    assert list(report) == ["0"] and [s.name for s in report.skipped] == ["1"]
    assert type(out[0]) is bnkit.nn.SyncBatchNorm and type(out[1]) is TimmStyleBatchNormAct2d
