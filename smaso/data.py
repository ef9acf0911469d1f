"""Small real datasets as tensors, for the chapters and tests that train on CPU.

The paper's datasets (CIFAR-10/100, SVHN) come from torchvision; this module holds the small
real datasets that every machine has: scikit-learn's handwritten digits (1797 images of 8x8
pixels, 10 classes) and, when present, a CIFAR-10 subset in ``.npz`` form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TensorData", "digits"]


@dataclass
class TensorData:
    """A train/test split held as tensors: images (N, C, H, W) float, labels (N,) long."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def to(self, device) -> "TensorData":
        return TensorData(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)),
                          self.num_classes)


def digits(test_fraction: float = 0.25, seed: int = 0, dtype=torch.float32) -> TensorData:
    """scikit-learn's digits as (N, 1, 8, 8) images scaled to [0, 1], split by a seeded stratified shuffle.

    The split is the same on every machine for a given ``seed``: per class, a fixed fraction of the
    images (in a permutation drawn from ``numpy.random.default_rng(seed)``) goes to the test set.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float64) / 16.0
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        test_idx.append(idx[: int(round(test_fraction * len(idx)))])
    test = np.zeros(len(y), dtype=bool)
    test[np.concatenate(test_idx)] = True
    as_x = lambda a: torch.from_numpy(a[:, None]).to(dtype)
    as_y = lambda a: torch.from_numpy(a)
    return TensorData(as_x(x[~test]), as_y(y[~test]), as_x(x[test]), as_y(y[test]), 10)
