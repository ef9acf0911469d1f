"""Small real datasets as tensors, for the chapters and tests that train on CPU.

The paper's datasets (CIFAR-10/100, SVHN) come from torchvision; this module holds the small
real datasets that every machine has: scikit-learn's handwritten digits (1797 images of 8x8
pixels, 10 classes) and, when present, a CIFAR-10 subset in ``.npz`` form.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["TensorData", "digits", "cifar10_subset", "find_cifar10_subset", "CIFAR10_SUBSET_ENV"]

CIFAR10_SUBSET_ENV = "SMASO_CIFAR10_SUBSET"
_SUBSET_NAME = "cifar10-subset.npz"


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


def find_cifar10_subset(path: str | os.PathLike | None = None) -> Path:
    """Locate ``cifar10-subset.npz``: ``path``, else ``$SMASO_CIFAR10_SUBSET``, else ``../shared/data/``.

    The last is relative to the project root (the folder holding ``smaso/``) and to the current
    directory's parent. Raises ``FileNotFoundError`` naming every place looked at.
    """
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    elif os.environ.get(CIFAR10_SUBSET_ENV):
        candidates.append(Path(os.environ[CIFAR10_SUBSET_ENV]))
    else:
        root = Path(__file__).resolve().parents[1]
        candidates += [root.parent / "shared" / "data" / _SUBSET_NAME, Path.cwd().parent / "shared" / "data" / _SUBSET_NAME,
                       Path.cwd().parent.parent / "shared" / "data" / _SUBSET_NAME]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"{_SUBSET_NAME} not found (looked at: {', '.join(str(c) for c in candidates)}); pass its path or set "
        f"${CIFAR10_SUBSET_ENV}. It holds the first 4000 CIFAR-10 training and 1000 test images, as uint8 "
        "arrays x_train (N, 32, 32, 3), y_train, x_test, y_test."
    )


def cifar10_subset(path: str | os.PathLike | None = None, standardize: bool = True, dtype=torch.float32) -> TensorData:
    """The CIFAR-10 subset (4000 train / 1000 test real images) as (N, 3, 32, 32) tensors.

    Pixels are scaled to [0, 1]; with ``standardize`` each channel is then standardised with the
    training split's mean and standard deviation. See :func:`find_cifar10_subset` for where it looks.
    """
    file = find_cifar10_subset(path)
    with np.load(file) as npz:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(npz.files)
        if missing:
            raise ValueError(f"{file} lacks arrays {sorted(missing)}")
        arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    for k in ("x_train", "x_test"):
        if arrays[k].ndim != 4 or arrays[k].shape[1:] != (32, 32, 3):
            raise ValueError(f"{file}: {k} has shape {arrays[k].shape}, expected (N, 32, 32, 3)")
    to_x = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).to(dtype) / 255.0
    x_train, x_test = to_x(arrays["x_train"]), to_x(arrays["x_test"])
    if standardize:
        mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
        std = x_train.std(dim=(0, 2, 3), keepdim=True)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    to_y = lambda a: torch.from_numpy(a.astype(np.int64))
    return TensorData(x_train, to_y(arrays["y_train"]), x_test, to_y(arrays["y_test"]), 10)
