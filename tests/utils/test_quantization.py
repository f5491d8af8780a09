"""bnkit.utils.fuser_method_mapping / quantization_backend_config: torch.ao quantization fuses bnkit's batch
norm as it fuses torch's, and the quantized model is the one torch builds (compared bit for bit)."""

import copy

import pytest
import torch
import torch.ao.quantization as tq
from models import randomize_bn
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import bnkit


def _net(dim: int = 2) -> nn.Module:
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dim]
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(conv(3, 8, 3), bn(8), nn.ReLU(), conv(8, 8, 3), bn(8)))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_fuse_modules_fuses_bnkit_layers_as_torchs(dim, qat):
    torch_model = _net(dim).train(qat)
    bnkit_model = bnkit.convert(copy.deepcopy(torch_model))
    groups = [["0", "1", "2"], ["3", "4"]]
    fuse = tq.fuse_modules_qat if qat else tq.fuse_modules
    fused_torch = fuse(copy.deepcopy(torch_model), groups)
    fused_bnkit = fuse(copy.deepcopy(bnkit_model), groups,
                       fuse_custom_config_dict={"additional_fuser_method_mapping": bnkit.utils.fuser_method_mapping()})
    assert [type(m) for m in fused_bnkit.modules()] == [type(m) for m in fused_torch.modules()]
    x = torch.randn(4, 3, *([7] * dim))
    torch.testing.assert_close(fused_bnkit(x), fused_torch(x), atol=0, rtol=0)
    # without the mapping torch's fuser does not know bnkit's class
    with pytest.raises(AssertionError, match="did not find fuser method"):
        fuse(copy.deepcopy(bnkit_model), groups)


def test_fx_quantization_builds_torchs_quantized_model():
    torch_model = _net().eval()
    bnkit_model = bnkit.convert(copy.deepcopy(torch_model))
    qconfig = tq.get_default_qconfig_mapping("x86")
    x = torch.randn(4, 3, 12, 12)
    config = bnkit.utils.quantization_backend_config()
    prepared_torch = prepare_fx(copy.deepcopy(torch_model), qconfig, (x,))
    prepared_bnkit = prepare_fx(copy.deepcopy(bnkit_model), qconfig, (x,), backend_config=config)
    for _ in range(3):
        batch = torch.randn(4, 3, 12, 12)
        torch.testing.assert_close(prepared_bnkit(batch), prepared_torch(batch), atol=0, rtol=0)
    quantized_torch, quantized_bnkit = convert_fx(prepared_torch), convert_fx(prepared_bnkit, backend_config=config)
    torch.testing.assert_close(quantized_bnkit(x), quantized_torch(x), atol=0, rtol=0)
    # torch's native config is left as it was
    assert not any("bnkit" in str(c.pattern) for c in tq.backend_config.get_native_backend_config().configs)


def test_fx_quantization_without_the_config_still_runs():
    bnkit_model = bnkit.convert(_net().eval())
    x = torch.randn(4, 3, 12, 12)
    prepared = prepare_fx(bnkit_model, tq.get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    out = convert_fx(prepared)(x)
    assert out.shape == (4, 8, 8, 8) and torch.isfinite(out).all()


def test_a_layer_with_channel_dim_cannot_be_fused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.nn.BatchNorm2d(4, channel_dim=1)).eval()
    model[1].channel_dim = -1
    with pytest.raises(ValueError, match="channel_dim"):
        tq.fuse_modules(model, [["0", "1"]],
                        fuse_custom_config_dict={"additional_fuser_method_mapping": bnkit.utils.fuser_method_mapping()})
