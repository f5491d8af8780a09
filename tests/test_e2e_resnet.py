"""End to end: a small ResNet-style CNN converted with bnkit.convert trains like its torch twin."""

import copy

import pytest
import torch
from bn_tolerances import TRAINING
from torch import nn

import bnkit


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=None)  # cumulative average too
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def small_resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        Block(8, 8, 1), Block(8, 12, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_twenty_sgd_steps_match_torch(dtype):
    atol, rtol = TRAINING[dtype]
    torch.manual_seed(0)
    t = small_resnet().to(dtype)
    b = bnkit.convert(copy.deepcopy(t))
    assert sum(isinstance(m, bnkit.nn.BatchNorm2d) for m in b.modules()) == 6
    assert sum(isinstance(m, bnkit.nn.BatchNorm1d) for m in b.modules()) == 1
    opt_t = torch.optim.SGD(t.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(6, 3, 6, 6, generator=gen, dtype=dtype)
        target = torch.randint(0, 5, (6,), generator=gen)
        losses = []
        for model, opt in ((t, opt_t), (b, opt_b)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=atol, rtol=rtol)
    st, sb = t.state_dict(), b.state_dict()
    assert list(sb) == list(st)
    for k in st:
        torch.testing.assert_close(sb[k], st[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")
    t.eval()
    b.eval()
    x = torch.randn(6, 3, 6, 6, generator=gen, dtype=dtype)
    torch.testing.assert_close(b(x), t(x), atol=atol, rtol=rtol)
