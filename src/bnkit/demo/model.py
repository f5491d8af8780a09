"""BN-LeNet: LeNet-5 with batch norm after every convolution and hidden linear layer.

The network of d2l's batch-norm chapter (one of bnkit's seed texts): sigmoid activations and
average pooling, as in the original LeNet, with a batch-norm layer between each affine map
and its activation. Without batch norm this sigmoid network trains slowly at a high learning
rate; with it, a few epochs suffice, which is what makes it a good demo of what BN does.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["IMAGE_SIZE", "bn_lenet", "bn_layers"]

IMAGE_SIZE = 28  # inputs are (N, 1, 28, 28), as for Fashion-MNIST in d2l


def bn_lenet(num_classes: int = 10) -> nn.Sequential:
    """A fresh BN-LeNet built from ``torch.nn`` layers (convert it with :func:`bnkit.convert`).

    Shapes: 28x28 -> conv5 (pad 2) 6x28x28 -> pool 6x14x14 -> conv5 16x10x10 -> pool 16x5x5
    -> 400 -> 120 -> 84 -> ``num_classes``.
    """
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 6, kernel_size=5, padding=2)),
                ("bn1", nn.BatchNorm2d(6)),
                ("act1", nn.Sigmoid()),
                ("pool1", nn.AvgPool2d(2, 2)),
                ("conv2", nn.Conv2d(6, 16, kernel_size=5)),
                ("bn2", nn.BatchNorm2d(16)),
                ("act2", nn.Sigmoid()),
                ("pool2", nn.AvgPool2d(2, 2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(16 * 5 * 5, 120)),
                ("bn3", nn.BatchNorm1d(120)),
                ("act3", nn.Sigmoid()),
                ("fc2", nn.Linear(120, 84)),
                ("bn4", nn.BatchNorm1d(84)),
                ("act4", nn.Sigmoid()),
                ("fc3", nn.Linear(84, num_classes)),
            ]
        )
    )


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The batch-norm layers of ``model`` by name (torch's or bnkit's: bnkit's subclass torch's)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
