"""A plain, seeded training loop over tensors (Adam, cross-entropy, optional extra loss
term).

Batches are drawn from tensors already on the device (no per-sample Python loader).
:func:`fit` is the chapters' small training loop; :func:`train_epoch` and
:func:`evaluate` are the pieces the experiment pipeline (:mod:`smaso.experiment`) runs,
one epoch at a time, with optional mixed precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from .data import TensorData

__all__ = ["accuracy", "evaluate", "fit", "train_epoch"]


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (evaluation mode, restored afterwards)."""
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
    epoch index, so a run is reproducible. The returned history holds ``epoch``,
    ``loss`` (mean training loss), ``train_acc``, ``test_acc``, and whatever
    ``on_epoch(epoch, model)`` returns.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(
            f"epochs and batch_size must be positive, got {epochs} and {batch_size}"
        )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.x_train)
    history = []
    for epoch in tqdm(range(epochs), desc="epochs", disable=not progress):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).to(data.x_train.device)
        model.train()
        total = 0.0
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            loss = nn.functional.cross_entropy(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        record = {
            "epoch": epoch + 1,
            "loss": total / n,
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
    batch.
    """
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}"
        )
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with _autocast(x.device.type, autocast_dtype):
            out = model(xb)
        loss += nn.functional.cross_entropy(out.float(), yb, reduction="sum").double()
        correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    return {"loss": loss.item() / len(x), "acc": correct.item() / len(x)}


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
) -> dict:
    """One epoch of Adam steps on cross-entropy (+ ``extra_loss``, e.g. the
    orthogonality penalty of Section 5) over ``batches`` (index tensors on ``x``'s
    device); returns running means.

    ``loss`` and ``acc`` are averaged over the training images seen (in training mode,
    as the batches went by), ``penalty`` is the mean extra loss per batch (0 without
    one). Under ``autocast_dtype`` (e.g. ``torch.bfloat16`` on CUDA) the forward pass
    runs in mixed precision; the extra loss is computed outside autocast, in the
    parameters' precision. Host synchronisation happens once, at the end.
    ``on_batch(i)`` is called after step ``i``.
    """
    model.train()
    dev = x.device
    total = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    pen = torch.zeros((), dtype=torch.float64, device=dev)
    seen = 0
    for i, idx in enumerate(batches):
        xb, yb = x[idx], y[idx]
        with _autocast(dev.type, autocast_dtype):
            out = model(xb)
        loss = nn.functional.cross_entropy(out.float(), yb)
        total += loss.detach().double() * len(idx)
        correct += (out.detach().argmax(1) == yb).sum()
        if extra_loss is not None:
            e = extra_loss(model, xb, yb)
            pen += e.detach().double()
            loss = loss + e
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(idx)
        if on_batch is not None:
            on_batch(i)
    if seen == 0:
        raise ValueError("no batches to train on")
    n_batches = i + 1
    return {
        "loss": total.item() / seen,
        "acc": correct.item() / seen,
        "penalty": pen.item() / n_batches,
    }
