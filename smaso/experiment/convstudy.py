"""The stored experiments of the convolution chapter (Theorem 4 for convolutions,
Section 5; future work 3 and 4 of Section 6), on the CIFAR-10 subset, CPU scale.

* **Accuracy** (:func:`run_cnn`): a small circular CNN whose constrained layers are
  square (:func:`orthogonal_cnn`: an unconstrained stem lifts 3 -> C channels, then
  two C -> C convolutions), so that an orthogonal operator has orthonormal *rows* and
  Theorem 4 (Eq. 11) applies to its units. Four arms for the C -> C layers: plain,
  QR-orthonormal filters (:class:`smaso.orthogonal.OrthogonalFilters`), Cayley and
  BCOP exactly orthogonal operators (:mod:`smaso.orthoconv`); Adam, a few epochs, 3
  seeds. The trained weights are stored beside each run (:func:`load_cnn`).
  :func:`circular_small_cnn` (the authors' smallCNN made circular, widening layers)
  remains the model of the cost benchmark.
* **Denoising** (:func:`run_denoise`): grayscale subset images plus Gaussian noise,
  denoised by :class:`smaso.denoise.TransformDenoiser` with the fixed block DCT, or a
  trained Cayley, BCOP, QR-filter or free convolution, soft or β-VQ shrinkage, at
  several noise levels.

A run is a :class:`CnnRun` or a :class:`DenoiseRun`; each study is a
:class:`smaso.experiment.frame.Study` over it (:data:`CNN`, :data:`DENOISE`), one
JSON file per run in ``book/results/convolution/``, written atomically, never over
another run's file unless ``force``. The command line is derived from the two
dataclasses; regenerate with::

    python -m smaso.experiment.convstudy cnn [--seeds 0,1,2] [--force]
    python -m smaso.experiment.convstudy denoise [--arms dct,cayley] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..checks import choice, nonneg_int, positive_int
from ..data import cifar10_subset
from ..denoise import TransformDenoiser, block_dct, psnr
from ..models import small_cnn
from ..orthoconv import (
    CircularConv2d,
    frequency_operator,
    offset_kernel,
    register_bcop,
    register_cayley,
    semi_unitary_error,
)
from ..orthogonal import OrthogonalFilters
from ..records import book_results, provenance, save_torch_atomic
from ..train import fit
from .frame import (
    ResultsError,
    Study,
    add_options,
    config_from_dict,
    config_to_dict,
    grid,
    option,
    read_record,
)

__all__ = [
    "CNN",
    "CNN_ARMS",
    "DENOISE",
    "DENOISE_ARMS",
    "RESULTS",
    "SIGMAS",
    "CnnRun",
    "DenoiseRun",
    "circular_small_cnn",
    "denoiser",
    "grayscale_subset",
    "load_cnn",
    "load_results",
    "main",
    "operator_error",
    "orthogonal_cnn",
    "parser",
    "restrict_to_span",
    "row_coherence",
    "run_cnn",
    "run_denoise",
    "square_layers",
    "unit_maso",
]

RESULTS = book_results("convolution")
CNN_ARMS = ("none", "qr", "cayley", "bcop")
DENOISE_ARMS = ("dct", "cayley", "bcop", "qr", "free")
SIGMAS = (0.05, 0.1, 0.2, 0.3)


@dataclass(frozen=True)
class CnnRun:
    """One run of the accuracy study: :func:`orthogonal_cnn` with ``arm`` on the
    CIFAR-10 subset, trained by :func:`smaso.train.fit` (Adam).

    Args:
        arm: the constraint of the two square layers, one of :data:`CNN_ARMS`.
        seed: the seed of the initial weights and of the batch order.
        width: the channels of every layer.
        epochs, lr, batch_size: the training budget (Adam).
        bn_momentum: the batch norms' running-average momentum.

    Example:
        >>> from smaso.experiment.convstudy import CnnRun
        >>> CnnRun("cayley", seed=2).run_id()
        'cnn-cayley-seed2'
    """

    arm: str = option("none", "constraint of the two square layers", CNN_ARMS, row=True)
    seed: int = option(0, "seed of the weights and of the batch order", row=True)
    width: int = option(16, "channels of every layer")
    epochs: int = option(10, "epochs")
    lr: float = option(1e-3, "Adam learning rate")
    batch_size: int = option(64, "batch size")
    bn_momentum: float = option(0.1, "batch-norm running-average momentum")

    def __post_init__(self):
        choice("arm", self.arm, CNN_ARMS)
        nonneg_int("seed", self.seed)
        for name in ("width", "epochs", "batch_size"):
            positive_int(name, getattr(self, name))

    def run_id(self) -> str:
        return f"cnn-{self.arm}-seed{self.seed}"


@dataclass(frozen=True)
class DenoiseRun:
    """One run of the denoising study: :func:`denoiser` (``arm``, ``shrink``) trained
    at each noise level of ``sigmas`` (Adam on the mean squared error, fresh noise
    every batch).

    Args:
        arm: the transform, one of :data:`DENOISE_ARMS`.
        shrink: the shrinkage, "soft" or "beta"
            (:attr:`smaso.denoise.TransformDenoiser.SHRINKS`).
        seed: the seed of the initial transform and of the noise.
        factor: the pixel-unshuffle factor (the transform has its square channels).
        kernel_size: the size of the trained transform's filters.
        steps, lr, batch_size: Adam's budget per noise level.
        lr_shrink: the learning rate of the shrinkage parameters.
        sigmas: the noise levels (a stored run without them had :data:`SIGMAS`).

    Example:
        >>> from smaso.experiment.convstudy import DenoiseRun
        >>> DenoiseRun("bcop", "beta").run_id()
        'denoise-bcop-beta'
    """

    arm: str = option("dct", "the transform", DENOISE_ARMS, row=True)
    shrink: str = option("soft", "the shrinkage", TransformDenoiser.SHRINKS, row=True)
    seed: int = option(0, "seed of the initial transform and of the noise")
    factor: int = option(4, "pixel-unshuffle factor (channels: its square)")
    kernel_size: int = option(3, "size of the trained transform's filters")
    steps: int = option(1000, "Adam steps per noise level")
    lr: float = option(1e-3, "learning rate of the transform")
    lr_shrink: float = option(1e-2, "learning rate of the shrinkage parameters")
    batch_size: int = option(64, "images per step")
    sigmas: tuple = option(SIGMAS, "noise levels", kind="floats")

    def __post_init__(self):
        choice("arm", self.arm, DENOISE_ARMS)
        choice("shrink", self.shrink, TransformDenoiser.SHRINKS)
        nonneg_int("seed", self.seed)
        for name in ("factor", "kernel_size", "steps", "batch_size"):
            positive_int(name, getattr(self, name))
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))

    def run_id(self) -> str:
        return f"denoise-{self.arm}-{self.shrink}"


def _read(path: Path) -> dict:
    """A stored run of either study (the config's type is known from the name)."""
    record = read_record(path)
    kind = CnnRun if path.name.startswith("cnn-") else DenoiseRun
    try:
        config_from_dict(kind, record["config"])
    except (TypeError, ValueError) as e:
        raise ResultsError(f"{path} holds an invalid {kind.__name__}: {e}") from None
    return record


#: The two studies' stored runs: ``RESULTS/cnn-ARM-seedN.json`` (beside it the
#: trained weights, ``.pt``) and ``RESULTS/denoise-ARM-SHRINK.json``.
CNN = Study(CnnRun, RESULTS, _read, "cnn-*.json")
DENOISE = Study(DenoiseRun, RESULTS, _read, "denoise-*.json")


def _circular(conv, arm, n):
    ci, co, k = conv.in_channels, conv.out_channels, conv.kernel_size[0]
    if arm == "cayley":
        new = CircularConv2d(ci, co, k, bias=conv.bias is not None)
    else:
        new = nn.Conv2d(
            ci, co, k, padding=(k - 1) // 2, padding_mode="circular",
            bias=conv.bias is not None,
        )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    if arm == "qr":
        parametrize.register_parametrization(new, "weight", OrthogonalFilters("qr"))
    elif arm == "cayley":
        register_cayley(new, n)
    elif arm == "bcop":
        register_bcop(new)
    return new


def circular_small_cnn(arm="none", image_size=32, num_classes=10, in_channels=3):
    """:func:`smaso.models.small_cnn` (version 1, batch-norm momentum 0.1) with each
    convolution replaced by a circular 'same' one, same initial weights: ``arm`` "none"
    (plain), "qr" (orthonormal flattened filters, Eq. 11 at one position), "cayley" or
    "bcop" (exactly orthogonal operators, Eq. 11 at all positions; the first layer, 3
    -> 32 channels, has orthonormal columns). Maps 32 -> 16 -> 8 pixels."""
    if arm not in CNN_ARMS:
        raise ValueError(f"arm must be one of {CNN_ARMS}, got {arm!r}")
    base = small_cnn(num_classes, in_channels, version=1, bn_momentum=0.1)
    layers, n = [], image_size
    for m in base:
        if isinstance(m, nn.Conv2d):
            m = _circular(m, arm, n)
        elif isinstance(m, nn.MaxPool2d):
            n //= 2
        layers.append(m)
    return nn.Sequential(*layers)


def _square_conv(arm, c, n):
    """A circular 'same' 3x3 convolution ``c -> c`` for ``arm`` (on ``n x n`` maps)."""
    if arm == "cayley":
        return register_cayley(CircularConv2d(c, c, 3), n)
    conv = nn.Conv2d(c, c, 3, padding=1, padding_mode="circular")
    if arm == "qr":
        parametrize.register_parametrization(conv, "weight", OrthogonalFilters("qr"))
    elif arm == "bcop":
        register_bcop(conv)
    return conv


def _check_study(arm, image_size):
    """Argument checks of :func:`orthogonal_cnn`."""
    if arm not in CNN_ARMS:
        raise ValueError(f"arm must be one of {CNN_ARMS}, got {arm!r}")
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4, got {image_size}")


def orthogonal_cnn(
    arm="none", width=16, image_size=32, num_classes=10, in_channels=3, bn_momentum=0.1
):
    """The accuracy study's network: a circular 3x3 stem ``in_channels -> width``
    (unconstrained in every arm), BN, ReLU, max-pool 2; then two circular 3x3
    convolutions ``width -> width``, each with BN and ReLU (max-pool 2 after the
    first); global average pooling; a dense layer. ``arm`` constrains the two square
    layers: "none" (plain), "qr" (orthonormal flattened filters, Eq. 11 at one
    position), "cayley" or "bcop" (exactly orthogonal operators with orthonormal rows,
    Eq. 11 for all units, so Theorem 4 applies). Maps 32 -> 16 -> 8 pixels."""
    _check_study(arm, image_size)
    c, n = width, image_size // 2

    def bn():
        return nn.BatchNorm2d(c, momentum=bn_momentum)

    return nn.Sequential(
        nn.Conv2d(in_channels, c, 3, padding=1, padding_mode="circular"),
        bn(), nn.ReLU(), nn.MaxPool2d(2),
        _square_conv(arm, c, n), bn(), nn.ReLU(), nn.MaxPool2d(2),
        _square_conv(arm, c, n // 2), bn(), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes),
    )  # fmt: skip


def square_layers(model, image_size=32):
    """The ``width -> width`` layers of :func:`orthogonal_cnn`: a list of ``(index,
    conv, bn, n)``, ``model[index]`` being the convolution, ``bn`` its batch norm and
    ``n`` its input size."""
    out, n = [], image_size
    for i, m in enumerate(model):
        if isinstance(m, nn.MaxPool2d):
            n //= 2
        elif isinstance(m, nn.Conv2d) and m.in_channels == m.out_channels:
            out.append((i, m, model[i + 1], n))
    return out


def row_coherence(conv, n):
    """Mutual coherence (Eq. 11 as a number) of all ``c_out * n * n`` rows of the
    circular convolution ``conv`` on ``n x n`` inputs, from the layer's own forward
    pass: the rows at position 0 are read by autograd, and applying the layer (without
    bias) to them gives their inner products with every row, since the rows at other
    positions are circular shifts. Zero iff the rows are mutually orthogonal. Row
    scalings (a batch norm after the layer) leave it unchanged."""
    c_in, c_out = conv.in_channels, conv.out_channels
    p = next(conv.parameters())
    x = torch.zeros(1, c_in, n, n, dtype=p.dtype, requires_grad=True)
    y = conv(x)
    rows = torch.stack(
        [
            torch.autograd.grad(y[0, o, 0, 0], x, retain_graph=True)[0][0]
            for o in range(c_out)
        ]
    )
    with torch.no_grad():
        G = conv(rows) - (0 if conv.bias is None else conv.bias[:, None, None])
    norms = G[torch.arange(c_out), torch.arange(c_out), 0, 0].sqrt()
    cos = (G / (norms[:, None, None, None] * norms[None, :, None, None])).abs()
    cos[torch.arange(c_out), torch.arange(c_out), 0, 0] = 0
    return cos.max().item()


def unit_maso(conv, bn, n, units):
    """MASO parameters ``A`` (K, 2, D), ``B`` (K, 2) of the ReLU units ``units`` (a
    list of ``(channel, i, j)``) of the layer ``ReLU(bn(conv(z)))`` on inputs ``z`` of
    ``c_in x n x n`` (``bn`` in eval mode: affine): slope = the unit's row of the
    layer's matrix (by autograd), offset = its output at ``z = 0``; the second region
    (ReLU off) has slope and offset 0 (Theorem 1)."""
    if bn.training:
        raise ValueError("bn must be in eval mode (an affine map)")
    p = next(conv.parameters())
    x = torch.zeros(1, conv.in_channels, n, n, dtype=p.dtype, requires_grad=True)
    y = bn(conv(x))[0]
    rows = torch.stack(
        [torch.autograd.grad(y[u], x, retain_graph=True)[0].flatten() for u in units]
    )
    bias = torch.stack([y[u] for u in units]).detach()
    A = torch.stack([rows, torch.zeros_like(rows)], dim=1)
    B = torch.stack([bias, torch.zeros_like(bias)], dim=1)
    return A, B


def restrict_to_span(A, z):
    """``(A Q, z Q)`` for ``Q`` an orthonormal basis of the span of the slopes
    ``A[k, r]``: the factorial model's joint posterior (Eq. 10) depends on ``z`` only
    through its projection on that span (``||z - mu_t||^2 = ||P z - mu_t||^2 + ||(I -
    P) z||^2``, the last term the same for every configuration), and so does each unit's
    posterior (Eq. 3). Exact, and it makes brute-force inference cheap for inputs of
    thousands of dimensions."""
    U, sv, _ = torch.linalg.svd(A.reshape(-1, A.shape[-1]).T, full_matrices=False)
    Q = U[:, sv > sv.max() * A.shape[-1] * torch.finfo(A.dtype).eps]
    return A @ Q, z @ Q


def operator_error(conv, n):
    """Largest deviation from orthonormal rows (``c_out <= c_in``) or columns of the
    circular convolution ``conv`` on ``n x n`` inputs, from its per-frequency
    matrices (:func:`smaso.orthoconv.frequency_operator`)."""
    w = conv.weight.detach().double()
    return semi_unitary_error(frequency_operator(offset_kernel(w, n)))


def _study_model(config: CnnRun):
    return orthogonal_cnn(config.arm, config.width, bn_momentum=config.bn_momentum)


def load_cnn(config: CnnRun, out_dir=None):
    """The trained network of the run ``config`` (:func:`run_cnn`), in eval mode, from
    its stored weights ``cnn-ARM-seedSEED.pt``."""
    model = _study_model(config)
    path = CNN.path(config, out_dir).with_suffix(".pt")
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _operator_errors(model, n=32):
    """:func:`operator_error` of every convolution of ``model`` on ``n x n`` inputs."""
    errors = []
    for m in model:
        if isinstance(m, nn.Conv2d):
            errors.append(operator_error(m, n))
        elif isinstance(m, nn.MaxPool2d):
            n //= 2
    return errors


def run_cnn(config: CnnRun, out_dir=None, force=False, progress=False) -> dict:
    """Train :func:`orthogonal_cnn` as ``config`` says on the CIFAR-10 subset with
    :func:`smaso.train.fit` and write ``cnn-ARM-seedSEED.json`` (the history, final
    test accuracy, the orthogonality error of each convolution operator after
    training, and the wall time) and the trained weights ``cnn-ARM-seedSEED.pt``.

    A stored run of ``config`` is returned as it is unless ``force``; a stored file of
    another run is an error (:meth:`~smaso.experiment.frame.Study.finished`) unless
    ``force``, which replaces it."""
    if not force and (stored := CNN.finished(config, out_dir)) is not None:
        return stored
    data = cifar10_subset()
    torch.manual_seed(config.seed)
    model = _study_model(config)
    t0 = time.perf_counter()
    history = fit(
        model,
        data,
        config.epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        seed=config.seed,
        progress=progress,
    )
    wall = time.perf_counter() - t0
    path = CNN.path(config, out_dir)
    save_torch_atomic(model.state_dict(), path.with_suffix(".pt"))
    result = {
        "config": config_to_dict(config),
        "history": history,
        "test_acc": history[-1]["test_acc"],
        "operator_errors": _operator_errors(model),
        "wall_s": wall,
        **provenance(),
    }
    CNN.save(config, result, out_dir, force=force)
    return result


def grayscale_subset():
    """The CIFAR-10 subset's training and test images as luma ``0.299 R + 0.587 G +
    0.114 B`` in [0, 1], (N, 1, 32, 32) each."""
    d = cifar10_subset(standardize=False)
    w = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    return (d.x_train * w).sum(1, keepdim=True), (d.x_test * w).sum(1, keepdim=True)


def denoiser(arm, shrink="soft", factor=4, kernel_size=3):
    """A :class:`smaso.denoise.TransformDenoiser` on ``factor``-unshuffled grayscale
    images whose transform starts as the block DCT (:func:`smaso.denoise.block_dct`,
    at the centre tap): "dct" keeps it fixed; "cayley" (exactly orthogonal, set through
    the parametrization's right inverse), "qr" (orthonormal filters) and "free" (no
    constraint) train it; "bcop" (exactly orthogonal) starts from ``H0 = DCT``
    with random projectors."""
    if arm not in DENOISE_ARMS:
        raise ValueError(f"arm must be one of {DENOISE_ARMS}, got {arm!r}")
    c, k = factor**2, kernel_size
    D = block_dct(factor)
    if arm == "cayley":
        conv = CircularConv2d(c, c, k, bias=False)
        register_cayley(conv, 32 // factor)
        K = conv.weight.shape[-1]
        Wd = torch.zeros(c, c, K, K)
        Wd[:, :, (K - 1) // 2, (K - 1) // 2] = D
        conv.weight = Wd  # right inverse: the DCT's Cayley generator
    else:
        kk = 1 if arm == "dct" else k
        conv = nn.Conv2d(
            c, c, kk, padding=(kk - 1) // 2, padding_mode="circular", bias=False
        )
        with torch.no_grad():
            if arm == "bcop":
                conv.weight[:, :, 0, 0] = D
            else:
                conv.weight.zero_()
                conv.weight[:, :, (kk - 1) // 2, (kk - 1) // 2] = D
        if arm == "dct":
            conv.weight.requires_grad_(False)
        elif arm == "qr":
            parametrize.register_parametrization(conv, "weight", OrthogonalFilters())
        elif arm == "bcop":
            register_bcop(conv)
    return TransformDenoiser(conv, factor, shrink)


def _evaluate(model, x, sigma, seed=123):
    """Mean test PSNR of the denoised and of the noisy images (noise seeded by
    ``seed``), and of ``W^T W x`` against the clean ``x``."""
    g = torch.Generator().manual_seed(seed)
    y = x + sigma * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return (
            psnr(model(y, sigma), x).mean().item(),
            psnr(y, x).mean().item(),
            psnr(model.reconstruct(x), x).mean().item(),
        )


def _train_denoiser(config: DenoiseRun, sigma, x_train):
    """:func:`denoiser` of ``config`` trained at noise level ``sigma``."""
    c = config
    torch.manual_seed(c.seed)
    model = denoiser(c.arm, c.shrink, c.factor, c.kernel_size)
    transform = [p for p in model.conv.parameters() if p.requires_grad]
    shrinkage = [model.tau_raw, model.eta_raw]
    opt = torch.optim.Adam(
        [{"params": transform}, {"params": shrinkage, "lr": c.lr_shrink}], lr=c.lr
    )
    g = torch.Generator().manual_seed(c.seed)
    for _ in range(c.steps):
        idx = torch.randint(0, len(x_train), (c.batch_size,), generator=g)
        x = x_train[idx]
        y = x + sigma * torch.randn(x.shape, generator=g)
        loss = ((model(y, sigma) - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def run_denoise(config: DenoiseRun, out_dir=None, force=False) -> dict:
    """Train :func:`denoiser` as ``config`` says at each of its noise levels on the
    grayscale training subset and write ``denoise-ARM-SHRINK.json``: test PSNR (1000
    images, fixed noise) before and after, the PSNR of ``W^T W x`` (clean images), the
    learned thresholds, and the trained operator's orthogonality error. A stored run
    of ``config`` is returned unless ``force`` (as :func:`run_cnn`)."""
    if not force and (stored := DENOISE.finished(config, out_dir)) is not None:
        return stored
    x_train, x_test = grayscale_subset()
    rows = []
    for sigma in config.sigmas:
        t0 = time.perf_counter()
        model = _train_denoiser(config, sigma, x_train)
        train_s = time.perf_counter() - t0
        p, p_noisy, p_recon = _evaluate(model, x_test, sigma)
        tau, eta = model.thresholds()
        rows.append(
            {
                "sigma": sigma,
                "psnr": p,
                "psnr_noisy": p_noisy,
                "psnr_reconstruction": p_recon,
                "tau": tau.tolist(),
                "eta": eta.tolist(),
                "operator_error": operator_error(model.conv, 32 // config.factor),
                "train_s": train_s,
            }
        )
    result = {"config": config_to_dict(config), "runs": rows, **provenance()}
    DENOISE.save(config, result, out_dir, force=force)
    return result


def load_results(out_dir=None) -> dict:
    """All stored results: ``{"cnn": {(arm, seed): result}, "denoise": {(arm,
    shrink): result}}`` (missing runs are absent)."""
    cnn, den = CNN.load(out_dir), DENOISE.load(out_dir)
    return {
        "cnn": {(r["config"]["arm"], r["config"]["seed"]): r for r in cnn},
        "denoise": {(r["config"]["arm"], r["config"]["shrink"]): r for r in den},
    }


def parser() -> argparse.ArgumentParser:
    """The studies' command line, derived from :class:`CnnRun` and
    :class:`DenoiseRun`."""
    p = argparse.ArgumentParser(
        prog="python -m smaso.experiment.convstudy",
        description=__doc__.split("\n\n")[0],
    )
    sub = p.add_subparsers(dest="what", required=True)
    for name, kind in (("cnn", CnnRun), ("denoise", DenoiseRun)):
        s = sub.add_parser(name, help=kind.__doc__.split("\n")[0])
        add_options(s, dataclasses.fields(kind), rows=True)
        s.add_argument("--force", action="store_true", help="replace stored results")
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "cnn":
        for config in grid(CnnRun, args, dict(seed=(0, 1, 2))):
            r = run_cnn(config, args.out, args.force, progress=True)
            print(f"{config.run_id()}: test acc {r['test_acc']:.3f}", flush=True)
        return 0
    for config in grid(DenoiseRun, args):  # every arm and shrinkage
        r = run_denoise(config, args.out, args.force)
        dbs = ", ".join(f"{x['sigma']}: {x['psnr']:.2f} dB" for x in r["runs"])
        print(f"{config.run_id()}: {dbs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
