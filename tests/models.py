"""Real-world model shapes for the tests of the tools around torch (fx, quantization, ONNX, fold, freeze).

The PyPI torchvision wheel does not import next to the CPU torch and timm is not a dependency, so the
tests build the layers these libraries use themselves: a ResNet-style and a MobileNet-style network,
and a timm-style ``BatchNormAct2d`` (a subclass of ``nn.BatchNorm2d`` whose forward also applies
``drop`` and ``act``, as timm's does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TimmStyleBatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: torch's batch norm, then ``self.drop``, then ``self.act``."""

    def __init__(self, num_features: int, act_layer: type[nn.Module] = nn.ReLU, drop: float = 0.0, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if keep else None, self.running_var if keep else None, self.weight,
                         self.bias, use_batch, factor, self.eps)
        return self.act(self.drop(x))


def randomize_bn(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from their initial 0/1 (so that mistakes show)."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.3, 3)
            if getattr(m, "weight", None) is not None and isinstance(m, nn.modules.batchnorm._NormBase):
                m.weight.uniform_(-2, 2)
            if getattr(m, "bias", None) is not None and isinstance(m, nn.modules.batchnorm._NormBase):
                m.bias.uniform_(-1, 1)
    return model


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-ReLU, conv-BN, a projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def resnet_style(width: int = 8, classes: int = 5) -> nn.Module:
    """A small ResNet with torch's batch norm (stem, two stages, pooling, linear head)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project, each with a norm (+ act)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, norm_act) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv_pw = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = norm_act(hidden, act=True)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = norm_act(hidden, act=True)
        self.conv_pwl = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = norm_act(cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return x + y if self.use_res else y


def torch_norm_act(channels: int, act: bool) -> nn.Module:
    """BN then ReLU6 as two torch modules (torchvision's MobileNetV2)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU6()) if act else nn.BatchNorm2d(channels)


def timm_norm_act(channels: int, act: bool) -> nn.Module:
    """timm's fused-looking layer: one BatchNormAct2d module (Identity act where none)."""
    return TimmStyleBatchNormAct2d(channels, act_layer=nn.ReLU6 if act else nn.Identity)


def mobilenet_style(norm_act=torch_norm_act, width: int = 8, classes: int = 5) -> nn.Module:
    """A small MobileNetV2: stem, inverted residual blocks (depthwise-separable), pooling, head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 2, 1, bias=False), norm_act(width, act=True),
        InvertedResidual(width, width, 1, 2, norm_act), InvertedResidual(width, 2 * width, 2, 3, norm_act),
        InvertedResidual(2 * width, 2 * width, 1, 3, norm_act),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


def bn_batch_inputs(model: nn.Sequential, data, indices) -> dict[int, list[torch.Tensor]]:
    """The oracle of the statistics tools: the input of each batch-norm layer of ``model`` at ``indices``,
    batch by batch, with every one of them normalizing by its batch statistics (torch's ``F.batch_norm``)."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in indices}
    with torch.no_grad():
        for x, _ in data:
            h = x
            for i, layer in enumerate(model):
                if i in seen:
                    seen[i].append(h)
                    h = F.batch_norm(h, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
                else:
                    h = layer(h)
    return seen
