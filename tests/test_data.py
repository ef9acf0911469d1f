"""Tests for smaso.data: the Table 2 datasets in torchvision's on-disk formats (tiny
synthetic files), the authors' preprocessing, the small real datasets through the same
entry point, and batches."""

import pickle

import numpy as np
import pytest
import torch

from smaso import data as D
from smaso.data import (
    DATA_ENV,
    balanced_batches,
    channel_standardize,
    epoch_batches,
    expected_files,
    load,
    per_image_scale,
    read_raw,
    shuffled_batches,
)

scipy_io = pytest.importorskip(
    "scipy.io"
)  # SVHN's .mat files (scipy comes with scikit-learn)


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Nothing in these tests may reach the network: a download attempt fails."""

    def refuse(name, root):
        raise AssertionError(f"download of {name} attempted")

    monkeypatch.setattr(D, "download_dataset", refuse)


def _images(rng, n):
    return rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def make_cifar10(root, n=4, bytes_keys=False, seed=0):
    """CIFAR-10 as torchvision downloads it: cifar-10-batches-py/data_batch_1..5 and
    test_batch,
    pickled dicts with 'data' (N, 3072) uint8 (R, G, B planes of 32x32) and 'labels'."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": _images(rng, n), "labels": list(rng.integers(0, 10, n))}
        if bytes_keys:
            d = {k.encode(): v for k, v in d.items()}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
        batches[name] = d
    return batches


def make_cifar100(root, n=6, seed=1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name in ("train", "test"):
        d = {
            "data": _images(rng, n),
            "fine_labels": list(rng.integers(0, 100, n)),
            "coarse_labels": list(rng.integers(0, 20, n)),
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
        out[name] = d
    return out


def make_svhn(root, n=5, seed=2):
    """SVHN as torchvision downloads it: train_32x32.mat / test_32x32.mat with 'X' (32,
    32, 3, N)
    uint8 and 'y' (N, 1) in 1..10, 10 meaning the digit 0."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("train_32x32.mat", "test_32x32.mat"):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [10], [9]][:n], dtype=np.uint8)
        scipy_io.savemat(root / name, {"X": X, "y": y})
        out[name] = (X, y)
    return out


def test_cifar10_from_torchvision_layout(tmp_path):
    b = make_cifar10(tmp_path)
    raw = read_raw("cifar10", tmp_path)
    assert raw["x_train"].shape == (20, 3, 32, 32) and raw["x_test"].shape == (
        4,
        3,
        32,
        32,
    )
    assert raw["x_train"].dtype == np.uint8 and raw["y_train"].dtype == np.int64
    first = b["data_batch_1"]["data"][0]
    assert np.array_equal(
        raw["x_train"][0, 1], first[1024:2048].reshape(32, 32)
    )  # the G plane
    assert raw["y_train"].tolist() == [
        label for i in range(1, 6) for label in b[f"data_batch_{i}"]["labels"]
    ]
    assert raw["y_test"].tolist() == list(b["test_batch"]["labels"])


def test_cifar10_bytes_keys_and_env_root(tmp_path, monkeypatch):
    make_cifar10(tmp_path, bytes_keys=True)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    d = load("cifar10", preprocess="none")
    assert d.x_train.shape == (20, 3, 32, 32) and d.num_classes == 10
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0


def test_cifar100_and_svhn(tmp_path):
    c = make_cifar100(tmp_path)
    raw = read_raw("cifar100", tmp_path)
    assert raw["x_train"].shape == (6, 3, 32, 32) and raw["y_test"].tolist() == list(
        c["test"]["fine_labels"]
    )
    assert load("cifar100", tmp_path).num_classes == 100
    s = make_svhn(tmp_path)
    raw = read_raw("svhn", tmp_path)
    X, _ = s["train_32x32.mat"]
    assert raw["x_train"].shape == (5, 3, 32, 32)
    assert np.array_equal(raw["x_train"][3, 2], X[:, :, 2, 3])  # image 3, blue channel
    assert raw["y_train"].tolist() == [0, 1, 2, 0, 9]  # 10 -> 0, as torchvision


def test_missing_data_names_the_expected_file(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="cifar-10-batches-py/data_batch_1 not found"
    ) as e:
        load("cifar10", tmp_path / "nowhere")
    assert "download" in str(e.value) and DATA_ENV in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"test_32x32\.mat"):
        make_svhn(tmp_path / "s")
        (tmp_path / "s" / "test_32x32.mat").unlink()
        read_raw("svhn", tmp_path / "s")
    assert [p.name for p in expected_files("cifar100", tmp_path)] == ["train", "test"]


def test_corrupt_and_bad_inputs(tmp_path):
    make_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch is not a CIFAR python batch"):
        read_raw("cifar10", tmp_path)
    with pytest.raises(ValueError, match=r"dataset must be one of .*; got 'mnist'"):
        load("mnist")
    with pytest.raises(ValueError, match="preprocess"):
        load("digits", preprocess="zca")
    with pytest.raises(ValueError, match="upsample"):
        load("digits", upsample=0)


def test_preprocessing():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64)
    x[5] = 0.3  # a constant image
    y = per_image_scale(x)
    assert torch.allclose(
        y.mean(dim=(1, 2, 3)), torch.zeros(6, dtype=torch.float64), atol=1e-12
    )
    assert torch.allclose(
        y[:5].abs().amax(dim=(1, 2, 3)), torch.ones(5, dtype=torch.float64)
    )
    assert torch.equal(y[5], torch.zeros_like(y[5])) and torch.isfinite(y).all()
    assert torch.allclose(
        per_image_scale(255 * x), y
    )  # scale-free: raw or [0, 1] pixels alike
    a, _ = channel_standardize(x[:4], x[4:])
    assert torch.allclose(
        a.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12
    )
    with pytest.raises(ValueError):
        per_image_scale(torch.zeros(3, dtype=torch.long))


def test_small_real_datasets_through_load(tmp_path, monkeypatch):
    d = load("digits", preprocess="none", dtype=torch.float64)
    ref = D.digits(dtype=torch.float64)
    assert torch.equal(d.x_test, ref.x_test) and torch.equal(d.y_train, ref.y_train)
    up = load("digits", preprocess="none", upsample=2, limit_train=10, limit_test=5)
    assert up.x_train.shape == (10, 1, 16, 16) and up.x_test.shape == (5, 1, 16, 16)
    assert torch.equal(up.x_train[:, :, ::2, ::2], ref.x_train[:10].float())
    rng = np.random.default_rng(0)
    fake = tmp_path / "subset.npz"
    np.savez(
        fake,
        x_train=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
        y_train=np.arange(30) % 10,
        x_test=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
        y_test=np.arange(10),
    )
    s = load("cifar10-subset", subset_path=fake)
    assert s.x_train.shape == (30, 3, 32, 32) and s.x_train.dtype == torch.float32
    assert torch.allclose(s.x_train.abs().amax(dim=(1, 2, 3)), torch.ones(30))


def test_balanced_batches():
    y = torch.arange(10).repeat_interleave(
        torch.tensor([30, 25, 40, 20, 35, 30, 30, 22, 28, 40])
    )
    g = torch.Generator().manual_seed(0)
    idx = balanced_batches(y, 50, g)
    assert idx.shape == (len(y) // 50, 50)
    counts = torch.stack([torch.bincount(y[row], minlength=10) for row in idx])
    assert (counts == 5).all()  # 5 per class, as the authors' code
    assert all(len(set(row.tolist())) == 50 for row in idx)  # distinct within a batch
    again = balanced_batches(y, 50, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    odd = balanced_batches(y, 13, g)  # 1 per class + 3 random classes
    c = torch.stack([torch.bincount(y[row], minlength=10) for row in odd])
    assert (c >= 1).all() and (c <= 2).all() and (c.sum(1) == 13).all()
    with pytest.raises(ValueError, match="fewer than"):
        balanced_batches(torch.tensor([0] * 30 + [1] * 2), 10, g)
    with pytest.raises(ValueError, match="batch_size"):
        balanced_batches(y, 0, g)


def test_balanced_batches_of_small_classes_finish_uniform(monkeypatch):
    """Classes barely larger than their share of a batch: independent draws are
    distinct once in 2e10 batches, so redrawing alone never ends (it hung the GPU
    check's memory item). After a few rounds the batches left draw without
    replacement: every image in 5/6 of the batches, as uniform sampling of distinct
    images gives, within 4 standard errors over 1500 batches."""
    from smaso import data

    y = torch.arange(60) % 10  # 6 images per class, 5 per class in a batch of 50
    monkeypatch.setattr(data, "_REDRAWS", 2)
    rows = torch.cat(
        [balanced_batches(y, 50, torch.Generator().manual_seed(s)) for s in range(1500)]
    )
    assert all(len(set(r.tolist())) == 50 for r in rows)
    assert (torch.stack([torch.bincount(y[r], minlength=10) for r in rows]) == 5).all()
    freq = torch.bincount(rows.flatten(), minlength=60) / len(rows)
    se = (5 / 6 * 1 / 6 / len(rows)) ** 0.5
    assert (freq - 5 / 6).abs().max() < 4 * se
    odd = torch.cat(  # 1 per class and 3 classes twice: their 2 images distinct
        [
            balanced_batches(y[:20], 13, torch.Generator().manual_seed(s))
            for s in range(50)
        ]
    )
    assert all(len(set(r.tolist())) == 13 for r in odd)


def test_epoch_batches_reproducible_and_on_the_labels_device():
    y = torch.arange(103) % 10
    a = epoch_batches(y, 10, seed=3, epoch=2)
    assert sorted(torch.cat(a).tolist()) == list(
        range(103)
    )  # a shuffle visits every image once
    assert [len(b) for b in a] == [10] * 10 + [3]
    b = epoch_batches(y, 10, seed=3, epoch=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(epoch_batches(y, 10, seed=3, epoch=3)[0], a[0])
    bal = epoch_batches(y, 10, seed=3, epoch=2, balanced=True)
    assert len(bal) == 10 and all(t.device == y.device for t in bal)
    assert len(shuffled_batches(5, 2, torch.Generator())) == 3
