"""The demo's figures, drawn with matplotlib's Agg backend (no display needed).

* ``loss.png``: the loss of both twins at every step, and their absolute difference;
* ``running_stats.png``: running_mean and running_var of each batch-norm layer over
  training (one line per channel), which shows the exponential moving average at work;
* ``activations.png``: histograms of the activations entering and leaving a convolutional
  and a fully-connected batch-norm layer (eval mode, held-out data).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from bnkit.demo.train import History

__all__ = ["capture_activations", "plot_activations", "plot_loss", "plot_running_stats"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: History, path: Path) -> Path:
    """Both twins' training loss per step (top) and |loss_torch - loss_bnkit| (bottom)."""
    plt = _pyplot()
    steps = range(1, len(history.loss_torch) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    top.plot(steps, history.loss_torch, label="torch.nn BatchNorm", linewidth=2.5, alpha=0.6)
    top.plot(steps, history.loss_bnkit, label="bnkit BatchNorm", linewidth=1.0, linestyle="--")
    top.set_ylabel("cross-entropy loss")
    top.set_title("BN-LeNet on digits: the two twins train identically")
    top.legend()
    diff = [max(abs(a - b), 1e-12) for a, b in zip(history.loss_torch, history.loss_bnkit, strict=True)]
    bottom.semilogy(steps, diff, color="tab:red", linewidth=0.8)
    bottom.set_ylabel("|difference|\n(0 drawn at 1e-12)")
    bottom.set_xlabel("training step")
    for epoch_end in range(history.steps_per_epoch, len(diff) + 1, max(history.steps_per_epoch, 1)):
        top.axvline(epoch_end, color="grey", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_running_stats(history: History, path: Path) -> Path:
    """running_mean and running_var of every BN layer over the steps, one line per channel."""
    plt = _pyplot()
    names = list(history.running_mean)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 2.4 * len(names)), sharex=True, squeeze=False)
    for row, name in enumerate(names):
        means = torch.stack(history.running_mean[name]).numpy()
        variances = torch.stack(history.running_var[name]).numpy()
        steps = range(1, len(means) + 1)
        width = 0.8 if means.shape[1] <= 16 else 0.4
        axes[row][0].plot(steps, means, linewidth=width)
        axes[row][1].plot(steps, variances, linewidth=width)
        axes[row][0].set_ylabel(f"{name}\n({means.shape[1]} ch)")
    axes[0][0].set_title("running_mean  (starts at 0)")
    axes[0][1].set_title("running_var  (starts at 1; unbiased batch var)")
    axes[-1][0].set_xlabel("training step")
    axes[-1][1].set_xlabel("training step")
    fig.suptitle("running = (1 - momentum) * running + momentum * batch,  momentum = 0.1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def capture_activations(model: nn.Module, x: Tensor, layers: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Inputs and outputs of the named layers for one forward pass (in the model's current mode)."""
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in layers:
        def hook(_module, inputs, output, name=name):
            captured[name] = (inputs[0].detach().clone(), output.detach().clone())

        handles.append(modules[name].register_forward_hook(hook))
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def plot_activations(captured: dict[str, tuple[Tensor, Tensor]], path: Path) -> Path:
    """Histograms of what enters and leaves each captured BN layer (all channels pooled)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(captured), 2, figsize=(10, 3 * len(captured)), squeeze=False)
    for row, (name, (before, after)) in enumerate(captured.items()):
        axes[row][0].hist(before.flatten().numpy(), bins=80, color="tab:blue")
        axes[row][0].set_title(f"before {name}: mean {before.mean():.3g}, std {before.std():.3g}")
        axes[row][1].hist(after.flatten().numpy(), bins=80, color="tab:green")
        axes[row][1].set_title(f"after {name}: mean {after.mean():.3g}, std {after.std():.3g}")
    fig.suptitle("activations before and after batch norm (eval mode, held-out digits)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
