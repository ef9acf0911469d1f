"""Datasets as tensors: the paper's CIFAR-10/100 and SVHN (Section 5, Table 2), and
small real ones.

* :func:`load` is the one entry point the experiment pipeline uses. It serves CIFAR-10,
  CIFAR-100 and SVHN from the files torchvision downloads (its on-disk layout, read
  directly into tensors: no per-sample Python loader), the CIFAR-10 subset
  (``cifar10-subset.npz``) and scikit-learn's handwritten digits, all as one
  :class:`TensorData` on the device you ask for.
* Preprocessing: the authors' (:func:`per_image_scale`: per image, subtract the mean,
  divide by the largest absolute value, no augmentation), the common per-channel
  standardisation (:func:`channel_standardize`), or none.
* Batches: :func:`epoch_batches` draws the index tensors of one epoch, shuffled or
  class-balanced as in the authors' code (:func:`balanced_batches`), reproducibly from a
  seed.

:func:`digits` and :func:`cifar10_subset` are the small datasets the earlier chapters
use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checks import choice, positive_int

__all__ = [
    "CIFAR10_SUBSET_ENV",
    "DATASETS",
    "DATA_ENV",
    "NUM_CLASSES",
    "PREPROCESS",
    "Dataset",
    "TensorData",
    "balanced_batches",
    "channel_standardize",
    "cifar10_subset",
    "data_root",
    "digits",
    "download_dataset",
    "epoch_batches",
    "expected_files",
    "find_cifar10_subset",
    "load",
    "per_image_scale",
    "read_raw",
    "shuffled_batches",
]

CIFAR10_SUBSET_ENV = "SMASO_CIFAR10_SUBSET"
_SUBSET_NAME = "cifar10-subset.npz"


@dataclass
class TensorData:
    """A train/test split as tensors: images (N, C, H, W) float, labels (N,) long."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def to(self, device) -> TensorData:
        return TensorData(
            *(
                t.to(device)
                for t in (self.x_train, self.y_train, self.x_test, self.y_test)
            ),
            self.num_classes,
        )


def digits(
    test_fraction: float = 0.25, seed: int = 0, dtype=torch.float32
) -> TensorData:
    """scikit-learn's digits as (N, 1, 8, 8) images scaled to [0, 1], split by a seeded
    stratified shuffle.

    The split is the same on every machine for a given ``seed``: per class, a fixed
    fraction of the images (in a permutation drawn from
    ``numpy.random.default_rng(seed)``) goes to the test set.
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
        test_idx.append(idx[: round(test_fraction * len(idx))])
    test = np.zeros(len(y), dtype=bool)
    test[np.concatenate(test_idx)] = True

    def as_x(a):
        return torch.from_numpy(a[:, None]).to(dtype)

    def as_y(a):
        return torch.from_numpy(a)

    return TensorData(as_x(x[~test]), as_y(y[~test]), as_x(x[test]), as_y(y[test]), 10)


def find_cifar10_subset(path: str | os.PathLike | None = None) -> Path:
    """Locate ``cifar10-subset.npz``: ``path``, else ``$SMASO_CIFAR10_SUBSET``, else
    ``../shared/data/``.

    The last is relative to the project root (the folder holding ``smaso/``) and to the
    current directory's parent. Raises ``FileNotFoundError`` naming every place looked
    at.
    """
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    elif os.environ.get(CIFAR10_SUBSET_ENV):
        candidates.append(Path(os.environ[CIFAR10_SUBSET_ENV]))
    else:
        root = Path(__file__).resolve().parents[1]
        candidates += [
            root.parent / "shared" / "data" / _SUBSET_NAME,
            Path.cwd().parent / "shared" / "data" / _SUBSET_NAME,
            Path.cwd().parent.parent / "shared" / "data" / _SUBSET_NAME,
        ]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"{_SUBSET_NAME} not found (looked at: "
        f"{', '.join(str(c) for c in candidates)}); pass its path or set "
        f"${CIFAR10_SUBSET_ENV}. It holds the first 4000 CIFAR-10 training and 1000 "
        "test images, as uint8 "
        "arrays x_train (N, 32, 32, 3), y_train, x_test, y_test."
    )


def cifar10_subset(
    path: str | os.PathLike | None = None, standardize: bool = True, dtype=torch.float32
) -> TensorData:
    """The CIFAR-10 subset (4000 train / 1000 test real images) as (N, 3, 32, 32)
    tensors.

    Pixels are scaled to [0, 1]; with ``standardize`` each channel is then standardised
    with the training split's mean and standard deviation. See
    :func:`find_cifar10_subset` for where it looks.
    """
    file = find_cifar10_subset(path)
    with np.load(file) as npz:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(npz.files)
        if missing:
            raise ValueError(f"{file} lacks arrays {sorted(missing)}")
        arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    for k in ("x_train", "x_test"):
        if arrays[k].ndim != 4 or arrays[k].shape[1:] != (32, 32, 3):
            raise ValueError(
                f"{file}: {k} has shape {arrays[k].shape}, expected (N, 32, 32, 3)"
            )

    def to_x(a):
        return torch.from_numpy(a).permute(0, 3, 1, 2).to(dtype) / 255.0

    x_train, x_test = to_x(arrays["x_train"]), to_x(arrays["x_test"])
    if standardize:
        mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
        std = x_train.std(dim=(0, 2, 3), keepdim=True)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    def to_y(a):
        return torch.from_numpy(a.astype(np.int64))

    return TensorData(
        x_train, to_y(arrays["y_train"]), x_test, to_y(arrays["y_test"]), 10
    )


# --------------------------------------------------------------------------------------
# The paper's datasets (Section 5, Table 2) in torchvision's on-disk layout, and one
# entry point

DATA_ENV = "SMASO_DATA"
PREPROCESS = ("authors", "standardize", "none")


@dataclass(frozen=True)
class Dataset:
    """One entry of :data:`DATASETS`: what a dataset is and where its files come from.

    ``batch_size`` is the authors' batch size for it (CIFAR-100: 100, so that a
    balanced batch holds one image per class). ``files``: (folder under the data root,
    training files, test files) exactly as torchvision's ``torchvision_class`` downloads
    and extracts them, or None for a dataset read otherwise.
    """

    description: str
    num_classes: int
    batch_size: int
    files: tuple | None = None
    torchvision_class: str | None = None
    display: str = ""  # its name in the book's tables and figures


#: Dataset name -> :class:`Dataset`. A new torchvision-layout dataset is one entry here
#: (and a reader in :func:`read_raw` if its files are not CIFAR pickles or SVHN .mat).
DATASETS = {
    "cifar10": Dataset(
        "CIFAR-10 (torchvision's files)",
        10,
        50,
        (
            "cifar-10-batches-py",
            tuple(f"data_batch_{i}" for i in range(1, 6)),
            ("test_batch",),
        ),
        "CIFAR10",
        "CIFAR-10",
    ),
    "cifar100": Dataset(
        "CIFAR-100, fine labels (torchvision's files)",
        100,
        100,
        ("cifar-100-python", ("train",), ("test",)),
        "CIFAR100",
        "CIFAR-100",
    ),
    "svhn": Dataset(
        "SVHN train and test, digit 0 labelled 0 (torchvision's files)",
        10,
        50,
        ("", ("train_32x32.mat",), ("test_32x32.mat",)),
        "SVHN",
        "SVHN",
    ),
    "cifar10-subset": Dataset(
        "the first 4000 CIFAR-10 training and 1000 test images (cifar10-subset.npz)",
        10,
        50,
        display="CIFAR-10 subset",
    ),
    "digits": Dataset(
        "scikit-learn's 8x8 handwritten digits", 10, 50, display="digits"
    ),
}
#: The datasets of the paper's Table 2, in its order.
TABLE2_DATASETS = ("svhn", "cifar10", "cifar100")
#: Number of classes per dataset (a view of :data:`DATASETS`).
NUM_CLASSES = {name: d.num_classes for name, d in DATASETS.items()}


def _check_name(name):
    choice("dataset", name, DATASETS)


def _torchvision(name):
    _check_name(name)
    if DATASETS[name].files is None:
        downloadable = [n for n, d in DATASETS.items() if d.files is not None]
        raise ValueError(
            f"{name!r} is not a torchvision dataset (those are "
            f"{', '.join(downloadable)})"
        )
    return DATASETS[name]


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the torchvision datasets: ``root``, else ``$SMASO_DATA``, else
    ``./data``."""
    if root is not None:
        return Path(root)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path("data")


def expected_files(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The files :func:`read_raw` reads for ``name`` (torchvision's layout under
    :func:`data_root`)."""
    folder, train, test = _torchvision(name).files
    base = data_root(root) / folder
    return [base / f for f in train + test]


def download_dataset(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Let torchvision download, verify (md5) and extract ``name`` into the data root
    (:func:`data_root`); the files :func:`read_raw` then reads. Run it once before a
    sweep's shards start (CLI: ``python -m smaso download``), so that they do not all
    fetch the same files."""
    import torchvision

    cls = getattr(torchvision.datasets, _torchvision(name).torchvision_class)
    root = data_root(root)
    root.mkdir(parents=True, exist_ok=True)
    if name == "svhn":
        for split in ("train", "test"):
            cls(str(root), split=split, download=True)
    else:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    return expected_files(name, root)


def _pickle_get(d, key):
    """A field of a CIFAR pickle, whose keys are ``str`` or ``bytes`` depending on how
    it was read."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise KeyError(key)


def _read_cifar(path, label_key):
    import pickle

    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        x = np.asarray(_pickle_get(d, "data"), dtype=np.uint8)
        y = np.asarray(_pickle_get(d, label_key), dtype=np.int64)
    except (
        KeyError,
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        ValueError,
        AttributeError,
    ) as e:
        raise ValueError(
            f"{path} is not a CIFAR python batch (a pickled dict with 'data' and "
            f"'{label_key}'): {type(e).__name__}: {e}"
        ) from None
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(y) != len(x):
        raise ValueError(
            f"{path}: 'data' has shape {x.shape} and {len(y)} labels, expected (N, "
            "3072) and N labels"
        )
    return x.reshape(-1, 3, 32, 32), y


def _read_svhn(path):
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - scipy comes with scikit-learn
        raise ImportError(
            "reading SVHN's .mat files needs scipy (pip install scipy)"
        ) from e
    try:
        m = loadmat(str(path))
        x, y = m["X"], m["y"]
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise ValueError(
            f"{path} is not an SVHN .mat file with arrays 'X' and 'y': "
            f"{type(e).__name__}: {e}"
        ) from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise ValueError(
            f"{path}: 'X' has shape {x.shape} and 'y' {y.shape}, expected (32, 32, 3, "
            "N) and N labels"
        )
    y = y.reshape(-1).astype(np.int64)
    y[y == 10] = 0  # SVHN labels digit 0 as 10; torchvision maps it to 0, so do we
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8), y


def read_raw(
    name: str, root: str | os.PathLike | None = None, download: bool = False
) -> dict:
    """uint8 images (N, 3, 32, 32) and int64 labels of CIFAR-10, CIFAR-100 (fine labels)
    or SVHN.

    Reads the files torchvision's ``CIFAR10``, ``CIFAR100`` and ``SVHN`` datasets
    download (their layout under :func:`data_root`), directly into arrays.
    ``download=True`` first lets torchvision download, verify and extract them (off by
    default: nothing goes to the network unless asked). A missing file raises
    ``FileNotFoundError`` naming it. SVHN: train and test only (the paper uses no
    "extra"), digit 0 labelled 0. The data of Table 2 (Section 5).
    """
    files = expected_files(name, root)
    if download:
        download_dataset(name, root)
    missing = [f for f in files if not f.is_file()]
    if missing:
        src = (
            "argument"
            if root is not None
            else (f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "default ./data")
        )
        raise FileNotFoundError(
            f"{name}: expected file {missing[0]} not found (data root "
            f"{data_root(root).resolve()}, from the {src}"
            f"{f'; {len(missing) - 1} more missing' if len(missing) > 1 else ''}). It "
            "is torchvision's "
            f"{DATASETS[name].torchvision_class} layout: download it with "
            "download=True (CLI: "
            "--download), or point "
            f"${DATA_ENV} or --data-root at the folder that holds it."
        )
    _, train_files, _ = DATASETS[name].files
    parts = []
    for f in files:
        if name == "svhn":
            parts.append(_read_svhn(f))
        else:
            parts.append(
                _read_cifar(f, "labels" if name == "cifar10" else "fine_labels")
            )
    n_train = len(train_files)

    def cat(ps, i):
        return np.concatenate([p[i] for p in ps])

    raw = {
        "x_train": cat(parts[:n_train], 0),
        "y_train": cat(parts[:n_train], 1),
        "x_test": cat(parts[n_train:], 0),
        "y_test": cat(parts[n_train:], 1),
    }
    C = DATASETS[name].num_classes
    for k in ("y_train", "y_test"):
        if raw[k].size and (raw[k].min() < 0 or raw[k].max() >= C):
            raise ValueError(f"{name}: {k} has labels outside 0..{C - 1}")
    return raw


def per_image_scale(x: torch.Tensor) -> torch.Tensor:
    """The authors' preprocessing for Table 2 (Section 5; their released code): per
    image, subtract the mean over all pixels and channels, then divide by the largest
    absolute value.

    Every image then lies in [-1, 1] with mean 0 and max |x| = 1 (a constant image stays
    0). No statistics are shared between images, so train and test are treated alike.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError("x must be a floating-point tensor of images (N, ...)")
    dims = tuple(range(1, x.ndim))
    scale = x.abs().amax(dim=dims, keepdim=True)
    x = x - x.mean(dim=dims, keepdim=True)
    m = x.abs().amax(dim=dims, keepdim=True)
    flat = (
        m <= 64 * torch.finfo(x.dtype).eps * scale
    )  # constant up to rounding: 0, not rounding noise / itself
    return torch.where(
        flat, torch.zeros_like(x), x / torch.where(flat, torch.ones_like(m), m)
    )


def channel_standardize(
    x_train: torch.Tensor, x_test: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The common alternative to :func:`per_image_scale` (not the authors', Section 5):
    each channel
    minus the training split's mean, over its standard deviation, for both splits."""
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x_train - mean) / std, (x_test - mean) / std


def load(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    preprocess: str = "authors",
    download: bool = False,
    dtype=torch.float32,
    device=None,
    upsample: int = 1,
    subset_path: str | os.PathLike | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> TensorData:
    """One dataset of the Table 2 pipeline (Section 5) as a :class:`TensorData` on
    ``device``.

    ``name``: ``"cifar10"``, ``"cifar100"``, ``"svhn"`` (torchvision files, see
    :func:`read_raw`), ``"cifar10-subset"`` (see :func:`find_cifar10_subset`;
    ``subset_path`` overrides where) or ``"digits"`` (scikit-learn's 8x8 digits, split
    as :func:`digits` does). Pixels are scaled to [0, 1], then ``preprocess``:
    ``"authors"`` (:func:`per_image_scale`), ``"standardize"``
    (:func:`channel_standardize`) or ``"none"``. ``upsample`` repeats each pixel that
    many times along both axes (nearest neighbour), e.g. 2 turns the digits into 16x16
    images. ``limit_train`` / ``limit_test`` keep the first images of each split (for
    quick checks).
    """
    _check_name(name)
    choice("preprocess", preprocess, PREPROCESS)
    positive_int("upsample", upsample)
    for lim_name, lim in (("limit_train", limit_train), ("limit_test", limit_test)):
        if lim is not None:
            positive_int(lim_name, lim)
    if name == "digits":
        d = digits(dtype=torch.float64)
        x_train, y_train, x_test, y_test = d.x_train, d.y_train, d.x_test, d.y_test
    else:
        if name == "cifar10-subset":
            raw = cifar10_subset(subset_path, standardize=False, dtype=torch.float64)
            x_train, y_train, x_test, y_test = (
                raw.x_train,
                raw.y_train,
                raw.x_test,
                raw.y_test,
            )
        else:
            raw = read_raw(name, root, download)

            def to_x(a):
                return torch.from_numpy(a).to(torch.float64) / 255.0

            x_train, x_test = to_x(raw["x_train"]), to_x(raw["x_test"])
            y_train, y_test = (
                torch.from_numpy(raw["y_train"]),
                torch.from_numpy(raw["y_test"]),
            )
    if limit_train is not None:
        x_train, y_train = x_train[:limit_train], y_train[:limit_train]
    if limit_test is not None:
        x_test, y_test = x_test[:limit_test], y_test[:limit_test]
    if preprocess == "authors":
        x_train, x_test = per_image_scale(x_train), per_image_scale(x_test)
    elif preprocess == "standardize":
        x_train, x_test = channel_standardize(x_train, x_test)
    if upsample > 1:

        def up(x):
            return x.repeat_interleave(upsample, dim=2).repeat_interleave(
                upsample, dim=3
            )

        x_train, x_test = up(x_train), up(x_test)
    data = TensorData(
        x_train.to(dtype),
        y_train.long(),
        x_test.to(dtype),
        y_test.long(),
        DATASETS[name].num_classes,
    )
    return data.to(device) if device is not None else data


# --------------------------------------------------------------------------------------
# Batches of one epoch, drawn as index tensors (no per-sample Python loader)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch: the same seeding as :func:`smaso.train.fit`."""
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))


def shuffled_batches(
    n: int, batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """A random permutation of ``range(n)`` cut into batches (the last one may be
    smaller)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got {n} and {batch_size}")
    return list(torch.randperm(n, generator=generator).split(batch_size))


#: Rounds of redrawing the class-balanced batches that picked an image twice, before
#: those left draw without replacement (:func:`balanced_batches`). Enough that data
#: with 30 or more images per class draw as plain redrawing does, with odds of 1e-12
#: against (5 of 30 images in each of 10 classes: 3 % of batches come out distinct);
#: a round costs microseconds.
_REDRAWS = 1000


def balanced_batches(
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Class-balanced batches as the authors' code draws them for Table 2 (Section 5):
    (B, batch_size) indices.

    ``B = len(y) // batch_size`` batches. Each batch holds ``batch_size // C`` images of
    every class (C classes) plus one image of each of ``batch_size % C`` classes picked
    at random, e.g. 5 per class for CIFAR-10 with batches of 50, 1 per class for
    CIFAR-100 with batches of 100. Within a batch the images are distinct, drawn
    uniformly from their class; batches are drawn independently, so an epoch need not
    visit every image.
    """
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype != torch.long:
        raise ValueError("y must be a 1-D tensor of int64 labels")
    y = y.cpu()
    C = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if batch_size < 1 or len(y) < batch_size:
        raise ValueError(
            f"batch_size must be in 1..{len(y)} (the number of labels), got "
            f"{batch_size}"
        )
    counts = torch.bincount(y, minlength=C)
    per, rem = divmod(batch_size, C)
    need = per + (1 if rem else 0)
    if int(counts.min()) < need:
        c = int(counts.argmin())
        raise ValueError(
            f"class {c} has {int(counts[c])} images, fewer than the {need} a balanced "
            "batch of "
            f"{batch_size} over {C} classes may need"
        )
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    B = len(y) // batch_size
    cls = torch.arange(C).repeat(per).expand(B, -1)
    if rem:
        extra = torch.rand(B, C, generator=generator).argsort(dim=1)[:, :rem]
        cls = torch.cat([cls, extra], dim=1)

    def draw(c):
        u = torch.rand(c.shape, generator=generator, dtype=torch.float64)
        return order[starts[c] + (u * counts[c]).long()]

    idx = draw(cls)
    for _ in range(_REDRAWS):  # redraw the (rare) batches that picked an image twice
        s = idx.sort(dim=1).values
        bad = (s[:, 1:] == s[:, :-1]).any(dim=1)
        if not bool(bad.any()):
            return idx
        idx[bad] = draw(cls[bad])
    # classes so small that independent draws almost never come out distinct: the
    # batches still bad draw each class's images without replacement (the same
    # distribution, uniform over batches of distinct images)
    s = idx.sort(dim=1).values
    for b in (s[:, 1:] == s[:, :-1]).any(dim=1).nonzero().flatten().tolist():
        for c in cls[b].unique().tolist():
            slots = (cls[b] == c).nonzero().flatten()
            pick = torch.randperm(int(counts[c]), generator=generator)[: len(slots)]
            idx[b, slots] = order[starts[c] + pick]
    return idx


def epoch_batches(
    y: torch.Tensor,
    batch_size: int,
    seed: int,
    epoch: int,
    balanced: bool = False,
    num_classes: int | None = None,
) -> list[torch.Tensor]:
    """Index tensors of one epoch's batches, on ``y``'s device; reproducible from
    ``(seed, epoch)``.

    Class-balanced (:func:`balanced_batches`, the authors' sampling for Table 2, Section
    5) or a shuffle of the whole training set (:func:`shuffled_batches`). The indices
    are drawn on the CPU and moved to the device in one transfer, so they are the same
    on every device.
    """
    g = _epoch_generator(seed, epoch)
    if balanced:
        idx = balanced_batches(y, batch_size, g, num_classes).to(y.device)
        return list(idx.unbind(0))
    return [b.to(y.device) for b in shuffled_batches(len(y), batch_size, g)]
