"""Train two identical BN-LeNets side by side: one with torch.nn batch norm, one with bnkit's.

Both twins start from the same weights (the bnkit twin is :func:`bnkit.convert` applied to a
deep copy of the torch one), see the same mini-batches in the same order and take the same
SGD steps, so any difference between them is the difference between the two batch-norm
implementations. torch's layers are the oracle here; bnkit's are the subject.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import bnkit
from bnkit.demo.data import Digits, load_digits
from bnkit.demo.model import bn_layers, bn_lenet

__all__ = ["DemoConfig", "History", "TwinResult", "accuracy", "train_twins", "warm_up"]


@dataclass(frozen=True)
class DemoConfig:
    """Options of ``bnkit demo`` (defaults finish in well under a minute on 2 cores)."""

    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch size must be >= 2 (batch norm needs more than one value per channel), "
                             f"got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class History:
    """What happened at every training step (index = step)."""

    loss_torch: list[float] = field(default_factory=list)
    loss_bnkit: list[float] = field(default_factory=list)
    seconds_torch: list[float] = field(default_factory=list)
    seconds_bnkit: list[float] = field(default_factory=list)
    # layer name -> list over steps of the bnkit twin's running statistics (C,)
    running_mean: dict[str, list[Tensor]] = field(default_factory=dict)
    running_var: dict[str, list[Tensor]] = field(default_factory=dict)
    steps_per_epoch: int = 0


@dataclass
class TwinResult:
    """The two trained twins, their history and the data they were trained on."""

    torch_model: nn.Module
    bnkit_model: nn.Module
    history: History
    data: Digits
    config: DemoConfig
    backend: str | None


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[float, float]:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    value = loss.item()  # .item() waits for the step to finish: the time includes all of it
    return value, time.perf_counter() - start


def warm_up(data: Digits, batch_size: int) -> float:
    """One throw-away bnkit training step (forward and backward); returns its seconds.

    The first call of a fast backend compiles its kernels (or loads them from numba's cache)
    and starts its thread pool; doing that here keeps it out of the per-step times. Starting
    numba's threads can also reset torch's thread count, so callers re-apply theirs after.
    """
    start = time.perf_counter()
    model = bnkit.convert(bn_lenet()).train()
    x, y = data.x_train[:batch_size], data.y_train[:batch_size]
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model.eval()(x)
    return time.perf_counter() - start


def train_twins(
    config: DemoConfig,
    data: Digits | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> TwinResult:
    """Train the torch twin and the bnkit twin on the same batches; record the history.

    ``on_step(step, total)`` is called after every step (a progress bar hooks in here).
    The steps of the two twins alternate which one goes first, so neither always meets a
    warm cache.
    """
    data = data if data is not None else load_digits(seed=config.seed)
    torch.manual_seed(config.seed)
    torch_model = bn_lenet()
    bnkit_model = bnkit.convert(copy.deepcopy(torch_model))
    torch_model.train()
    bnkit_model.train()
    opt_t = torch.optim.SGD(torch_model.parameters(), lr=config.lr)
    opt_b = torch.optim.SGD(bnkit_model.parameters(), lr=config.lr)

    n = len(data.y_train)
    steps_per_epoch = n // config.batch_size  # drop the last partial batch: fixed-size batches
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {config.batch_size} is larger than the training set ({n} images)")
    total = steps_per_epoch * config.epochs
    history = History(steps_per_epoch=steps_per_epoch)
    layers = bn_layers(bnkit_model)
    for name in layers:
        history.running_mean[name] = []
        history.running_var[name] = []

    generator = torch.Generator().manual_seed(config.seed)
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * config.batch_size:(i + 1) * config.batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            if step % 2 == 0:
                lt, st = _step(torch_model, opt_t, x, y)
                lb, sb = _step(bnkit_model, opt_b, x, y)
            else:
                lb, sb = _step(bnkit_model, opt_b, x, y)
                lt, st = _step(torch_model, opt_t, x, y)
            history.loss_torch.append(lt)
            history.loss_bnkit.append(lb)
            history.seconds_torch.append(st)
            history.seconds_bnkit.append(sb)
            for name, layer in layers.items():
                history.running_mean[name].append(layer.running_mean.detach().clone())
                history.running_var[name].append(layer.running_var.detach().clone())
            step += 1
            if on_step is not None:
                on_step(step, total)
    return TwinResult(torch_model, bnkit_model, history, data, config, bnkit.last_backend())


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, train_mode: bool = False) -> float:
    """Fraction of correct predictions, in eval mode (right) or in train mode (the classic mistake).

    In train mode every batch is normalized with its *own* statistics and the running
    statistics are overwritten as a side effect, so this runs on a deep copy of ``model``.
    """
    net = copy.deepcopy(model) if train_mode else model
    was_training = net.training
    net.train(train_mode)
    correct = seen = 0
    for start in range(0, len(y), batch_size):
        xb = x[start:start + batch_size]
        if train_mode and len(xb) < 2:
            break  # one sample has no batch statistics (torch raises); a train-mode eval drops it
        correct += int((net(xb).argmax(dim=1) == y[start:start + batch_size]).sum())
        seen += len(xb)
    net.train(was_training)
    return correct / max(seen, 1)
