"""Frozen batch norm (torchvision/detectron2 semantics) and bnkit.freeze / bnkit.unfreeze."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
import bnkit.functional as bf

EPS = 1e-5


def frozen_ref(x, rm, rv, w, b, eps=EPS):
    """torchvision's FrozenBatchNorm2d.forward."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = w * (rv + eps).rsqrt()
    bias = b - rm * scale
    return x * scale.view(shape) + bias.view(shape)


def _filled(module):
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
    return module


@pytest.mark.parametrize("cls,shape", [
    (bnkit.nn.FrozenBatchNorm1d, (4, 3)),
    (bnkit.nn.FrozenBatchNorm1d, (4, 3, 5)),
    (bnkit.nn.FrozenBatchNorm2d, (4, 3, 5, 5)),
    (bnkit.nn.FrozenBatchNorm3d, (2, 3, 2, 3, 2)),
])
def test_frozen_module(cls, shape):
    m = _filled(cls(3).double())
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert list(m.parameters()) == []
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, frozen_ref(x, m.running_mean, m.running_var, m.weight, m.bias))
    y.sum().backward()
    torch.testing.assert_close(x.grad, (m.weight * (m.running_var + EPS).rsqrt()).view(
        [1, -1] + [1] * (len(shape) - 2)).expand(shape))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="expected"):
        m(torch.randn(2, 3, 2, 2, 2, 2, dtype=torch.float64))


def test_loads_bn_state_dict_and_gradcheck():
    t = _filled(nn.BatchNorm2d(3).double())
    f = bnkit.nn.FrozenBatchNorm2d(3).double()
    f.load_state_dict(t.state_dict())  # num_batches_tracked is dropped, as torchvision does
    t.eval()
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(f(x), t(x))

    def fn(x, w, b):
        return bf.frozen_batch_norm(x, t.running_mean, t.running_var, w, b)

    args = (x.requires_grad_(), t.weight.detach().clone().requires_grad_(), t.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(fn, args)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(bnkit.nn.BatchNorm2d(4), bnkit.nn.BatchNormAct2d(4, activation="elu", activation_param=0.5)),
        nn.Flatten(), nn.BatchNorm1d(4 * 9), bnkit.nn.BatchRenorm1d(36), bnkit.nn.GhostBatchNorm1d(36, 2),
    ).double()
    for _ in range(2):
        model(torch.randn(4, 3, 3, 3, dtype=torch.float64))
    return model


def test_freeze_converts_every_bn_and_unfreeze_restores():
    model = _model()
    original_classes = [type(m) for m in model.modules()]
    params_before = {n: p for n, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    model.eval()
    expected = model(x)
    model.train()

    assert bnkit.freeze(model) is model
    frozen = [m for m in model.modules() if type(m).__name__.startswith("FrozenBatchNorm")]
    assert len(frozen) == 6
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert {n for n, _ in model.named_parameters()} == {"0.weight", "0.bias"}
    assert "1.num_batches_tracked" not in model.state_dict()
    torch.testing.assert_close(model(x), expected)  # train mode, yet frozen statistics
    torch.testing.assert_close(model(x), expected)  # and nothing moved

    # a frozen state_dict loads into a fresh frozen model; a BN state_dict loads into the frozen one
    model.load_state_dict({k: v for k, v in state_before.items()})

    assert bnkit.unfreeze(model) is model
    assert [type(m) for m in model.modules()] == original_classes
    for n, p in model.named_parameters():
        assert p is params_before[n], n
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for k, v in state_after.items():
        assert torch.equal(v, state_before[k]), k


def test_affine_trainable():
    model = _model()
    w = model[1].weight
    bnkit.freeze(model, affine_trainable=True)
    assert model[1].weight is w and isinstance(model[1].weight, nn.Parameter)
    rm = model[1].running_mean.clone()
    model(torch.randn(4, 3, 3, 3, dtype=torch.float64)).sum().backward()
    assert w.grad is not None and torch.equal(model[1].running_mean, rm)
    bnkit.unfreeze(model)
    assert model[1].weight is w and isinstance(model[1], nn.BatchNorm2d)


def test_frozen_values_follow_into_unfrozen_params():
    bn = _filled(nn.BatchNorm2d(3))
    w = bn.weight
    bnkit.freeze(bn)
    assert isinstance(bn, bnkit.nn.FrozenBatchNorm2d)
    new = {k: torch.full_like(v, 2.0) for k, v in bn.state_dict().items()}
    bn.load_state_dict(new)
    bn.double()  # moved while frozen
    bnkit.unfreeze(bn)
    assert bn.weight is w and w.dtype == torch.float64 and torch.equal(w.detach(), torch.full_like(w, 2.0))
    assert bn.num_batches_tracked.dtype == torch.long


def test_affine_false_and_errors():
    bn = nn.BatchNorm2d(3, affine=False)
    bn(torch.randn(4, 3, 2, 2))
    x = torch.randn(4, 3, 2, 2)
    bnkit.freeze(bn)
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var))
    bnkit.unfreeze(bn)
    assert bn.weight is None and bn.bias is None and list(bn.state_dict()) == list(
        nn.BatchNorm2d(3, affine=False).state_dict())

    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics"):
        bnkit.freeze(model)
    assert type(model[0]) is nn.BatchNorm2d  # nothing was changed
    with pytest.raises(ValueError, match="lazy"):
        bnkit.freeze(nn.LazyBatchNorm2d())
    with pytest.raises(TypeError):
        bnkit.freeze("model")


def test_freeze_refuses_a_layer_with_its_own_forward_before_changing_anything():
    from models import TimmStyleBatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), TimmStyleBatchNormAct2d(4), nn.Identity())
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"cannot freeze 2: .*TimmStyleBatchNormAct2d has a forward of its own"):
        bnkit.freeze(model)
    assert [type(m) for m in model.modules()] == classes
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_frozen_bn_act_keeps_its_activation():
    bn = bnkit.nn.BatchNormAct2d(4, activation="relu").eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 3, 3)
    expected = bn(x)
    model = bnkit.freeze(nn.Sequential(bn)).train()
    torch.testing.assert_close(model(x), expected)
    assert model(x).min() >= 0
