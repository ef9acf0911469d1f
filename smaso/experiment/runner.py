"""One run of the Section 5 experiment, resumable: :func:`run` and the pieces it is made
of (the network, the loss, the optimiser of a :class:`~smaso.experiment.RunConfig`).

:func:`run` trains one configuration with the loop of :mod:`smaso.train`, writes a
checkpoint after every epoch (model, optimiser, history; atomically) and resumes from it
after a kill, losing at most the epoch in progress. At the end it writes one results
JSON (config, seed, metrics per epoch, wall time, device, effective precision, torch
version, git commit) atomically, and never overwrites an existing one: a finished run is
skipped, a clash is an error. A claim file keeps a second process off the run while it
trains.

Numbers reported per run (as the authors' plots): the test accuracy averaged over the
last three epochs (``final_test_acc``) and the best epoch's (``best_test_acc``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..checks import choice, positive_int
from ..data import DATASETS, TensorData, epoch_batches, load
from ..filters import EXACT, register_filters
from ..models import build, num_parameters
from ..orthogonal import (
    PENALTIES,
    check_orthogonalizable,
    filter_matrix,
    orthogonal_layers,
    penalty_loss,
    reanchor_,
)
from ..pack import LiveBytes, PackedRuns, pack_state, scale_steps, unpack_state
from ..records import cpu_name, now, provenance, save_torch_atomic, write_json_atomic
from ..train import CUDA_GRAPH, AdamWithoutBiasCorrection, TrainStep, evaluate
from .config import DTYPES, RunConfig
from .frame import option
from .store import (
    CHECKPOINT_FORMAT,
    RESULT_FORMAT,
    TABLE2,
    CheckpointError,
    ResultsError,
    checkpoint_path,
    claim,
    failed_path,
    load_checkpoint,
    model_path,
    pack_checkpoint_path,
    result_path,
)

__all__ = [
    "PACK_AXES",
    "RunClaimedError",
    "Runtime",
    "build_loss",
    "build_model",
    "build_optimizer",
    "build_packed",
    "build_training_model",
    "data_key",
    "effective_precision",
    "filters_cos2",
    "load_data",
    "load_trained_model",
    "orthogonality_error",
    "pack_key",
    "packable",
    "resolve_device",
    "run",
    "run_memory",
    "run_packed",
]


class RunClaimedError(RuntimeError):
    """Another process is training this run now (its claim file is fresh)."""


@dataclass(frozen=True)
class Runtime:
    """Where and how a run executes, and who follows it; none of it changes the run's
    numbers (the precision it resolves to is recorded with the results). The CLI's
    runtime options are these fields, but the three hooks at the end: ``log`` receives
    one line per epoch (None: silent), ``on_epoch(epoch, model, record)`` is called
    after each epoch (and its checkpoint, when one is due), ``on_batch(i)`` after each
    step."""

    data_root: str | None = option(
        None, "folder holding the torchvision datasets (default: $SMASO_DATA, ./data)"
    )
    download: bool = option(False, "let torchvision download missing datasets")
    subset_path: str | None = option(
        None, "cifar10-subset.npz (default: $SMASO_CIFAR10_SUBSET or ../shared/data)"
    )
    device: str = option("auto", "auto (CUDA if present), cpu, cuda, cuda:1, ...")
    threads: int | None = option(None, "torch CPU threads")
    save_model: bool = option(True, "keep the trained weights (OUT/models/RUN_ID.pt)")
    stale_after: float = option(
        7200.0, "seconds after which a silent claim on a run is taken over"
    )
    checkpoint_every: float = option(
        60.0,
        "seconds of training between checkpoints (written after the epoch that "
        "crosses it; 0: after every epoch)",
    )
    cuda_graph: str = option(
        "auto",
        "capture the training step in one CUDA graph after a few eager steps (auto: "
        "on CUDA; smaso.train.TrainStep); where capture fails, the step runs eagerly",
        CUDA_GRAPH,
    )
    pack: int | None = option(
        None,
        "runs of a sweep trained together as one packed network (smaso.pack): runs "
        "of one structure (seeds, learning rates, penalty weights), up to this many "
        "(default: all of them on CUDA, 1 on the CPU)",
    )

    template_chunk: int | None = option(
        None,
        "classes per pass of the template penalty: its memory grows with it, its "
        "operations with the number of passes (default: all classes in one pass)",
    )
    log: Callable[[str], None] | None = print
    on_epoch: Callable[[int, nn.Module, dict], None] | None = None
    on_batch: Callable[[int], None] | None = None

    def __post_init__(self):
        if self.threads is not None:
            positive_int("threads", self.threads)
        if self.pack is not None:
            positive_int("pack", self.pack)
        if self.template_chunk is not None:
            positive_int("template_chunk", self.template_chunk)
        choice("cuda_graph", self.cuda_graph, CUDA_GRAPH)
        if not self.checkpoint_every >= 0:
            raise ValueError(
                f"checkpoint_every must be >= 0 seconds, got {self.checkpoint_every!r}"
            )


# --------------------------------------------------------------------------------------
# what a config builds


def build_model(
    config: RunConfig, in_channels: int, num_classes: int, check: bool = True
) -> nn.Module:
    """The network of ``config``, seeded by ``config.seed``: the model of
    :data:`smaso.models.MODELS` with its activation and structural options, then its
    filters made exactly orthogonal and/or apodised if the config asks for it
    (:func:`smaso.filters.register_filters`; ``check=False``: without the rank check
    in every forward pass, as a training step runs them)."""
    torch.manual_seed(config.seed)
    return _network(config, in_channels, num_classes, 1, check)


def _network(config, in_channels, num_classes, runs, check):
    """The config's network (``runs`` side by side), its filters parametrised."""
    model = build(
        config.model,
        num_classes,
        in_channels,
        config.activation,
        bn_momentum=config.bn_momentum,
        conv_bias=config.conv_bias,
        bn_last=config.bn_last,
        runs=runs,
    )
    method = config.orthogonality if config.orthogonality in EXACT else "none"
    register_filters(model, method, config.apodize, config.orthogonal_dense, check)
    return model


def build_packed(configs, in_channels: int, num_classes: int) -> PackedRuns:
    """The networks of ``configs`` (one configuration but for :data:`PACK_AXES`) as one
    :class:`smaso.pack.PackedRuns`, each run initialised as :func:`build_model`
    initialises it alone; exact layers without the per-forward rank check."""
    packable(configs)
    net = _network(configs[0], in_channels, num_classes, len(configs), check=False)
    packed = PackedRuns(net, len(configs))
    states = [build_model(c, in_channels, num_classes).state_dict() for c in configs]
    packed.load_state_dict(pack_state(states, packed))
    return packed


def build_training_model(configs, in_channels: int, num_classes: int) -> nn.Module:
    """The network a training step runs for ``configs``: :func:`build_model` of the
    one config without the per-forward rank check, or :func:`build_packed` of
    several."""
    if len(configs) == 1:
        return build_model(configs[0], in_channels, num_classes, check=False)
    return build_packed(configs, in_channels, num_classes)


#: What the runs of one pack may differ in: each run its own seed, learning rate
#: (:func:`smaso.pack.scale_steps`) and penalty weight.
PACK_AXES = ("seed", "lr", "lam")


def pack_key(config: RunConfig) -> RunConfig:
    """What runs must share to train as one pack: ``config`` but for
    :data:`PACK_AXES`."""
    return dataclasses.replace(config, seed=0, lr=1.0, lam=0.0)


def packable(configs) -> None:
    """Refuse ``configs`` that cannot train as one packed network: they must differ in
    :data:`PACK_AXES` only (dataset, model, epochs, ... shared) and be distinct runs."""
    configs = list(configs)
    if not configs or not all(isinstance(c, RunConfig) for c in configs):
        raise TypeError("configs must be a non-empty list of RunConfig")
    base = pack_key(configs[0])
    for c in configs[1:]:
        if pack_key(c) != base:
            raise ValueError(
                f"{c.run_id()} and {configs[0].run_id()} differ in more than the "
                f"{', '.join(PACK_AXES)}: they cannot be packed"
            )
    ids = [c.run_id() for c in configs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"packed runs must be distinct runs, got {ids}")


def _listed(configs) -> list[RunConfig]:
    return [configs] if isinstance(configs, RunConfig) else list(configs)


def build_loss(configs, template_chunk: int | None = None, like=None):
    """The extra loss term of ``configs`` (one ``RunConfig``, or a pack's): its
    orthogonality penalty (Section 5; :func:`smaso.orthogonal.penalty_loss`; the
    template penalty with ``template_chunk`` classes per pass, the :class:`Runtime`
    option) times ``lam``, or None. A pack whose runs differ in ``lam`` weighs each
    run's penalty by its own: a tensor made here on the device and in the dtype of
    ``like`` (a parameter of the model)."""
    configs = _listed(configs)
    kind = configs[0].orthogonality
    if kind not in PENALTIES:
        return None
    lams = [c.lam for c in configs]
    if len(set(lams)) == 1:
        return penalty_loss(kind, lams[0], template_chunk)
    if like is None:
        raise ValueError("runs with their own lam need like= (a model parameter)")
    lam = torch.tensor(lams, dtype=like.dtype, device=like.device)
    return penalty_loss(kind, lam, template_chunk)


def build_optimizer(configs, model: nn.Module, capturable: bool = False):
    """(optimiser, per-step scheduler or None) for ``configs`` (one ``RunConfig``, or
    a pack's): Adam at ``lr`` (its fused implementation on CUDA; ``capturable``, on
    CUDA: its state on the device, so that its step can be captured in a CUDA graph);
    the authors' Adam without bias correction is PyTorch's with
    :class:`smaso.train.AdamWithoutBiasCorrection`. A pack whose runs differ in ``lr``
    steps at the first run's, each run's step scaled to its own
    (:func:`smaso.pack.scale_steps`)."""
    configs = _listed(configs)
    config = configs[0]
    params = list(model.parameters())
    # one fused kernel per step on CUDA instead of one launch per tensor and operation
    fused = all(p.is_cuda for p in params)
    opt = torch.optim.Adam(
        params, lr=config.lr, fused=fused or None, capturable=fused and capturable
    )
    if len({c.lr for c in configs}) > 1:
        scale_steps(opt, model, [c.lr / config.lr for c in configs])
    if config.optimizer == "adam-no-bias-correction":
        return opt, AdamWithoutBiasCorrection(opt)
    return opt, None


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def effective_precision(config: RunConfig, device: torch.device) -> str:
    """What ``config.precision`` means on ``device``: "bf16-autocast" (bf16 autocast,
    the parameters in ``config.dtype``) or the dtype itself ("float32", "float64")."""
    cuda = device.type == "cuda"
    if config.precision == "bf16" or (config.precision == "auto" and cuda):
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"bf16 autocast is not supported on {device}")
        return "bf16-autocast"
    return config.dtype


# --------------------------------------------------------------------------------------
# measurements


def _orthogonal_layers(model, parametrised_only):
    layers = orthogonal_layers(model)
    if parametrised_only:
        layers = [m for m in layers if parametrize.is_parametrized(m, "weight")]
    return layers


@torch.no_grad()
def filters_cos2(model: nn.Module) -> list[float]:
    """Per Linear/Conv2d layer, the mean squared cosine between distinct filters: 0 when
    the filters are orthogonal (Eq. 11), what the penalty of Section 5 drives down."""
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
def orthogonality_error(
    model: nn.Module, parametrised_only: bool = False, normalized: bool = False
) -> float:
    """Largest ``|G - I|`` over the Linear/Conv2d layers (``parametrised_only``: those
    with an exact parametrisation), ``G`` the Gram matrix of the filters (rows of
    :func:`smaso.orthogonal.filter_matrix`; of its columns when a layer has more filters
    than inputs). ~1e-6 in float32 for an exactly orthogonal layer (Eq. 11).
    ``normalized``: of the unit vectors, for filters orthogonal but not of norm 1 (the
    authors' unnormalised Gram-Schmidt)."""
    err = 0.0
    for m in _orthogonal_layers(model, parametrised_only):
        F = filter_matrix(m.weight.detach()).double()
        if F.shape[0] > F.shape[1]:
            F = F.T
        if normalized:
            F = F / F.norm(dim=1, keepdim=True)
        G = F @ F.T
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        err = max(err, float((G - eye).abs().max()))
    return err


def _learned_eta(model) -> list[torch.Tensor]:
    """η of the activations with a learnable β (ρ a trainable parameter)."""
    return [
        m.eta.detach().flatten().double().cpu()
        for m in model.modules()
        if isinstance(getattr(m, "rho", None), nn.Parameter) and m.rho.requires_grad
    ]


def _summary(history):
    acc = [r["test_acc"] for r in history]
    return {
        "final_test_acc": float(np.mean(acc[-3:])),
        "best_test_acc": float(max(acc)),
        "last_test_acc": float(acc[-1]),
    }


# --------------------------------------------------------------------------------------
# the steps of a run


def data_key(config: RunConfig) -> tuple:
    """The config fields the loaded data depends on (a sweep loads each once)."""
    return (
        config.dataset,
        config.preprocess,
        config.dtype,
        config.upsample,
        config.limit_train,
        config.limit_test,
    )


def load_data(config: RunConfig, device, rt: Runtime) -> TensorData:
    return load(
        config.dataset,
        rt.data_root,
        preprocess=config.preprocess,
        download=rt.download,
        dtype=DTYPES[config.dtype],
        device=device,
        upsample=config.upsample,
        subset_path=rt.subset_path,
        limit_train=config.limit_train,
        limit_test=config.limit_test,
    )


def _finished(config: RunConfig, out_dir, log) -> dict | None:
    """The stored results of ``config`` if it has finished (else None); a results file
    of another configuration under its name is an error."""
    r = TABLE2.finished(config, out_dir)
    if r is not None and log:
        where = result_path(out_dir, config)
        log(f"{config.run_id()}: finished already ({where}), skipped")
    return r


@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _cudnn_benchmark():
    """cuDNN picks the fastest convolution algorithms for the (fixed) batch shapes."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def _claimed(config, out_dir, rt):
    held = claim(out_dir, config, rt.stale_after)
    if held is None:
        raise RunClaimedError(
            f"{config.run_id()} is being trained by another process (claim file in "
            f"{out_dir}/claims); skipped"
        )
    return held


def _prepare_data(config, data, device, rt) -> TensorData:
    data = load_data(config, device, rt) if data is None else data.to(device)
    expected = DATASETS[config.dataset].num_classes
    if data.num_classes != expected:
        raise ValueError(
            f"data has {data.num_classes} classes, {config.dataset} has {expected}"
        )
    return data


def _place(model, data, config, device):
    """Model and images in the config's dtype on ``device`` (channels-last on CUDA)."""
    return _to(model, config, device), *_images(data, config, device)


def _images(data, config, device):
    """Training and test images (on ``device`` already) in the config's dtype,
    channels-last on CUDA."""
    dtype = DTYPES[config.dtype]
    x_train, x_test = data.x_train.to(dtype), data.x_test.to(dtype)
    if device.type == "cuda":
        x_train = x_train.contiguous(memory_format=torch.channels_last)
        x_test = x_test.contiguous(memory_format=torch.channels_last)
    return x_train, x_test


def autocast_dtype(precision: str):
    """The autocast dtype of an :func:`effective_precision`: bfloat16 or None."""
    return torch.bfloat16 if precision == "bf16-autocast" else None


def _to(model, config, device):
    model = model.to(device, DTYPES[config.dtype])
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def run_memory(config: RunConfig, data: TensorData, device, template_chunk=None) -> int:
    """Bytes one run of ``config`` holds at the peak of its training step: network,
    gradients, optimiser state and the step's own tensors, over two eager steps on its
    first batches of ``data`` (on ``device``, in the run's precision). On CUDA, the
    allocator's peak above what was allocated before; elsewhere the peak of live
    tensor bytes (:class:`smaso.pack.LiveBytes`). A pack of k runs holds about k
    times this (:func:`smaso.pack.pack_size`)."""
    device = resolve_device(device)
    data = data.to(device)
    x = _images(data, config, device)[0]  # as a training step reads them
    autocast = autocast_dtype(effective_precision(config, device))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    meter = contextlib.nullcontext() if cuda else LiveBytes()
    with meter:
        model = _to(
            build_model(config, x.shape[1], data.num_classes, False), config, device
        )
        opt, sched = build_optimizer(config, model)
        extra = build_loss(config, template_chunk)
        step = TrainStep(model, opt, x, data.y_train, extra, autocast, sched)
        for idx in _batches(config, 0, data.y_train)[:2]:
            step(idx)
        del model, opt, sched, step
    if not cuda:
        return meter.peak
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    return peak


@dataclass
class _State:
    histories: list  # one history per run
    start: int = 0
    wall_before: float = 0.0
    resumes: list = field(default_factory=list)
    started: str = field(default_factory=now)


_HOW = ("fused", "capturable", "foreach", "differentiable")
#: What a run's results record of :func:`smaso.records.provenance`.
_PROVENANCE = ("torch", "python", "smaso", "git_commit", "git_dirty")


def _batches(config, epoch, y):
    return epoch_batches(
        y,
        config.batch_size,
        config.seed,
        epoch,
        config.balanced,
        DATASETS[config.dataset].num_classes,
    )


def _per_run(values: dict, k: int) -> list[dict]:
    """``{key: value or list of k values}`` -> k dicts."""
    if k == 1:
        return [values]
    return [{key: v[r] for key, v in values.items()} for r in range(k)]


def _reanchoring(config, epoch, n, step: TrainStep, on_batch):
    """``on_batch`` with the config's re-anchoring of the exact layers
    (:func:`smaso.orthogonal.reanchor_`) after every ``reanchor_every``-th step of the
    run (counted from its first, so a resumed run re-anchors where it would have):
    a change of variable between steps, outside any captured graph."""
    every = config.reanchor_every
    if not every:
        return on_batch

    def after(i):
        if (epoch * n + i + 1) % every == 0:
            reanchor_(step.model)
        if on_batch is not None:
            on_batch(i)

    return after


def _train_epoch(configs, epoch, step: TrainStep, on_batch):
    """Train one epoch of every run with ``step`` (packed: each run's batches stacked,
    (k, N)); the runs' training metrics and the seconds it took."""
    t0 = time.perf_counter()
    y = step.y
    if len(configs) == 1:
        batches = _batches(configs[0], epoch, y)
    else:
        per_run = [_batches(c, epoch, y) for c in configs]
        batches = [torch.stack(b) for b in zip(*per_run, strict=True)]
    hook = _reanchoring(configs[0], epoch, len(batches), step, on_batch)
    tr = step.epoch(batches, hook)
    if y.device.type == "cuda":
        torch.cuda.synchronize()
    runs = _per_run(tr, len(configs))
    for c, r in zip(configs, runs, strict=True):
        if not math.isfinite(r["loss"]):
            raise FloatingPointError(
                f"{c.run_id()}: training loss {r['loss']} in epoch {epoch + 1}: the "
                "run diverged"
            )
    return runs, time.perf_counter() - t0


def _record(config, epoch, model, tr, te, times):
    """The epoch's record of one run (``model`` that run's network alone; ``times``:
    the seconds the training took, and when the epoch began); checks that its exact
    layers can still be orthogonalised (the check the training step leaves out)."""
    train_s, t0 = times
    check_orthogonalizable(model)
    rec = {
        "epoch": epoch + 1,
        "train_loss": tr["loss"],
        "train_acc": tr["acc"],
        "penalty": tr["penalty"],
        "test_loss": te["loss"],
        "test_acc": te["acc"],
        "filters_cos2": filters_cos2(model),
    }
    if config.orthogonality in EXACT:
        rec["orthogonality_error"] = orthogonality_error(
            model, True, config.orthogonality == "gs-unnormalised"
        )
    eta = _learned_eta(model)
    if eta:
        rec["eta_mean"] = float(torch.cat(eta).mean())
    rec["train_s"] = train_s
    rec["epoch_s"] = time.perf_counter() - t0
    return rec


class Training:
    """One training of a pack of runs: one structure with one or several seeds,
    learning rates and penalty weights (:func:`run_packed`; a single run is a pack of
    one). It holds the configs, the
    device and precision, the model (packed when there are several runs), the optimiser,
    the LR scheduler, the compiled training step and the state to checkpoint, and does
    one :meth:`epoch`, one :meth:`checkpoint` and the :meth:`finish` at a time.

    Args:
        configs: the runs (``RunConfig``; :func:`packable` together).
        out_dir: the results folder (checkpoints, results, weights).
        data: a loaded dataset to reuse, or None (loaded from ``rt``).
        rt: the runtime options (:class:`Runtime`).
        say: where the progress lines go.

    Example::

        >>> import inspect
        >>> from smaso.experiment.runner import Runtime, Training
        >>> list(inspect.signature(Training).parameters)
        ['configs', 'out_dir', 'data', 'rt', 'say']
        >>> Runtime().checkpoint_every, Runtime().device
        (60.0, 'auto')
    """

    def __init__(self, configs, out_dir, data, rt: Runtime, say) -> None:
        config = configs[0]
        self.configs, self.out_dir, self.rt, self.say = configs, out_dir, rt, say
        self.device = resolve_device(rt.device)
        self.precision = effective_precision(config, self.device)
        self.autocast = autocast_dtype(self.precision)
        self.data = _prepare_data(config, data, self.device, rt)
        shape = (self.data.x_train.shape[1], self.data.num_classes)
        model = build_training_model(configs, *shape)
        self.model, x_train, self.x_test = _place(model, self.data, config, self.device)
        self.separate = _Separate(configs, self.model, *shape, self.device)
        graph = self.device.type == "cuda" and rt.cuda_graph != "off"
        self.opt, self.sched = build_optimizer(configs, self.model, capturable=graph)
        self.state = self._resume()
        if config.reanchor_every and self.state.start == 0:
            reanchor_(self.model)  # an initialisation can start close to a flip
        self.step = TrainStep(
            self.model,
            self.opt,
            x_train,
            self.data.y_train,
            build_loss(configs, rt.template_chunk, next(self.model.parameters())),
            self.autocast,
            self.sched,
            rt.cuda_graph,
            say,
        )

    @property
    def file(self) -> Path:
        """The checkpoint: ``RUN_ID.pt`` for one run, ``pack-...pt`` for a pack."""
        if len(self.configs) == 1:
            return checkpoint_path(self.out_dir, self.configs[0])
        return pack_checkpoint_path(self.out_dir, self.configs)

    def _name(self) -> str:
        k = len(self.configs)
        return self.configs[0].run_id() if k == 1 else f"the pack of {k} runs"

    def _resume(self) -> _State:
        """The state after the last finished epoch of the checkpoint, if there is one,
        loaded into the model, optimiser and scheduler; refused if the checkpoint
        belongs to other configurations, or was trained under another precision or
        device type."""
        file = self.file
        if not file.exists():
            return _State([[] for _ in self.configs])
        state = load_checkpoint(file)
        rid = self._name() if len(self.configs) == 1 else f"{self._name()} {file.stem}"
        try:
            same = [RunConfig.from_dict(c) for c in state["configs"]] == self.configs
        except (TypeError, ValueError, KeyError):
            same = False
        if not same:
            raise CheckpointError(
                f"checkpoint {file} belongs to another configuration than {rid}; it "
                "was left in place"
            )
        self._check_precision(file, state)
        self._load(file, state, rid)
        start = int(state["epoch"])
        self.say(f"{rid}: resuming after epoch {start} from {file}")
        return _State(
            [list(h) for h in state["histories"]],
            start,
            float(state["wall_s"]),
            [*state["resumes"], start],
            state["started"],
        )

    def _check_precision(self, file, state) -> None:
        was = (state.get("precision"), state.get("device_type"))
        if was != (self.precision, self.device.type):
            raise CheckpointError(
                f"checkpoint {file} was trained in {was[0]} on {was[1]}; resuming it "
                f"in {self.precision} on {self.device.type} would mix two precisions "
                "in one run. Resume it where it ran (--device / --precision), or move "
                "the checkpoint away to restart the run."
            )

    def _load(self, file, state, rid) -> None:
        # how the optimiser runs here (fused, capturable) is not the checkpoint's to say
        how = [{k: g[k] for k in _HOW if k in g} for g in self.opt.param_groups]
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            for g, h in zip(self.opt.param_groups, how, strict=True):
                g.update(h)
            if self.sched is not None:
                self.sched.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {file} does not fit {rid} ({e}); it was left in place"
            ) from None

    def epoch(self, epoch: int, on_batch) -> list[dict]:
        """Train and evaluate one epoch of every run; their records (appended to the
        histories)."""
        t0 = time.perf_counter()
        trs, train_s = _train_epoch(self.configs, epoch, self.step, on_batch)
        y_test, k = self.data.y_test, len(self.configs)
        te = evaluate(self.model, self.x_test, y_test, autocast_dtype=self.autocast)
        tes = _per_run(te, k)
        recs = [
            _record(c, epoch, net, tr, te, (train_s, t0))
            for c, net, tr, te in zip(
                self.configs, self.separate(), trs, tes, strict=True
            )
        ]
        for h, rec in zip(self.state.histories, recs, strict=True):
            h.append(rec)
        return recs

    def checkpoint(self, epoch: int, wall: float) -> None:
        """Write the state after ``epoch`` epochs (one format for one run or a pack)."""
        st = self.state
        save_torch_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "configs": [c.to_dict() for c in self.configs],
                "histories": st.histories,
                "epoch": epoch,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched else None,
                "wall_s": wall,
                "resumes": st.resumes,
                "started": st.started,
                "precision": self.precision,
                "device_type": self.device.type,
            },
            self.file,
        )

    def finish(self, wall: float) -> list[dict]:
        """Write each run's results JSON (and weights), remove the checkpoints and any
        failure records: the runs are done. Their results dicts."""
        nets = self.separate()
        results = [
            self._result(c, net, h, wall)
            for c, net, h in zip(self.configs, nets, self.state.histories, strict=True)
        ]
        self.file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only if no other checkpoint is there
            (Path(self.out_dir) / "checkpoints").rmdir()
        return results

    def _result(self, config, model, history, wall) -> dict:
        prov, device, st = provenance(), self.device, self.state
        cuda = device.type == "cuda"
        result = {
            "format": RESULT_FORMAT,
            "run_id": config.run_id(),
            "config": config.to_dict(),
            "seed": config.seed,
            "status": "done",
            "history": history,
            **_summary(history),
            "wall_s": wall,
            "epoch_s_mean": float(np.mean([r["epoch_s"] for r in history])),
            "num_parameters": num_parameters(model),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
            "threads": torch.get_num_threads(),
            "precision": self.precision,
            "packed_runs": len(self.configs),
            **{
                k: prov[k]
                for k in ("torch", "python", "smaso", "git_commit", "git_dirty")
            },
            "started": st.started,
            "finished": now(),
            "resumes": st.resumes,
        }
        if self.rt.save_model:
            save_torch_atomic(
                {k: v.detach().cpu() for k, v in model.state_dict().items()},
                model_path(self.out_dir, config),
            )
        write_json_atomic(result_path(self.out_dir, config), result)
        checkpoint_path(self.out_dir, config).unlink(missing_ok=True)
        failed_path(self.out_dir, config).unlink(missing_ok=True)
        return result


class _Separate:
    """Each run's network alone, for its measurements and files: the model itself for
    one run; for packed runs, networks of ``runs=1`` loaded from the packed one."""

    def __init__(self, configs, model, in_channels, num_classes, device):
        self.model, self.k = model, len(configs)
        if self.k > 1:
            self.nets = [
                _to(build_model(c, in_channels, num_classes), c, device)
                for c in configs
            ]

    def __call__(self) -> list[nn.Module]:
        if self.k == 1:
            return [self.model]
        for net, state in zip(
            self.nets, unpack_state(self.model, self.nets[0]), strict=True
        ):
            net.load_state_dict(state)
        return self.nets


def _train(training: Training, claims) -> list[dict]:
    """Train ``training`` while its runs' ``claims`` are held: epochs, checkpoints by
    wall-clock time, results files."""
    configs, st, rt = training.configs, training.state, training.rt
    epochs = configs[0].epochs
    t_run = last_ckpt = time.perf_counter()
    for epoch in range(st.start, epochs):
        recs = training.epoch(epoch, rt.on_batch)
        for c, held in zip(configs, claims, strict=True):
            if not held.held():
                raise RunClaimedError(
                    f"{c.run_id()}: another process took over the run"
                )
        wall = st.wall_before + time.perf_counter() - t_run
        if (
            epoch + 1 < epochs
            and time.perf_counter() - last_ckpt >= rt.checkpoint_every
        ):
            training.checkpoint(epoch + 1, wall)
            last_ckpt = time.perf_counter()
        for held in claims:
            held.touch()
        for c, rec in zip(configs, recs, strict=True):
            training.say(
                f"{c.run_id()} epoch {epoch + 1}/{epochs}: train loss "
                f"{rec['train_loss']:.3f} acc {rec['train_acc']:.3f}, "
                f"test acc {rec['test_acc']:.3f} ({rec['epoch_s']:.1f} s)"
            )
        if rt.on_epoch is not None:
            rt.on_epoch(epoch + 1, training.model, recs[0] if len(recs) == 1 else recs)
    return training.finish(st.wall_before + time.perf_counter() - t_run)


def run(
    config: RunConfig, out_dir, *, data: TensorData | None = None, **runtime
) -> dict:
    """Train one configuration of the Table 2 experiment (Section 5) into ``out_dir``;
    its results dict.

    Writes a checkpoint ``out_dir/checkpoints/RUN_ID.pt`` after the first epoch that
    ends ``checkpoint_every`` seconds (a runtime option) after the previous one and, at
    the end, ``out_dir/RUN_ID.json`` (see :func:`smaso.experiment.load_result`) and the
    trained weights ``out_dir/models/RUN_ID.pt``; the checkpoint is then removed. If
    the results file exists and holds this configuration, nothing is trained and it is
    returned (a finished run is skipped); if it holds another, ``ResultsError``. If a
    checkpoint exists, training resumes after its last epoch, so a killed run loses at
    most the epochs since that checkpoint; the resumed run computes the same numbers as
    an uninterrupted one (the batches of epoch ``e`` depend only on ``(seed, e)``). A
    checkpoint trained in another precision or on another device type is refused.
    While it trains, the run is claimed (``out_dir/claims/``): a second process asking
    for it gets :class:`RunClaimedError`.

    ``data`` reuses a loaded dataset (it must match the config's dataset options).
    ``runtime``: the fields of :class:`Runtime` (device, threads, data_root, download,
    subset_path, save_model, stale_after, checkpoint_every, ...; and the hooks ``log``,
    ``on_epoch``, ``on_batch``).

    Args:
        config: the run (:class:`~smaso.experiment.config.RunConfig`).
        out_dir: the results folder.
        data: a loaded dataset to reuse, or None (default: loaded from the runtime
            options).
        **runtime: the fields of :class:`Runtime`, among them ``log``, where the
            progress lines go (default ``print``; None: silent), and the hooks
            ``on_epoch(epoch, model, record)`` and ``on_batch(i)``.

    Returns:
        the run's results dict, as written to ``out_dir/RUN_ID.json`` (``run_id``,
        ``config``, ``history``, ``final_test_acc``, ``wall_s``, ...).

    Example::

        >>> from smaso.experiment.runner import run
        >>> run({"dataset": "digits"}, "out")
        Traceback (most recent call last):
            ...
        TypeError: config must be a RunConfig, got dict
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    return run_packed([config], out_dir, data=data, **runtime)[0]


def run_packed(
    configs, out_dir, *, data: TensorData | None = None, **runtime
) -> list[dict]:
    """Train ``configs``, runs of one structure with their own seeds, learning rates
    and penalty weights (:func:`packable`), as one packed network
    (:mod:`smaso.pack`): the same numbers as :func:`run` on each (to rounding), in one
    pass over the GPU per step. Their results dicts, in order.

    Everything :func:`run` says holds per run: one results JSON and one weights file
    each (``packed_runs`` in the results says how many trained together; ``wall_s`` is
    the pack's), finished runs returned as they are — a pack must hold unfinished runs
    only, or finished ones only. The pack has one checkpoint
    (``out_dir/checkpoints/pack-...pt``), resumed only by the same pack. Each run is
    claimed. ``on_epoch(epoch, model, records)`` gets the packed model and the runs'
    records.
    """
    configs = list(configs)
    packable(configs)
    rt = Runtime(**runtime)
    done = [_finished(c, out_dir, rt.log) for c in configs]
    if all(r is not None for r in done):
        return done
    if any(r is not None for r in done):
        raise ResultsError(
            "a pack must not mix finished and unfinished runs: "
            f"{[c.run_id() for c, r in zip(configs, done, strict=True) if r]} finished"
        )
    say = rt.log or (lambda s: None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_threads(rt.threads))
        claims = [stack.enter_context(_claimed(c, out_dir, rt)) for c in configs]
        if resolve_device(rt.device).type == "cuda":
            stack.enter_context(_cudnn_benchmark())
        training = Training(configs, out_dir, data, rt, say)
        results = _train(training, claims)
    for r in results:
        say(
            f"{r['run_id']}: done, final test acc (mean of last 3 epochs) "
            f"{r['final_test_acc']:.4f}, {r['wall_s']:.0f} s"
        )
    return results


def load_trained_model(out_dir, config: RunConfig, in_channels: int = 3) -> nn.Module:
    """The trained network of a finished run (from ``out_dir/models/RUN_ID.pt``), in
    evaluation mode."""
    file = model_path(out_dir, config)
    if not file.is_file():
        raise FileNotFoundError(f"no trained weights for {config.run_id()} at {file}")
    model = build_model(config, in_channels, DATASETS[config.dataset].num_classes)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(
            f"weights file {file} cannot be used ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    return model.to(DTYPES[config.dtype]).eval()
