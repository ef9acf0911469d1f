"""A plain, seeded training loop over tensors (Adam, cross-entropy, optional extra loss term).

Batches are drawn from tensors already on the device (no per-sample Python loader). Used by the
chapters' small training demos; the full experiment pipeline builds on the same pieces.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .data import TensorData

__all__ = ["accuracy", "fit"]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (evaluation mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / len(x)


def fit(
    model: nn.Module,
    data: TensorData,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_epoch: Callable[[int, nn.Module], dict] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` with Adam on cross-entropy (+ ``extra_loss(model, x, y)``); one dict per epoch.

    Each epoch shuffles the training set with a generator seeded by ``seed`` and the epoch index, so
    a run is reproducible. The returned history holds ``epoch``, ``loss`` (mean training loss),
    ``train_acc``, ``test_acc``, and whatever ``on_epoch(epoch, model)`` returns.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.x_train)
    history = []
    for epoch in tqdm(range(epochs), desc="epochs", disable=not progress):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).to(data.x_train.device)
        model.train()
        total = 0.0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
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
