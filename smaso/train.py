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

from .checks import choice
from .data import TensorData, epoch_batches

__all__ = [
    "CUDA_GRAPH",
    "GRAPH_WARMUP",
    "AdamWithoutBiasCorrection",
    "TrainStep",
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

    Args:
        model: the network, ``data``'s images ``(N, C, H, W)`` to logits
            ``(N, num_classes)``.
        data: the train/test split (:class:`smaso.data.TensorData`).
        epochs: the number of epochs (≥ 1).
        lr: Adam's learning rate (default ``1e-3``).
        batch_size: the batch size (default 64).
        seed: the seed of the epochs' shuffles (default 0).
        extra_loss: ``extra_loss(model, x, y)``, a scalar added to each batch's
            cross-entropy (e.g. an orthogonality penalty; default None: none).
        on_epoch: ``on_epoch(epoch, model)``, a dict merged into the epoch's record
            (default None).
        progress: show a tqdm progress bar (default True).

    Returns:
        the history, a list of ``epochs`` dicts, one per epoch.

    Example::

        >>> import torch
        >>> from smaso.data import TensorData
        >>> from smaso.train import fit
        >>> x = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
        >>> data = TensorData(x, torch.arange(16) % 2, x, torch.arange(16) % 2, 2)
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> history = fit(net, data, epochs=2, batch_size=8, progress=False)
        >>> len(history), sorted(history[-1])
        (2, ['epoch', 'loss', 'test_acc', 'train_acc'])
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


def _autocast(device_type, dtype, cache_enabled=None):
    return torch.autocast(
        device_type=device_type,
        dtype=dtype,
        enabled=dtype is not None,
        cache_enabled=cache_enabled,
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


#: Eager steps a :class:`TrainStep` takes before it captures a CUDA graph: cuDNN's
#: autotuning and the optimiser's state happen outside the graph.
GRAPH_WARMUP = 3
CUDA_GRAPH = ("auto", "on", "off")


class TrainStep:
    """One optimiser step on cross-entropy (+ ``extra_loss``), as :func:`train_epoch`
    takes it, on fixed tensors reused step after step and epoch after epoch; on CUDA
    captured whole in one CUDA graph (Section 5's training, without launch overhead).

    The step reads the batch from the dataset already on the device through an index
    tensor, accumulates the epoch's metrics in place in device tensors (:meth:`reset`
    zeroes them, :meth:`read` reads them back: the one host synchronisation), and
    creates no tensor and moves nothing to the device (the backward pass is seeded
    with a tensor made once), so that its replay in a graph is the step itself.

    ``cuda_graph``: ``"auto"`` (a graph on CUDA, eager elsewhere), ``"on"`` (CUDA
    only) or ``"off"``. With a graph, the first :data:`GRAPH_WARMUP` steps run eagerly
    on a side stream, then the step is captured: forward, loss with its penalty,
    backward and, when the optimiser keeps its state on the device
    (``torch.optim.Adam(capturable=True)``) and no ``scheduler`` changes its
    hyperparameters on the host, the optimiser step; otherwise the optimiser (one
    fused kernel) and the scheduler run after each replay. A batch of another shape
    than the captured one (the last, smaller batch of an epoch of shuffled batches,
    :func:`smaso.data.shuffled_batches`; the authors' class-balanced batches are all
    full) runs eagerly: the same numbers. If capture fails, ``log`` gets a one-line
    reason and every step runs eagerly.
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        extra_loss: Callable | None = None,
        autocast_dtype: torch.dtype | None = None,
        scheduler=None,
        cuda_graph: str = "off",
        log: Callable[[str], None] | None = None,
    ):
        choice("cuda_graph", cuda_graph, CUDA_GRAPH)
        self.dev = x.device
        if cuda_graph == "on" and self.dev.type != "cuda":
            raise ValueError(
                f"cuda_graph='on' needs data on a CUDA device, not {self.dev}"
            )
        self.model, self.opt, self.scheduler = model, opt, scheduler
        self.x, self.y = x, y
        self.extra_loss, self.autocast_dtype = extra_loss, autocast_dtype
        self.log = log
        self.use_graph = cuda_graph == "on" or (
            cuda_graph == "auto" and self.dev.type == "cuda"
        )
        self.total = _accumulator(model, torch.float64, self.dev)
        self.objective = _accumulator(model, torch.float64, self.dev)
        self.correct = _accumulator(model, torch.long, self.dev)
        self.pen = _accumulator(model, torch.float64, self.dev)
        self.seen = self.batches = 0
        param = next(model.parameters())
        loss_dtype = torch.float32 if autocast_dtype is not None else param.dtype
        if extra_loss is not None:  # computed in the parameters' precision
            loss_dtype = torch.promote_types(loss_dtype, param.dtype)
        self.seed = torch.ones((), dtype=loss_dtype, device=self.dev)
        self.optimizer_in_graph = scheduler is None and all(
            g.get("capturable", False) for g in opt.param_groups
        )
        self.graph = self.static_idx = self.static_grads = None
        self.graph_error: str | None = None
        self.eager_steps = 0
        self.side = torch.cuda.Stream(self.dev) if self.use_graph else None

    def reset(self) -> None:
        """Zero the epoch's accumulators (in place: a captured graph keeps them)."""
        for t in (self.total, self.objective, self.correct, self.pen):
            t.zero_()
        self.seen = self.batches = 0

    def _forward_backward(self, idx: torch.Tensor) -> None:
        """The step up to the gradients: the part of the step a graph always holds."""
        xb, yb = self.x[idx], self.y[idx]
        n = idx.shape[-1]
        # a CUDA graph needs autocast with its cast cache off (PyTorch: CUDA Graphs)
        with _autocast(self.dev.type, self.autocast_dtype, not self.use_graph):
            out = self.model(xb)
        loss = _cross_entropy(_logits_for_loss(out, self.autocast_dtype), yb)
        self.total += loss.detach().double() * n
        self.correct += (out.detach().argmax(-1) == yb).sum(-1)
        if self.extra_loss is not None:
            e = self.extra_loss(self.model, xb, yb)
            self.pen += e.detach().double()
            loss = loss + e
        self.objective += loss.detach().double() * n
        (loss.sum() if loss.ndim else loss).backward(self.seed)

    def _update(self) -> None:
        self.opt.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def _eager(self, idx: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._forward_backward(idx)
        self._update()
        if self.static_grads is not None:  # the graph's gradients stay the .grad
            for p, g in self.static_grads:
                p.grad = g

    def _capture(self, idx: torch.Tensor) -> None:
        """Capture the step into a CUDA graph, then replay it for ``idx``."""
        self.static_idx = idx.clone()
        torch.cuda.current_stream(self.dev).wait_stream(self.side)
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward_backward(self.static_idx)
            if self.optimizer_in_graph:
                self._update()
        self.graph = graph
        self.static_grads = [
            (p, p.grad) for p in self.model.parameters() if p.grad is not None
        ]
        self._replay(idx)

    def _replay(self, idx: torch.Tensor) -> None:
        self.static_idx.copy_(idx)
        self.graph.replay()
        if not self.optimizer_in_graph:
            self._update()

    def __call__(self, idx: torch.Tensor) -> None:
        """One step on the batch ``x[idx]`` (packed runs: ``idx`` (k, N))."""
        if self.graph is not None and idx.shape == self.static_idx.shape:
            self._replay(idx)
        elif (
            self.use_graph
            and self.graph is None
            and self.graph_error is None
            and self.eager_steps >= GRAPH_WARMUP
        ):
            try:
                self._capture(idx)
            except Exception as e:  # an op that cannot be captured: run eagerly
                self.graph, self.static_grads = None, None
                self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                if self.log is not None:
                    self.log(f"CUDA graph not used ({self.graph_error[:200]}); eager")
                torch.cuda.synchronize(self.dev)
                self._eager(idx)
        elif self.use_graph and self.graph is None and self.graph_error is None:
            self.side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(self.side):
                self._eager(idx)
            torch.cuda.current_stream(self.dev).wait_stream(self.side)
            self.eager_steps += 1
        else:
            self._eager(idx)
        self.seen += idx.shape[-1]
        self.batches += 1

    def epoch(self, batches, on_batch: Callable[[int], None] | None = None) -> dict:
        """Steps over ``batches``; the epoch's running means (:func:`train_epoch`)."""
        self.model.train()
        self.reset()
        for i, idx in enumerate(batches):
            self(idx)
            if on_batch is not None:
                on_batch(i)
        return self.read()

    def read(self) -> dict:
        if self.seen == 0:
            raise ValueError("no batches to train on")
        if self.use_graph:
            torch.cuda.current_stream(self.dev).wait_stream(self.side)
        return {
            "loss": _per(self.total, self.seen),
            "acc": _per(self.correct, self.seen),
            "penalty": _per(self.pen, self.batches),
            "objective": _per(self.objective, self.seen),
        }


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
    Each step is a :class:`TrainStep` (eager here; the experiment pipeline keeps one
    across epochs, captured in a CUDA graph on CUDA).

    Packed runs (:class:`smaso.pack.PackedRuns`): each batch is (k, N) indices, run
    ``r``'s in row ``r``; the loss is the sum of the runs' losses (each run's gradient
    its own) and every returned value a list, one per run.
    """
    step = TrainStep(model, opt, x, y, extra_loss, autocast_dtype, scheduler)
    return step.epoch(batches, on_batch)


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
