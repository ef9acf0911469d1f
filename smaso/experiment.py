"""The classification experiment of Section 5 (Table 2 and the Gram-Schmidt + swish run)
as a resumable pipeline: one run, a sweep of runs, and the table that aggregates them.

* :class:`RunConfig` holds everything that determines a run's numbers (dataset, model,
  activation, orthogonality, λ, learning rate, batch size, epochs, seed, preprocessing,
  sampling, precision); :meth:`RunConfig.run_id` names it.
* :func:`run` trains one configuration with Adam, writes a checkpoint after every epoch
  (model, optimizer, history; atomically) and resumes from it after a kill, losing at
  most the epoch in progress. At the end it writes one results JSON (config, seed,
  metrics per epoch, wall time, device, torch version, git commit) atomically, and never
  overwrites an existing one: a finished run is skipped, a clash is an error.
* :func:`table2_configs` lists the runs of Table 2 (datasets x learning rates x
  {baseline, penalty} x seeds, plus the exactly orthogonal + swish row), :func:`shard`
  splits them across machines, :func:`sweep` runs a list of them, skipping finished
  ones, and :func:`table2` / :func:`format_table` aggregate results into Table 2's
  layout (mean ± std over seeds).

Numbers reported per run (as the authors' plots): the test accuracy averaged over the
last three epochs (``final_test_acc``) and the best epoch's (``best_test_acc``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .activations import BetaVQReLU
from .data import DATASETS, NUM_CLASSES, PREPROCESS, TensorData, epoch_batches, load
from .models import (
    ACTIVATIONS,
    ORTHOGONALITY,
    _orthogonalise,
    extra_loss,
    large_cnn,
    large_cnn_code,
    num_parameters,
    small_cnn,
)
from .orthogonal import PENALTIES, filter_matrix, orthogonal_layers
from .train import evaluate, train_epoch

__all__ = [
    "BATCH_SIZE",
    "MODELS",
    "PAPER_GS_SWISH_CIFAR100",
    "PAPER_TABLE2",
    "PRECISIONS",
    "TABLE2_LRS",
    "CheckpointError",
    "ResultsError",
    "RunConfig",
    "build_model",
    "checkpoint_path",
    "filters_cos2",
    "format_table",
    "load_checkpoint",
    "load_result",
    "load_results",
    "load_trained_model",
    "model_path",
    "orthogonality_error",
    "parse_shard",
    "result_path",
    "run",
    "run_status",
    "setting_of",
    "shard",
    "sweep",
    "table2",
    "table2_configs",
    "write_json_atomic",
]

MODELS = (
    "small-cnn",
    "small-cnn-v2",
    "large-cnn",
    "large-cnn-code",
    "large-cnn-code-v2",
)
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# batch sizes of the authors' code (CIFAR-100: 100, so that a balanced batch holds one
# image per class)
BATCH_SIZE = {
    "cifar10": 50,
    "svhn": 50,
    "cifar100": 100,
    "cifar10-subset": 50,
    "digits": 50,
}
TABLE2_LRS = (1e-3, 5e-4, 1e-4)
RESULT_FORMAT = "smaso-run/1"
CHECKPOINT_FORMAT = "smaso-checkpoint/1"

# Table 2 of the paper: test accuracy (%), mean ± std over 5 runs, largeCNN, Adam at
# three learning rates.
PAPER_TABLE2 = {
    ("svhn", "baseline"): {1e-3: (94.3, 0.1), 5e-4: (94.4, 0.1), 1e-4: (93.4, 0.0)},
    ("svhn", "ortho"): {1e-3: (94.6, 0.2), 5e-4: (95.0, 0.2), 1e-4: (93.8, 0.1)},
    ("cifar10", "baseline"): {1e-3: (80.3, 0.4), 5e-4: (80.2, 0.2), 1e-4: (76.2, 0.3)},
    ("cifar10", "ortho"): {1e-3: (84.0, 0.3), 5e-4: (82.3, 0.1), 1e-4: (79.1, 0.2)},
    ("cifar100", "baseline"): {1e-3: (43.6, 0.2), 5e-4: (44.1, 0.4), 1e-4: (37.5, 0.5)},
    ("cifar100", "ortho"): {1e-3: (46.1, 0.2), 5e-4: (46.3, 0.2), 1e-4: (42.1, 0.3)},
}
# Section 5, after Table 2: one run, largeCNN with Gram-Schmidt-orthogonalised layers
# and swish, CIFAR-100.
PAPER_GS_SWISH_CIFAR100 = 61.2


class ResultsError(ValueError):
    """A results file that cannot be read, or that holds another configuration than the one asked for."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another configuration."""


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines the numbers of one run of the Table 2 experiment
    (Section 5).

    ``batch_size=None`` takes the authors' batch size for the dataset
    (:data:`BATCH_SIZE`). ``lam`` is the penalty weight (the paper: 1, not
    cross-validated); it is set to 0 when ``orthogonality`` is not a penalty, so that it
    cannot tell equal runs apart. ``bn_momentum``: the batch-norm running-average
    momentum (0.01 = TensorFlow's decay 0.99, the authors'; with few steps per epoch,
    e.g. the CIFAR-10 subset, 0.1 keeps the evaluation statistics from lagging an epoch
    behind; unused by Appendix D's "large-cnn", which has no batch norm). ``precision``:
    "auto" (bf16 autocast on CUDA, full precision elsewhere), "fp32" or "bf16". Bad
    values raise ``ValueError`` naming the field.
    """

    dataset: str = "cifar10"
    model: str = "large-cnn-code"
    activation: str = "relu"
    orthogonality: str = "none"
    lam: float = 1.0
    lr: float = 1e-3
    batch_size: int | None = None
    epochs: int = 120
    seed: int = 0
    preprocess: str = "authors"
    balanced: bool = True
    dtype: str = "float32"
    precision: str = "auto"
    bn_momentum: float = 0.01
    upsample: int = 1
    limit_train: int | None = None
    limit_test: int | None = None

    def __post_init__(self):
        choices = {
            "dataset": DATASETS,
            "model": MODELS,
            "activation": ACTIVATIONS,
            "orthogonality": ORTHOGONALITY,
            "preprocess": PREPROCESS,
            "dtype": tuple(DTYPES),
            "precision": PRECISIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}; got "
                    f"{getattr(self, name)!r}"
                )
        lam = self.lam
        if (
            isinstance(lam, bool)
            or not isinstance(lam, (int, float))
            or not (lam >= 0 and math.isfinite(lam))
        ):
            raise ValueError(
                f"lam (the penalty weight) must be a finite number >= 0, got {lam!r}"
            )
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not (self.lr > 0 and math.isfinite(self.lr))
        ):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", BATCH_SIZE[self.dataset])
        _positive_int("batch_size", self.batch_size)
        _positive_int("epochs", self.epochs)
        _positive_int("upsample", self.upsample)
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or self.seed < 0
        ):
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        m = self.bn_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {m!r}")
        if not isinstance(self.balanced, bool):
            raise ValueError(f"balanced must be True or False, got {self.balanced!r}")
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        object.__setattr__(
            self, "lam", float(lam) if self.orthogonality in PENALTIES else 0.0
        )
        object.__setattr__(self, "lr", float(self.lr))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a run config must be a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown run config fields: {sorted(unknown)}")
        return cls(**d)

    def run_id(self) -> str:
        """A file-name-safe name: the main fields, then 8 hex digits of a hash of the whole config."""
        digest = hashlib.sha256(
            json.dumps(self.to_dict(), sort_keys=True).encode()
        ).hexdigest()[:8]
        orth = self.orthogonality + (
            f"-lam{self.lam:g}" if self.orthogonality in PENALTIES else ""
        )
        return f"{self.dataset}_{self.model}_{self.activation}_{orth}_lr{self.lr:g}_s{self.seed}_{digest}"


# ----------------------------------------------------------------------------------------------
# model


def build_model(config: RunConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The network of ``config`` (seeded by ``config.seed``), with its activation and
    orthogonality options.

    "small-cnn"/"small-cnn-v2": :func:`smaso.models.small_cnn` version 1/2;
    "large-cnn-code"/ "large-cnn-code-v2": :func:`smaso.models.large_cnn_code` version
    1/2; "large-cnn": Appendix D's listing :func:`smaso.models.large_cnn` (no batch
    norm; "swish" there has one β per layer).
    """
    torch.manual_seed(config.seed)
    common = dict(
        num_classes=num_classes,
        in_channels=in_channels,
        activation=config.activation,
        orthogonality=config.orthogonality,
        lam=config.lam,
        bn_momentum=config.bn_momentum,
    )
    if config.model.startswith("small-cnn"):
        return small_cnn(version=2 if config.model.endswith("v2") else 1, **common)
    if config.model.startswith("large-cnn-code"):
        return large_cnn_code(version=2 if config.model.endswith("v2") else 1, **common)
    act = {"relu": nn.ReLU, "swish": lambda: BetaVQReLU(), "silu": nn.SiLU}[
        config.activation
    ]
    model = large_cnn(num_classes, in_channels, act)
    return _orthogonalise(model, config.orthogonality, config.lam)


@torch.no_grad()
def filters_cos2(model: nn.Module) -> list[float]:
    """Per Linear/Conv2d layer, the mean squared cosine between distinct filters: 0 when
    the filters
    are orthogonal (Eq. 11), what the penalty of Section 5 drives down."""
    out = []
    for m in orthogonal_layers(model):
        F = filter_matrix(m.weight.detach()).double()
        n = F.norm(dim=1, keepdim=True)
        F = F / torch.where(n > 0, n, torch.ones_like(n))
        G = (F @ F.T) ** 2
        k = G.shape[0]
        out.append(float((G.sum() - G.diagonal().sum()) / max(k * (k - 1), 1)))
    return out


@torch.no_grad()
def orthogonality_error(model: nn.Module) -> float:
    """Largest ``|G - I|`` over the Linear/Conv2d layers, ``G`` the Gram matrix of the
    filters (rows of :func:`smaso.orthogonal.filter_matrix`; of its columns when a layer
    has more filters than
    inputs). ~1e-6 in float32 for an exactly orthogonal layer (Eq. 11)."""
    err = 0.0
    for m in orthogonal_layers(model):
        F = filter_matrix(m.weight.detach()).double()
        G = F @ F.T if F.shape[0] <= F.shape[1] else F.T @ F
        err = max(
            err,
            float(
                (G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)).abs().max()
            ),
        )
    return err


# ----------------------------------------------------------------------------------------------
# files


def result_path(out_dir, config: RunConfig) -> Path:
    return Path(out_dir) / f"{config.run_id()}.json"


def checkpoint_path(out_dir, config: RunConfig) -> Path:
    return Path(out_dir) / "checkpoints" / f"{config.run_id()}.pt"


def model_path(out_dir, config: RunConfig) -> Path:
    return Path(out_dir) / "models" / f"{config.run_id()}.pt"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json_atomic(path, obj, overwrite: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file in the same
    folder, fsynced, then moved into place): a reader sees the old file or the new one,
    never half of one. With
    ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` and is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; not overwriting it")
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails if path appeared in the meantime
            except FileExistsError:
                raise FileExistsError(f"{path} exists; not overwriting it") from None
            except OSError:  # a filesystem without hard links
                if path.exists():
                    raise FileExistsError(
                        f"{path} exists; not overwriting it"
                    ) from None
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _save_torch_atomic(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_RESULT_KEYS = (
    "format",
    "run_id",
    "config",
    "seed",
    "history",
    "final_test_acc",
    "best_test_acc",
    "wall_s",
    "device",
    "torch",
)


def load_result(path) -> dict:
    """Read one results JSON written by :func:`run`; ``ResultsError`` (naming the file,
    which is left
    in place) if it is not one."""
    path = Path(path)
    try:
        r = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(
            f"results file {path} is corrupt (not valid JSON: {e}); it was left in "
            "place. "
            "Move it away (and rerun that configuration) or restore it."
        ) from None
    if not isinstance(r, dict) or r.get("format") != RESULT_FORMAT:
        raise ResultsError(
            f'{path} is not a smaso results file (no "format": "{RESULT_FORMAT}")'
        )
    missing = [k for k in _RESULT_KEYS if k not in r]
    if missing:
        raise ResultsError(f"results file {path} lacks {missing}; it was left in place")
    try:
        RunConfig.from_dict(r["config"])
    except (TypeError, ValueError) as e:
        raise ResultsError(
            f"results file {path} holds an invalid config: {e}"
        ) from None
    return r


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`run` (on the CPU); ``CheckpointError``
    (naming the file,
    which is left in place) if it cannot be read."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
            "it was left "
            "in place. Move or delete it to restart that run from epoch 0."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f'{path} is not a smaso checkpoint (no "format": "{CHECKPOINT_FORMAT}"); '
            "it was left in place"
        )
    return state


# ----------------------------------------------------------------------------------------------
# one run


def _git_commit():
    root = Path(__file__).resolve().parents[1]
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
        dirty = (
            bool(
                subprocess.run(
                    [
                        "git",
                        "-C",
                        str(root),
                        "status",
                        "--porcelain",
                        "--untracked-files=no",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout.strip()
            )
            if commit
            else None
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _resolve_device(device):
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_data(
    config: RunConfig, device, data_root=None, download=False, subset_path=None
) -> TensorData:
    return load(
        config.dataset,
        data_root,
        config.preprocess,
        download,
        DTYPES[config.dtype],
        device,
        config.upsample,
        subset_path,
        config.limit_train,
        config.limit_test,
    )


def _data_key(config: RunConfig):
    return (
        config.dataset,
        config.preprocess,
        config.dtype,
        config.upsample,
        config.limit_train,
        config.limit_test,
    )


def _summary(history):
    acc = [r["test_acc"] for r in history]
    return {
        "final_test_acc": float(np.mean(acc[-3:])),
        "best_test_acc": float(max(acc)),
        "last_test_acc": float(acc[-1]),
    }


def run(
    config: RunConfig,
    out_dir,
    *,
    data: TensorData | None = None,
    data_root=None,
    download: bool = False,
    subset_path=None,
    device=None,
    threads: int | None = None,
    save_model: bool = True,
    log: Callable[[str], None] | None = print,
    on_epoch: Callable[[int, nn.Module, dict], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Train one configuration of the Table 2 experiment (Section 5) into ``out_dir``;
    its results dict.

    Writes ``out_dir/checkpoints/RUN_ID.pt`` after every epoch and, at the end,
    ``out_dir/RUN_ID.json`` (see :func:`load_result`) and the trained weights
    ``out_dir/models/RUN_ID.pt``; the checkpoint is then removed. If the results file
    exists and holds this configuration, nothing is trained and it is returned (a
    finished run is skipped); if it holds another, ``ResultsError``. If a checkpoint
    exists, training resumes after its last epoch, so a killed run loses at most the
    epoch in progress; the resumed run computes the same numbers as an uninterrupted one
    (the batches of epoch ``e`` depend only on ``(seed, e)``).

    ``data`` reuses a loaded dataset (it must match the config's dataset options);
    otherwise it is loaded with ``data_root`` / ``download`` / ``subset_path``
    (:func:`smaso.data.load`). ``device`` "auto"/None picks CUDA when present; on CUDA
    the model and images use channels_last, and ``precision="auto"`` trains under bf16
    autocast. ``threads`` sets torch's CPU threads for the run. ``log`` receives one
    line per epoch (None: silent). ``on_epoch(epoch, model, record)`` is called after
    each epoch's checkpoint is written, ``on_batch(i)`` after each step.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    out_dir = Path(out_dir)
    rid = config.run_id()
    res_file, ckpt_file = result_path(out_dir, config), checkpoint_path(out_dir, config)
    if res_file.exists():
        r = load_result(res_file)
        if r["config"] != config.to_dict():
            raise ResultsError(
                f"{res_file} holds another configuration than {rid}; it was left in "
                "place"
            )
        if log:
            log(f"{rid}: finished already ({res_file}), skipped")
        return r
    say = log or (lambda s: None)
    old_threads = torch.get_num_threads()
    if threads is not None:
        _positive_int("threads", threads)
        torch.set_num_threads(threads)
    try:
        dev = _resolve_device(device)
        if data is None:
            data = _load_data(config, dev, data_root, download, subset_path)
        else:
            data = data.to(dev)
        if data.num_classes != NUM_CLASSES[config.dataset]:
            raise ValueError(
                f"data has {data.num_classes} classes, {config.dataset} has "
                f"{NUM_CLASSES[config.dataset]}"
            )
        cuda = dev.type == "cuda"
        dtype = DTYPES[config.dtype]
        model = build_model(config, data.x_train.shape[1], data.num_classes).to(
            dev, dtype
        )
        x_train, x_test = data.x_train.to(dtype), data.x_test.to(dtype)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
            x_train = x_train.contiguous(memory_format=torch.channels_last)
            x_test = x_test.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.bfloat16
            if (config.precision == "bf16" or (config.precision == "auto" and cuda))
            else None
        )
        if autocast is not None and not cuda and dev.type != "cpu":
            raise ValueError(f"bf16 autocast is not supported on {dev}")
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        history, start, wall_before, resumes, started = [], 0, 0.0, [], _now()
        if ckpt_file.exists():
            state = load_checkpoint(ckpt_file)
            if state.get("config") != config.to_dict():
                raise CheckpointError(
                    f"checkpoint {ckpt_file} belongs to another configuration than "
                    f"{rid}; "
                    "it was left in place"
                )
            try:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
            except (KeyError, RuntimeError, ValueError) as e:
                raise CheckpointError(
                    f"checkpoint {ckpt_file} does not fit run {rid} ({e}); it was "
                    "left in place"
                ) from None
            history, start = list(state["history"]), int(state["epoch"])
            wall_before, resumes, started = (
                float(state["wall_s"]),
                list(state["resumes"]) + [start],
                state["started"],
            )
            say(f"{rid}: resuming after epoch {start} from {ckpt_file}")
        xl = extra_loss(model)
        has_swish = any(isinstance(m, BetaVQReLU) for m in model.modules())
        exact = config.orthogonality in ("qr", "gs", "mgs")
        t_run = time.perf_counter()
        for epoch in range(start, config.epochs):
            t0 = time.perf_counter()
            batches = epoch_batches(
                data.y_train,
                config.batch_size,
                config.seed,
                epoch,
                config.balanced,
                data.num_classes,
            )
            tr = train_epoch(
                model, opt, x_train, data.y_train, batches, xl, autocast, on_batch
            )
            if cuda:
                torch.cuda.synchronize()
            train_s = time.perf_counter() - t0
            te = evaluate(model, x_test, data.y_test, autocast_dtype=autocast)
            rec = {
                "epoch": epoch + 1,
                "train_loss": tr["loss"],
                "train_acc": tr["acc"],
                "penalty": tr["penalty"],
                "test_loss": te["loss"],
                "test_acc": te["acc"],
                "filters_cos2": filters_cos2(model),
            }
            if exact:
                rec["orthogonality_error"] = orthogonality_error(model)
            if has_swish:
                rec["eta_mean"] = float(
                    torch.cat(
                        [
                            m.eta.detach().flatten().double().cpu()
                            for m in model.modules()
                            if isinstance(m, BetaVQReLU)
                        ]
                    ).mean()
                )
            rec["train_s"] = train_s
            rec["epoch_s"] = time.perf_counter() - t0
            history.append(rec)
            wall = wall_before + time.perf_counter() - t_run
            _save_torch_atomic(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": config.to_dict(),
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "history": history,
                    "wall_s": wall,
                    "resumes": resumes,
                    "started": started,
                },
                ckpt_file,
            )
            say(
                f"{rid} epoch {epoch + 1}/{config.epochs}: train loss "
                f"{tr['loss']:.3f} acc {tr['acc']:.3f}, "
                f"test acc {te['acc']:.3f} ({rec['epoch_s']:.1f} s)"
            )
            if on_epoch is not None:
                on_epoch(epoch + 1, model, rec)
        commit, dirty = _git_commit()
        result = {
            "format": RESULT_FORMAT,
            "run_id": rid,
            "config": config.to_dict(),
            "seed": config.seed,
            "status": "done",
            "history": history,
            **_summary(history),
            "wall_s": wall_before + time.perf_counter() - t_run,
            "epoch_s_mean": float(np.mean([r["epoch_s"] for r in history])),
            "num_parameters": num_parameters(model),
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if cuda else _cpu_name(),
            "threads": torch.get_num_threads(),
            "precision": "bf16-autocast" if autocast else config.dtype,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "smaso": __version__,
            "git_commit": commit,
            "git_dirty": dirty,
            "started": started,
            "finished": _now(),
            "resumes": resumes,
        }
        if save_model:
            _save_torch_atomic(
                {k: v.detach().cpu() for k, v in model.state_dict().items()},
                model_path(out_dir, config),
            )
        write_json_atomic(res_file, result)
        ckpt_file.unlink(missing_ok=True)
        try:
            ckpt_file.parent.rmdir()  # only if no other run's checkpoint is in there
        except OSError:
            pass
        say(
            f"{rid}: done, final test acc (mean of last 3 epochs) "
            f"{result['final_test_acc']:.4f}, "
            f"{result['wall_s']:.0f} s"
        )
        return result
    finally:
        torch.set_num_threads(old_threads)


def load_trained_model(out_dir, config: RunConfig, in_channels: int = 3) -> nn.Module:
    """The trained network of a finished run (from ``out_dir/models/RUN_ID.pt``), in evaluation mode."""
    file = model_path(out_dir, config)
    if not file.is_file():
        raise FileNotFoundError(f"no trained weights for {config.run_id()} at {file}")
    model = build_model(config, in_channels, NUM_CLASSES[config.dataset])
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(
            f"weights file {file} cannot be used ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    return model.to(DTYPES[config.dtype]).eval()


# ----------------------------------------------------------------------------------------------
# sweeps


def table2_configs(
    datasets=("cifar10", "cifar100", "svhn"),
    lrs=TABLE2_LRS,
    seeds=range(5),
    model="large-cnn-code",
    epochs=120,
    penalty="filters",
    lam=1.0,
    exact=True,
    exact_model=None,
    exact_activation="swish",
    exact_method="qr",
    exact_datasets=None,
    exact_lrs=None,
    exact_reference=False,
    **common,
) -> list[RunConfig]:
    """The runs of Table 2 (Section 5): ``datasets`` x ``lrs`` x {baseline, penalty} x
    ``seeds``, plus (``exact=True``) the exactly orthogonal + swish row of the paragraph
    after it.

    Baseline: ReLU, no penalty. Penalty: ``penalty`` ("filters" is the paper's,
    "templates" the authors' code's) with weight ``lam``. Exact row: ``exact_model``
    (default: version 2 of ``model``, whose layers can all be orthogonal) with
    ``exact_activation`` and ``exact_method`` ("qr" computes the same function as the
    paper's Gram-Schmidt "gs", faster), on ``exact_datasets`` (default CIFAR-100 if
    swept, as in the paper, else the first dataset) at ``exact_lrs`` (default ``lrs``);
    ``exact_reference=True`` adds ``exact_model`` with ReLU and no orthogonality there,
    a baseline on the same architecture. ``common`` goes to every :class:`RunConfig`.
    Ordered seed by seed, so that a partial sweep (or shard) holds whole tables for the
    first seeds.
    """
    datasets, lrs, seeds = list(datasets), [float(v) for v in lrs], list(seeds)
    if not datasets or not lrs or not seeds:
        raise ValueError("datasets, lrs and seeds must be non-empty")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    if exact_model is None:
        exact_model = model + "-v2" if model + "-v2" in MODELS else model
    if exact_datasets is None:
        exact_datasets = ["cifar100"] if "cifar100" in datasets else datasets[:1]
    exact_lrs = lrs if exact_lrs is None else [float(v) for v in exact_lrs]
    configs = []
    for seed in seeds:
        for ds in datasets:
            for lr in lrs:
                base = dict(
                    dataset=ds, model=model, lr=lr, epochs=epochs, seed=seed, **common
                )
                configs.append(RunConfig(**base))
                configs.append(RunConfig(orthogonality=penalty, lam=lam, **base))
            if exact and ds in exact_datasets:
                for lr in exact_lrs:
                    row = dict(
                        dataset=ds,
                        model=exact_model,
                        lr=lr,
                        epochs=epochs,
                        seed=seed,
                        **common,
                    )
                    if exact_reference:
                        configs.append(RunConfig(**row))
                    configs.append(
                        RunConfig(
                            activation=exact_activation,
                            orthogonality=exact_method,
                            **row,
                        )
                    )
    return configs


def parse_shard(text: str | None, environ=None) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> (i, n); ``"slurm"`` reads ``SLURM_ARRAY_TASK_ID``
    (minus
    ``SLURM_ARRAY_TASK_MIN``) and ``SLURM_ARRAY_TASK_COUNT``; None -> (0, 1)."""
    env = os.environ if environ is None else environ
    if text is None:
        return 0, 1
    if text == "slurm":
        try:
            i = int(env["SLURM_ARRAY_TASK_ID"]) - int(
                env.get("SLURM_ARRAY_TASK_MIN", 0)
            )
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError) as e:
            raise ValueError(
                "--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT "
                f"({e})"
            ) from None
    else:
        try:
            a, b = text.split("/")
            i, n = int(a), int(b)
        except ValueError:
            raise ValueError(
                f"shard must look like i/n (e.g. 0/4) or be 'slurm', got {text!r}"
            ) from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard i/n needs 0 <= i < n, got {i}/{n}")
    return i, n


def shard(configs, index: int, count: int) -> list:
    """Shard ``index`` of ``count``: every ``count``-th config from ``index``. The
    shards are disjoint
    and together hold every config, and each gets a mix of datasets and settings."""
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"shard needs 0 <= index < count, got {index}/{count}")
    return list(configs)[index::count]


def run_status(out_dir, config: RunConfig) -> str:
    """ "done" (results file present), "partial" (a checkpoint) or "todo"."""
    if result_path(out_dir, config).exists():
        return "done"
    return "partial" if checkpoint_path(out_dir, config).exists() else "todo"


def sweep(
    configs,
    out_dir,
    *,
    log: Callable[[str], None] | None = print,
    epoch_lines: bool = True,
    **runtime,
) -> list[dict]:
    """Run ``configs`` one after another into ``out_dir`` (:func:`run`), skipping
    finished ones and resuming partial ones; each dataset is loaded once. ``runtime``
    goes to :func:`run` (device, threads, data_root, download, subset_path, save_model).
    Prints progress: which run, how many are left, and an estimate of the time left from
    the epochs trained so far (``epoch_lines=False``:
    no per-epoch lines)."""
    say = log or (lambda s: None)
    configs = list(configs)
    todo = [c for c in configs if run_status(out_dir, c) != "done"]
    say(
        f"sweep: {len(configs)} runs, {len(configs) - len(todo)} finished already, "
        f"{len(todo)} to train"
    )
    cache, results = {}, []
    epochs_left = sum(c.epochs for c in todo)
    t0, trained = time.perf_counter(), 0
    for k, c in enumerate(configs, 1):
        if run_status(out_dir, c) == "done":
            results.append(run(c, out_dir, log=None))
            continue
        dev = _resolve_device(runtime.get("device"))
        key = _data_key(c) + (str(dev),)
        if key not in cache:
            cache.clear()  # keep one dataset in memory
            cache[key] = _load_data(
                c,
                dev,
                runtime.get("data_root"),
                runtime.get("download", False),
                runtime.get("subset_path"),
            )
        rate = (time.perf_counter() - t0) / trained if trained else None
        eta = f", about {rate * epochs_left / 60:.0f} min left" if rate else ""
        say(f"[{k}/{len(configs)}] {c.run_id()} ({epochs_left} epochs to go{eta})")

        def count(epoch, model, rec):
            nonlocal trained, epochs_left
            trained += 1
            epochs_left -= 1

        before = epochs_left
        results.append(
            run(
                c,
                out_dir,
                data=cache[key],
                log=log if epoch_lines else None,
                on_epoch=count,
                **runtime,
            )
        )
        epochs_left = (
            before - c.epochs
        )  # a resumed run trained fewer epochs than it counted for
    say(f"sweep: done, {len(results)} runs, {(time.perf_counter() - t0) / 60:.1f} min")
    return results


# ----------------------------------------------------------------------------------------------
# tables


def load_results(out_dir) -> list[dict]:
    """Every results file (``*.json``) directly in ``out_dir``, sorted by run id; a
    corrupt one raises
    ``ResultsError`` naming it."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no results folder {out_dir}")
    return [
        load_result(p)
        for p in sorted(out_dir.glob("*.json"))
        if not p.name.startswith(".")
    ]


def setting_of(config: dict) -> str:
    """The row label of a config within its dataset: "baseline", "Ortho (penalty ...)", "exact ..."."""
    act = "" if config["activation"] == "relu" else f" + {config['activation']}"
    o = config["orthogonality"]
    if o == "none":
        s = "baseline" if not act else f"no orthogonality{act}"
    elif o in PENALTIES:
        s = f"Ortho (penalty {o}, λ={config['lam']:g}){act}"
    else:
        s = f"exact orthogonal ({o}){act}"
    return f"{s} [{config['model']}]"


_ORDER = {
    "none": 0,
    "filters": 1,
    "filters_normalized": 2,
    "templates": 3,
    "qr": 4,
    "gs": 5,
    "mgs": 6,
}


def table2(results, metric: str = "final_test_acc") -> list[dict]:
    """Aggregate results into Table 2's layout: one row per dataset and setting (every
    config field but ``lr`` and ``seed``), one cell per learning rate with the mean and
    sample standard deviation
    (ddof = 1; 0 for a single seed) over seeds of ``metric`` in percent, and the seed count."""
    if metric not in ("final_test_acc", "best_test_acc", "last_test_acc"):
        raise ValueError(
            "metric must be final_test_acc, best_test_acc or last_test_acc, got "
            f"{metric!r}"
        )
    groups = {}
    for r in results:
        c = dict(r["config"])
        lr = c.pop("lr")
        c.pop("seed")
        key = json.dumps(c, sort_keys=True)
        groups.setdefault(key, {"config": c, "cells": {}})["cells"].setdefault(
            lr, []
        ).append(100 * r[metric])
    rows = []
    for g in groups.values():
        c = g["config"]
        cells = {
            lr: {
                "mean": float(np.mean(v)),
                "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "n": len(v),
                "values": v,
            }
            for lr, v in sorted(g["cells"].items(), reverse=True)
        }
        rows.append(
            {
                "dataset": c["dataset"],
                "setting": setting_of(c),
                "config": c,
                "cells": cells,
            }
        )
    rows.sort(
        key=lambda r: (
            DATASETS.index(r["dataset"]),
            MODELS.index(r["config"]["model"]),
            _ORDER[r["config"]["orthogonality"]],
            r["setting"],
        )
    )
    return rows


def format_table(rows, lrs=None, fmt: str = "markdown") -> str:
    """Table 2's layout as text: a row per setting, a column per learning rate, cells "mean ± std (n)"."""
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be markdown or text, got {fmt!r}")
    if lrs is None:
        lrs = sorted({lr for r in rows for lr in r["cells"]}, reverse=True)
    head = ["Setting"] + [f"LR = {lr:g}" for lr in lrs]
    body = []
    for r in rows:
        cells = []
        for lr in lrs:
            c = r["cells"].get(lr)
            cells.append(f"{c['mean']:.1f} ± {c['std']:.1f} ({c['n']})" if c else "–")
        body.append([f"{r['dataset']} {r['setting']}"] + cells)
    if fmt == "markdown":
        lines = [
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt_row = lambda x: "  ".join(
        s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(x, widths))
    )
    return "\n".join([fmt_row(head)] + [fmt_row(b) for b in body])
