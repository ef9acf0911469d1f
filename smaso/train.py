"""One seeded training loop over tensors (cross-entropy, optional extra loss term), for
the chapters and the experiments alike.

Batches are drawn from tensors already on the device (no per-sample Python loader).
:func:`train_epoch` runs one epoch of optimiser steps and :func:`evaluate` measures a
model; the experiment pipeline (:mod:`smaso.experiment`) calls them one epoch at a time,
with optional mixed precision, and :func:`fit`, the chapters' small loop, is the same
two calls around Adam with shuffled batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from tqdm import tqdm

from .data import TensorData, epoch_batches

__all__ = [
    "AdamWithoutBiasCorrection",
    "accuracy",
    "evaluate",
    "fit",
    "no_bias_correction_factor",
    "train_epoch",
]


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (evaluation mode, restored
    afterwards)."""
    return evaluate(model, x, y, batch_size=batch_size)["acc"]


def fit(
    model: nn.Module,
    data: TensorData,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    | None = None,
    on_epoch: Callable[[int, nn.Module], dict] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` with Adam on cross-entropy (+ ``extra_loss(model, x, y)``); one
    dict per epoch.

    Each epoch shuffles the training set with a generator seeded by ``seed`` and the
    epoch index (:func:`smaso.data.epoch_batches`), so a run is reproducible. The
    returned history holds ``epoch``, ``loss`` (mean training objective, the extra loss
    included), ``train_acc``, ``test_acc``, and whatever ``on_epoch(epoch, model)``
    returns.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(
            f"epochs and batch_size must be positive, got {epochs} and {batch_size}"
        )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for epoch in tqdm(range(epochs), desc="epochs", disable=not progress):
        batches = epoch_batches(data.y_train, batch_size, seed, epoch)
        tr = train_epoch(model, opt, data.x_train, data.y_train, batches, extra_loss)
        record = {
            "epoch": epoch + 1,
            "loss": tr["objective"],
            "train_acc": accuracy(model, data.x_train, data.y_train),
            "test_acc": accuracy(model, data.x_test, data.y_test),
        }
        if on_epoch is not None:
            record.update(on_epoch(epoch + 1, model))
        history.append(record)
    return history


def _autocast(device_type, dtype):
    return torch.autocast(
        device_type=device_type, dtype=dtype, enabled=dtype is not None
    )


def _logits_for_loss(out: torch.Tensor, autocast_dtype) -> torch.Tensor:
    """Logits in float32 for the loss under autocast (bf16 logits would round the
    loss); otherwise as they are, so a float64 model keeps a float64 loss."""
    return out.float() if autocast_dtype is not None else out


def _cross_entropy(logits, y, reduction="mean"):
    """Cross-entropy of a batch, or of packed runs' batches (``y`` (k, N), logits (k, N,
    C)): one mean (or sum) per run."""
    if y.ndim == 1:
        return nn.functional.cross_entropy(logits, y, reduction=reduction)
    per = nn.functional.cross_entropy(
        logits.flatten(0, 1), y.flatten(), reduction="none"
    )
    per = per.view(y.shape)
    return per.mean(-1) if reduction == "mean" else per.sum(-1)


def _per(t: torch.Tensor, n: int):
    """A device accumulator divided by ``n`` on the host: a float, or one per packed
    run."""
    v = t.tolist()
    return [a / n for a in v] if isinstance(v, list) else v / n


def _accumulator(model, dtype, device):
    runs = getattr(model, "runs", None)  # packed runs (smaso.pack): one value each
    return torch.zeros((runs,) if runs else (), dtype=dtype, device=device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1000,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in evaluation mode
    (restored after).

    The test metric of Table 2 (Section 5). One host synchronisation at the end, not per
    batch. Packed runs (:mod:`smaso.pack`) are all measured on ``(x, y)``; one value
    per run.
    """
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}"
        )
    was_training = model.training
    model.eval()
    runs = getattr(model, "runs", None)
    loss = _accumulator(model, torch.float64, x.device)
    correct = _accumulator(model, torch.long, x.device)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        if runs:
            xb, yb = xb.expand(runs, *xb.shape), yb.expand(runs, *yb.shape)
        with _autocast(x.device.type, autocast_dtype):
            out = model(xb)
        logits = _logits_for_loss(out, autocast_dtype)
        loss += _cross_entropy(logits, yb, reduction="sum").double()
        correct += (out.argmax(-1) == yb).sum(-1)
    model.train(was_training)
    return {"loss": _per(loss, len(x)), "acc": _per(correct, len(x))}


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batches,
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
    scheduler=None,
) -> dict:
    """One epoch of optimiser steps on cross-entropy (+ ``extra_loss``, e.g. the
    orthogonality penalty of Section 5) over ``batches`` (index tensors on ``x``'s
    device); returns running means.

    ``loss`` and ``acc`` are averaged over the training images seen (in training mode,
    as the batches went by), ``penalty`` is the mean extra loss per batch (0 without
    one), ``objective`` the mean of cross-entropy plus extra loss per image. Under
    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on CUDA) the forward pass runs in mixed
    precision and the loss is computed from float32 logits; the extra loss is computed
    outside autocast, in the parameters' precision. ``scheduler.step()`` (if given)
    follows every optimiser step. ``on_batch(i)`` is called after step ``i``. The step
    reads nothing back from the device: host synchronisation happens once, at the end.

    Packed runs (:class:`smaso.pack.PackedRuns`): each batch is (k, N) indices, run
    ``r``'s in row ``r``; the loss is the sum of the runs' losses (each run's gradient
    its own) and every returned value a list, one per run.
    """
    model.train()
    dev = x.device
    total = _accumulator(model, torch.float64, dev)
    objective = _accumulator(model, torch.float64, dev)
    correct = _accumulator(model, torch.long, dev)
    pen = _accumulator(model, torch.float64, dev)
    seen = n_batches = 0
    for i, idx in enumerate(batches):
        xb, yb = x[idx], y[idx]
        n = idx.shape[-1]
        with _autocast(dev.type, autocast_dtype):
            out = model(xb)
        loss = _cross_entropy(_logits_for_loss(out, autocast_dtype), yb)
        total += loss.detach().double() * n
        correct += (out.detach().argmax(-1) == yb).sum(-1)
        if extra_loss is not None:
            e = extra_loss(model, xb, yb)
            pen += e.detach().double()
            loss = loss + e
        objective += loss.detach().double() * n
        opt.zero_grad(set_to_none=True)
        (loss.sum() if loss.ndim else loss).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        seen += n
        n_batches += 1
        if on_batch is not None:
            on_batch(i)
    if seen == 0:
        raise ValueError("no batches to train on")
    return {
        "loss": _per(total, seen),
        "acc": _per(correct, seen),
        "penalty": _per(pen, n_batches),
        "objective": _per(objective, seen),
    }


# --------------------------------------------------------------------------------------
# The authors' Adam: no bias correction, as a learning-rate factor on PyTorch's Adam


def no_bias_correction_factor(k: int, betas=(0.9, 0.999)) -> float:
    """The factor by which Adam without bias correction steps further than Adam, at its
    step ``t = k + 1`` (``k`` steps taken): ``(1 - beta1^t) / sqrt(1 - beta2^t)``.

    Adam (Kingma & Ba) divides its moment estimates by ``1 - beta^t``; the authors'
    hand-written Adam for Section 5 does not, i.e. it steps ``lr m / (sqrt(v) + eps)``.
    With the default betas the factor is 0.1 / sqrt(0.001) = 3.16 at step 1, peaks at
    6.6 at step 12, and is 3.2 at step 100 and 1.26 at step 1000.
    """
    b1, b2 = betas
    t = k + 1
    return (1 - b1**t) / math.sqrt(1 - b2**t)


class AdamWithoutBiasCorrection(torch.optim.lr_scheduler.LambdaLR):
    """Make ``torch.optim.Adam`` step exactly as Adam without bias correction (the
    authors' optimiser for Section 5): a ``LambdaLR`` whose factor is
    :func:`no_bias_correction_factor`, and which also rescales ``eps``.

    PyTorch's Adam steps ``lr/c1 m / (sqrt(v)/sqrt(c2) + eps)`` at step t, with ``c =
    1 - beta^t``. With ``lr_t = lr c1 / sqrt(c2)`` and ``eps_t = eps / sqrt(c2)`` that
    is ``lr m / (sqrt(v) + eps)``. Call :meth:`step` after every optimiser step (as
    :func:`train_epoch` does); its state (in a checkpoint) restores both factors.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1):
        groups = optimizer.param_groups
        self.base_eps = [g.get("initial_eps", g["eps"]) for g in groups]
        for g, eps in zip(groups, self.base_eps, strict=True):
            g.setdefault("initial_eps", eps)
        lambdas = [
            partial(no_bias_correction_factor, betas=tuple(g["betas"])) for g in groups
        ]
        super().__init__(optimizer, lambdas, last_epoch)

    def _set_eps(self):
        for g, eps in zip(self.optimizer.param_groups, self.base_eps, strict=True):
            _, b2 = g["betas"]
            g["eps"] = eps / math.sqrt(1 - b2 ** (self.last_epoch + 1))

    def step(self, epoch=None):
        super().step(epoch)
        self._set_eps()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        groups = self.optimizer.param_groups
        for g, lam, lr in zip(groups, self.lr_lambdas, self.base_lrs, strict=True):
            g["lr"] = lr * lam(self.last_epoch)
        self._set_eps()
