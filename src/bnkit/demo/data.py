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

__all__ = ["Digits", "load_digits"]


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
    from sklearn.model_selection import train_test_split

    digits = _sk_load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).to(torch.int64)
    idx_train, idx_test = train_test_split(
        list(range(len(labels))), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    tr, te = torch.tensor(idx_train), torch.tensor(idx_test)
    return Digits(images[tr].contiguous(), labels[tr], images[te].contiguous(), labels[te])
