"""The data of the demo: scikit-learn's bundled 8x8 digits, upsampled for LeNet.

``sklearn.datasets.load_digits`` ships inside the scikit-learn wheel (1797 images of
handwritten digits, 8x8 pixels with values 0..16), so the demo needs no network access.
The images are scaled to [0, 1] and upsampled bilinearly to LeNet's 28x28 input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from bnkit.demo.model import IMAGE_SIZE

__all__ = ["Digits", "load_digits", "stratified_split"]


@dataclass(frozen=True)
class Digits:
    """Train and held-out splits as tensors: images (N, 1, 28, 28) float32, labels (N,) int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(seed: int = 0, test_fraction: float = 0.2, size: int = IMAGE_SIZE) -> Digits:
    """Load the digits, split them (stratified, reproducible with ``seed``), upsample to ``size``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as _sk_load_digits

    digits = _sk_load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).to(torch.int64)
    train, test = stratified_split(labels, test_fraction, seed)
    return Digits(images[train].contiguous(), labels[train], images[test].contiguous(), labels[test])


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, test): ``round(test_fraction * n_k)`` random images of each class k held out.

    Every class appears in both splits in proportion (what scikit-learn's ``stratify=`` does),
    and the split depends only on ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for k in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    # shuffle across classes so that neither split is ordered by label
    train_idx = train_idx[torch.randperm(len(train_idx), generator=generator)]
    test_idx = test_idx[torch.randperm(len(test_idx), generator=generator)]
    return train_idx, test_idx
