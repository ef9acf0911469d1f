"""The run configuration of the Section 5 experiment: every default and every choice,
written once.

:class:`RunConfig` holds everything that determines a run's numbers. Each field carries
its help text and its choices (a registry of the package), from which the command line
is derived (:mod:`smaso.__main__`). Two protocols (:data:`PROTOCOLS`) fill the fields
on which the paper and the authors' released code differ; a field given explicitly
wins over the protocol.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch

from ..checks import choice, finite_number, nonneg_int, positive_int
from ..data import DATASETS, PREPROCESS
from ..filters import EXACT
from ..models import ACTIVATIONS, BN_MOMENTUM, MODELS
from ..orthogonal import PENALTIES
from .frame import config_from_dict, option

__all__ = [
    "DTYPES",
    "OPTIMIZERS",
    "ORTHOGONALITY",
    "PAPER_GS_SWISH_CIFAR100",
    "PAPER_TABLE2",
    "PRECISIONS",
    "PROTOCOLS",
    "TABLE2_LRS",
    "Protocol",
    "RunConfig",
    "config_fields",
]

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
ORTHOGONALITY = ("none", *PENALTIES, *EXACT)
OPTIMIZERS = ("adam", "adam-no-bias-correction")
TABLE2_LRS = (1e-3, 5e-4, 1e-4)

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


@dataclass(frozen=True)
class Protocol:
    """A reading of Section 5: the values of the protocol-dependent fields of a run
    (``run``: field -> value, or a function of the config), the defaults of the Table 2
    grid (``grid``, :func:`smaso.experiment.study.table2_configs`; a value or a function
    of the exact row's network), and the table's ± convention (``ddof`` of the standard
    deviation over seeds)."""

    description: str
    run: dict
    grid: dict
    ddof: int

    def resolve(self, config) -> dict:
        """The protocol's value of every protocol-dependent field, for ``config``."""
        return {k: v(config) if callable(v) else v for k, v in self.run.items()}


def _exact(c) -> bool:
    return c.orthogonality in EXACT


#: "paper": what §5 and Appendix D state, with the authors' code where the paper is
#: silent (network, batches, preprocessing, batch norm), and PyTorch's Adam; the runs of
#: the paper-protocol study. "authors": every difference of the released code (OMASO for
#: the penalty runs, SMASO for the Gram-Schmidt + swish runs) that could move the
#: numbers: see each entry.
PROTOCOLS = {
    "paper": Protocol(
        "the paper's reading (Section 5, Appendix D); PyTorch's Adam",
        run={
            "optimizer": "adam",
            "conv_bias": True,
            "bn_last": True,
            "orthogonal_dense": True,
            "apodize": False,
        },
        grid={
            "penalty": "filters",
            "exact_activation": "swish",
            "exact_method": "qr",
            "exact_lrs": None,
            "exact_epochs": None,
            "exact_control": False,
        },
        ddof=1,
    ),
    "authors": Protocol(
        "the authors' released code (OMASO, SMASO)",
        run={
            # their hand-written Adam has no bias correction
            "optimizer": "adam-no-bias-correction",
            # no bias on a convolution that batch norm follows (it would be redundant)
            "conv_bias": False,
            # the penalty script's largeCNN: no batch norm after the last 1x1 conv
            "bn_last": lambda c: c.model != "large-cnn-code",
            # the Gram-Schmidt script leaves the dense layer as it is
            "orthogonal_dense": False,
            # ... and apodises the smallCNN's filters (Hamming window, centred)
            "apodize": lambda c: _exact(c) and c.model.startswith("small-cnn"),
        },
        grid={
            "penalty": "templates",  # what produced the published numbers
            "exact_activation": "swish-softplus",  # eta = softplus(rho), rho0 = 0.5
            "exact_method": "gs-unnormalised",
            # the Gram-Schmidt script: 100 epochs, at 1e-3 and 2e-4 for the largeCNN,
            # at 5e-3, 1e-3 and 2e-4 for the smallCNN
            "exact_lrs": lambda model: (
                (5e-3, 1e-3, 2e-4) if model.startswith("small-cnn") else (1e-3, 2e-4)
            ),
            "exact_epochs": 100,
            "exact_control": True,  # {swish, ReLU} x {Gram-Schmidt, none}
        },
        ddof=0,  # the authors' plot script
    ),
}


#: What fills a protocol-dependent field left at None (shown in the --help).
BY_PROTOCOL = "the protocol's"


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines the numbers of one run of the Table 2 experiment
    (Section 5). Bad values raise ``ValueError`` naming the field.

    The fields left at ``None`` by default are filled in: ``batch_size`` with the
    authors' batch size for the dataset (:data:`smaso.data.DATASETS`), the
    protocol-dependent fields (``optimizer``, ``conv_bias``, ``bn_last``,
    ``orthogonal_dense``, ``apodize``) from :data:`PROTOCOLS`. ``lam`` is set to 0 when
    ``orthogonality`` is not a penalty, so that it cannot tell equal runs apart.
    """

    dataset: str = option("cifar10", "dataset", DATASETS, row=True)
    model: str = option(
        "large-cnn-code",
        "network: small-cnn(-v2), large-cnn-code(-v2) are the authors' code's, "
        "large-cnn Appendix D's listing",
        MODELS,
    )
    activation: str = option(
        "relu",
        "swish: learnable beta-VQ ReLU per channel (Proposition 7)",
        ACTIVATIONS,
        row=True,
    )
    orthogonality: str = option(
        "none",
        "none; a penalty (filters: the paper's, templates: the authors' code's); "
        "exact: qr, gs, mgs, gs-unnormalised (the authors' code's)",
        ORTHOGONALITY,
        row=True,
    )
    lam: float = option(1.0, "penalty weight lambda (paper: 1)")
    lr: float = option(1e-3, "Adam learning rate", row=True)
    batch_size: int | None = option(
        None, "default: the authors' (50; 100 for CIFAR-100)"
    )
    epochs: int = option(120, "epochs per run (authors' penalty code: 120)")
    seed: int = option(0, "seed of the initialisation and of the batches", row=True)
    preprocess: str = option(
        "authors",
        "authors: per image, minus mean, over max |x|; standardize: per channel",
        PREPROCESS,
    )
    balanced: bool = option(
        True, "class-balanced batches (the authors'); else a shuffle"
    )
    dtype: str = option("float32", "parameter and image dtype", tuple(DTYPES))
    precision: str = option(
        "auto", "auto: bf16 autocast on CUDA, full precision elsewhere", PRECISIONS
    )
    bn_momentum: float = option(
        BN_MOMENTUM, "batch-norm running-average momentum (TensorFlow's decay 0.99)"
    )
    upsample: int = option(1, "repeat pixels (e.g. 2 for 16x16 digits)")
    limit_train: int | None = option(None, "keep the first N training images")
    limit_test: int | None = option(None, "keep the first N test images")
    protocol: str = option(
        "paper",
        "fills the fields below: paper (Section 5) or authors (their code)",
        PROTOCOLS,
    )
    optimizer: str | None = option(
        None,
        "adam (PyTorch's) or adam-no-bias-correction (the authors')",
        OPTIMIZERS,
        filled=BY_PROTOCOL,
    )
    conv_bias: bool | None = option(
        None,
        "a (redundant) bias on convolutions that batch norm follows",
        filled=BY_PROTOCOL,
    )
    bn_last: bool | None = option(
        None,
        "batch norm after the last convolution (authors' v1 largeCNN: none)",
        filled=BY_PROTOCOL,
    )
    orthogonal_dense: bool | None = option(
        None,
        "exact orthogonality on the dense layer too (authors' code: no)",
        filled=BY_PROTOCOL,
    )
    apodize: bool | None = option(
        None,
        "Hamming-window and centre conv filters (authors' smallCNN exact runs)",
        filled=BY_PROTOCOL,
    )
    reanchor_every: int = option(
        0,
        "every N steps (and before the first) re-anchor the raw weights of the exact "
        "QR/Gram-Schmidt layers to their orthogonal factor, so that a square layer "
        "never flips or dies (smaso.orthogonal.reanchor_; 100 recommended; 0: never)",
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed is not None and getattr(self, f.name) is not None:
                choice(f.name, getattr(self, f.name), allowed)
        lam = finite_number("lam (the penalty weight)", self.lam, 0)
        object.__setattr__(self, "lam", lam if self.orthogonality in PENALTIES else 0.0)
        object.__setattr__(self, "lr", finite_number("lr", self.lr, 0, low_open=True))
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", DATASETS[self.dataset].batch_size)
        for name in ("batch_size", "epochs", "upsample"):
            positive_int(name, getattr(self, name))
        nonneg_int("seed", self.seed)
        nonneg_int("reanchor_every", self.reanchor_every)
        finite_number("bn_momentum", self.bn_momentum, 0, 1, low_open=True)
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        for name, value in PROTOCOLS[self.protocol].resolve(self).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for f in dataclasses.fields(self):
            if f.type == "bool | None" or f.type == "bool":
                v = getattr(self, f.name)
                if not isinstance(v, bool):
                    raise ValueError(f"{f.name} must be True or False, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The config of ``d`` (:meth:`to_dict`; a stored config that predates a field
        gets its default)."""
        return config_from_dict(cls, d)

    def identity(self) -> dict:
        """The fields that name the run: all of them, except a field added after the
        first results format (``protocol`` and the protocol-dependent ones; those of
        :data:`LATER_FIELDS`) while it holds the paper protocol's value (its default),
        so that earlier runs keep their names."""
        d = self.to_dict()
        paper = {
            "protocol": "paper",
            **PROTOCOLS["paper"].resolve(self),
            **LATER_FIELDS,
        }
        return {k: v for k, v in d.items() if k not in paper or v != paper[k]}

    def run_id(self) -> str:
        """A file-name-safe name: the main fields, then 8 hex digits of a hash of
        :meth:`identity`."""
        digest = hashlib.sha256(
            json.dumps(self.identity(), sort_keys=True).encode()
        ).hexdigest()[:8]
        orth = self.orthogonality + (
            f"-lam{self.lam:g}" if self.orthogonality in PENALTIES else ""
        )
        head = f"{self.dataset}_{self.model}_{self.activation}_{orth}"
        return f"{head}_lr{self.lr:g}_s{self.seed}_{digest}"


#: Fields added after the first results format that are not the protocols' (their
#: default leaves a run's name as it was).
LATER_FIELDS = {"reanchor_every": 0}


def config_fields(*, rows: bool = True) -> list[dataclasses.Field]:
    """The fields of :class:`RunConfig` (without the per-row ones if ``rows=False``), in
    order, for building a command line."""
    return [f for f in dataclasses.fields(RunConfig) if rows or not f.metadata["row"]]
