import numpy as np
import pytest
import torch
from torch import nn

from smaso.data import digits
from smaso.train import accuracy, fit


def test_digits_split_is_stratified_and_deterministic():
    a, b = digits(seed=0), digits(seed=0)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert a.x_train.shape[1:] == (1, 8, 8) and len(a.x_train) + len(a.x_test) == 1797
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
    counts = a.y_test.bincount()
    assert (
        counts.min() >= 44 and counts.max() <= 46
    )  # a quarter of each class (174-183 images)
    assert not torch.equal(digits(seed=1).y_test, a.y_test)


def test_digits_rejects_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        digits(test_fraction=1.0)


def test_fit_learns_and_is_reproducible():
    data = digits()

    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        return model, fit(
            model,
            data,
            epochs=3,
            lr=1e-2,
            progress=False,
            on_epoch=lambda e, m: {"e2": e * 2},
        )

    (m1, h1), (_, h2) = run(), run()
    assert h1 == h2
    assert [r["e2"] for r in h1] == [2, 4, 6]
    assert h1[-1]["test_acc"] > 0.85 and h1[-1]["loss"] < h1[0]["loss"]
    assert accuracy(m1, data.x_test, data.y_test) == h1[-1]["test_acc"]


def test_fit_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epochs"):
        fit(nn.Linear(64, 10), digits(), epochs=0)


def test_cifar10_subset_loads_when_present_and_says_where_it_looked(
    tmp_path, monkeypatch
):
    from smaso.data import CIFAR10_SUBSET_ENV, cifar10_subset

    rng = np.random.default_rng(0)
    fake = tmp_path / "subset.npz"
    np.savez(
        fake,
        x_train=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
        y_train=np.arange(20) % 10,
        x_test=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
        y_test=np.arange(5),
    )
    monkeypatch.setenv(CIFAR10_SUBSET_ENV, str(fake))
    data = cifar10_subset()
    assert data.x_train.shape == (20, 3, 32, 32) and data.y_test.tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert torch.allclose(data.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    raw = cifar10_subset(fake, standardize=False)
    assert float(raw.x_train.min()) >= 0.0 and float(raw.x_train.max()) <= 1.0
    with pytest.raises(FileNotFoundError, match="cifar10-subset.npz not found"):
        cifar10_subset(tmp_path / "absent.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="lacks arrays"):
        cifar10_subset(bad)
