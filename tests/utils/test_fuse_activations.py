"""bnkit.convert(model, fuse_activations=True): batch norm + activation as one BatchNormAct layer, with the
unfused model's outputs, gradients and running statistics (float64), and a report of every pair."""

import copy

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import NETWORK, assert_close
from models import mobilenet_style, randomize_bn, resnet_style
from torch import nn

import bnkit
import bnkit.nn as bnn


class Zoo(nn.Module):
    """Every way a model writes an activation after a batch norm, and the cases that must not fuse."""

    def __init__(self) -> None:
        super().__init__()
        c = 4
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(12))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(12))
        self.relu = nn.ReLU(inplace=True)
        self.leaky = nn.LeakyReLU(0.2)
        self.elu = nn.ELU(0.7)
        self.silu = nn.SiLU()
        self.gelu = nn.GELU()
        self.relu6 = nn.ReLU6()

    def forward(self, x):
        c, b = self.convs, self.bns
        x = self.relu(b[0](c[0](x)))                        # module, in place
        x = F.leaky_relu(b[1](c[1](x)), 0.1)                 # F. call with a positional parameter
        x = self.elu(b[2](c[2](x)))                          # invertible: memory saving
        x = torch.relu(b[3](c[3](x)))                        # torch. call
        x = self.silu(b[4](c[4](x)))
        x = F.gelu(b[5](c[5](x)))
        x = b[6](c[6](x)).relu_()                            # method, in place
        x = F.elu(b[7](c[7](x)), alpha=1.3, inplace=True)    # keyword parameter, in place
        x = self.relu6(b[8](c[8](x)))                        # not a bnkit activation: skipped
        y = b[9](c[9](x))
        x = self.leaky(y) + y                                # BN output used twice: skipped
        x = self.gelu(b[10](c[10](x)))
        return b[11](c[11](x))                               # no activation: stays a batch norm


def _grads_and_stats(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, x.grad, grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_model_is_the_unfused_model(training):
    torch.manual_seed(0)
    model = randomize_bn(Zoo().double()).train(training)
    reference = bnkit.convert(copy.deepcopy(model))
    fused, report = bnkit.convert(model, fuse_activations=True, return_report=True)
    assert [(p.bn, p.activation, p.memory_saving) for p in report.fused] == [
        ("bns.0", "relu", False), ("bns.1", "leaky_relu", True), ("bns.2", "elu", True), ("bns.3", "relu", False),
        ("bns.4", "silu", False), ("bns.5", "gelu", False), ("bns.6", "relu", False), ("bns.7", "elu", True),
        ("bns.10", "gelu", False),
    ]
    skipped = {s.name: s.reason for s in report.fused.skipped}
    assert set(skipped) == {"bns.8", "bns.9"}
    assert "ReLU6" in skipped["bns.8"] and "also used" in skipped["bns.9"]
    assert type(fused.get_submodule("bns.1")) is bnn.BatchNormAct2d
    assert fused.get_submodule("bns.1").activation_param == pytest.approx(0.1)
    assert fused.get_submodule("bns.7").activation_param == pytest.approx(1.3)
    assert type(fused.get_submodule("bns.11")) is bnn.BatchNorm2d
    # the very same parameters and buffers
    assert fused.get_submodule("bns.0").weight is model.bns[0].weight
    assert fused.get_submodule("bns.0").running_var is model.bns[0].running_var
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    got, expected = _grads_and_stats(fused, x), _grads_and_stats(reference, x)
    for a, b in zip(got[:2], expected[:2], strict=True):
        assert_close(a, b, table=NETWORK)
    for mapping_a, mapping_b in zip(got[2:], expected[2:], strict=True):
        assert set(mapping_a) == set(mapping_b)
        for k in mapping_a:
            assert_close(mapping_a[k], mapping_b[k], table=NETWORK, msg=k)


def test_real_networks_fuse_their_pairs_and_keep_their_numbers():
    torch.manual_seed(0)
    net = randomize_bn(resnet_style().double())
    reference = bnkit.convert(copy.deepcopy(net))
    fused, report = bnkit.convert(net, fuse_activations=True, return_report=True)
    # stem BN + ReLU(inplace) and each block's bn1 + F.relu; bn2 feeds the residual sum, not an activation
    assert [p.bn for p in report.fused] == ["1", "3.bn1", "4.bn1"]
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    got, expected = _grads_and_stats(fused, x), _grads_and_stats(reference, x)
    assert_close(got[0], expected[0], table=NETWORK)
    assert_close(got[1], expected[1], table=NETWORK)

    mobile = mobilenet_style()
    _, report = bnkit.convert(mobile, fuse_activations=True, return_report=True)
    assert list(report.fused) == [] and all("ReLU6" in s.reason for s in report.fused.skipped)
    assert len(report.fused.skipped) == 7


def test_bad_combinations_raise():
    with pytest.raises(ValueError, match="fuse_activations"):
        bnkit.convert(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), to="torch", fuse_activations=True)
    with pytest.raises(ValueError, match="fuse_activations"):
        bnkit.convert(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), sync=True, fuse_activations=True)
