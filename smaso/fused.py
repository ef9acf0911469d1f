"""The fast path of the learnable activations: compiled kernels, hand-written backward.

A learnable β-VQ activation written in plain PyTorch (e.g. ``x * sigmoid(eta * x)``
with ``eta`` per channel) runs as several elementwise operators and their autograd
graph: many passes over memory where ``nn.SiLU`` makes one each way. Here every
learnable activation of :mod:`smaso.activations` supplies its maths as three functions
(:class:`Kernels`):

* ``value(x, *params)``: the output, differentiable by autograd. This is the eager
  path, and the backward when a graph of the backward is wanted (``create_graph=True``,
  e.g. double backprop through input templates);
* ``forward(x, *params) -> (y, *saved)``: the output and what the backward needs
  besides the inputs (compiled by ``torch.compile``, one pass);
* ``backward(g, x, *params, *saved) -> (grad_x, *grad_params)``: the hand-written
  derivatives (compiled, one pass);
* optionally the same two hand-written: C++ on the CPU (:mod:`smaso.native`, for the
  β-VQ ReLU, leaky-ReLU and absolute value) and Triton on CUDA
  (:mod:`smaso.triton_kernels`, for every activation with fused kernels), which run
  instead of the compiled ones wherever they apply: on CUDA, the default.

**Units as rows (a two-stage reduction).** A per-channel parameter's gradient is a sum
over the batch and the positions. Reduced in one go (over N, H and W for each channel),
the compiler writes the input gradient in one loop and reads everything again in a
second loop for the sum (measured: 1.5x ``nn.SiLU`` for the β-VQ ReLU). So the modules
fold an (N, C, ...) input into N·C rows, one per (sample, channel) unit, and repeat
each per-channel parameter for the N rows of its channel (:func:`fold`). The kernel's
parameter gradients are then row sums, contiguous, accumulated in the same loop that
writes the input gradient; autograd's backward of the repetition adds the N rows of
each channel (a tiny second stage).

**When the fast path runs** (:func:`use_fast`): ``fused=None`` (the modules' default)
takes it where it works and otherwise silently runs ``value`` under autograd, with the
same numbers up to rounding (the paths differ in the order of the sums and in the
rounding of the exponential: about 1e-7 in float32). The eager path runs under
TorchScript tracing, inside an outer ``torch.compile`` / ``torch.export`` (which fuses
the maths itself), inside ``torch.func`` transforms, for dtypes other than float32/64,
bfloat16 and float16, on devices other than CPU and CUDA, and after ``torch.compile``
failed once for a kernel (no C++ compiler, unsupported Python). ``fused=True``
requires the fast path (raising where it cannot run); ``fused=False`` never takes it.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["FAST_DTYPES", "Kernels", "compile_errors", "fold", "run", "use_fast"]


def inductor_cache_per_cpu_capability() -> None:
    """One torch.compile cache folder per CPU capability (``ATEN_CPU_CAPABILITY``).

    Inductor's on-disk caches are not keyed by the capability: a kernel generated under
    AVX-512 is found again under ``ATEN_CPU_CAPABILITY=default`` and then fails to
    compile (``'at::vec' has not been declared``). Unless the user chose a folder
    (``TORCHINDUCTOR_CACHE_DIR``), the compiled kernels of this package go to a
    subfolder of inductor's default one named after the capability.
    """
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch: its own default
        return
    capability = torch.backends.cpu.get_cpu_capability().lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        default_cache_dir(), capability
    )


inductor_cache_per_cpu_capability()

#: dtypes the compiled kernels accept; others run eagerly.
FAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Kernels(NamedTuple):
    """The maths of one activation for :func:`run` (see the module docstring);
    ``forward`` and ``backward`` None where a configuration has no fused kernels.

    ``native_forward`` and ``native_backward``, optional, are hand-written kernels of
    the same signatures (:mod:`smaso.native`, :mod:`smaso.triton_kernels`), run as
    they are instead of the compiled ones; they return None where they do not apply,
    and the compiled kernels run. ``native_applies(x)`` tells beforehand whether they
    will run for input ``x`` (they need no ``torch.compile``).
    """

    value: Callable
    forward: Callable | None = None
    backward: Callable | None = None
    native_forward: Callable | None = None
    native_backward: Callable | None = None
    native_applies: Callable | None = None  # (x) -> whether the native kernels run


_COMPILED: dict[tuple, Callable] = {}
_FAILED: dict[Callable, BaseException] = {}


def compile_errors() -> dict[str, str]:
    """Why ``torch.compile`` failed, per kernel (empty when it never failed): the
    kernels named here run eagerly from then on. (Why the hand-written kernels of
    :mod:`smaso.native` are not in use: :func:`smaso.native.build_error`.)"""
    return {fn.__qualname__: f"{type(e).__name__}: {e}" for fn, e in _FAILED.items()}


def _compiled(fn: Callable, args, unit_dim: int) -> Callable:
    """``torch.compile(fn)`` for arguments like ``args``: static shapes except the
    number of units (dim ``unit_dim``), so one compilation serves every batch size.

    The compiled kernels are static (``dynamic=False``): a dynamic row length L loses
    the fused reduction (measured: 7x ``nn.SiLU`` instead of 1.3x). Dynamo caches
    compiled graphs, and counts recompilations against its ``recompile_limit``, per
    code object, so each (kernel, dtypes, row shapes) gets a copy of the kernel's code
    and a cache of its own.
    """
    key = (fn, *[_signature(a, unit_dim) for a in args])
    if key not in _COMPILED:
        import_cpp_extension_quietly()
        own = types.FunctionType(
            fn.__code__.replace(),
            fn.__globals__,
            fn.__name__,
            fn.__defaults__,
            fn.__closure__,
        )
        _COMPILED[key] = torch.compile(own, dynamic=False)
    for a in args:
        if a.ndim > unit_dim and a.shape[unit_dim] > 1:
            torch._dynamo.maybe_mark_dynamic(a, unit_dim)
    return _COMPILED[key]


def import_cpp_extension_quietly() -> None:
    """Import ``torch.utils.cpp_extension`` (which the compiler's C++ backend imports)
    with its logger muted: on a machine with no CUDA runtime it warns that it found
    none, which says nothing about CPU kernels and would differ from machine to
    machine in a notebook's output."""
    if "torch.utils.cpp_extension" in sys.modules:
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)


def _signature(a: torch.Tensor, unit_dim: int) -> tuple:
    """What a compiled kernel specialises on: dtype, device, layout, and the shape of
    ``a`` with the number of units (> 1) left open."""
    shape = tuple(-1 if d == unit_dim and n > 1 else n for d, n in enumerate(a.shape))
    layout = a.is_contiguous(), tuple(st == 0 for st in a.stride())
    return a.dtype, a.device.type, shape, layout


def _call(
    fn: Callable,
    args,
    compiled: bool,
    required: bool,
    unit_dim: int,
    native: Callable | None = None,
):
    """``fn(*args)`` without autograd: by the ``native`` kernel where it applies, else
    compiled when asked; a failed compilation falls back to running ``fn`` eagerly (the
    same kernel) unless ``required``."""
    args = [a.detach() for a in args]
    with torch.no_grad():
        if compiled and native is not None:
            out = native(*args)
            if out is not None:
                return out
        if not compiled or fn in _FAILED:
            return fn(*args)
        try:
            return _compiled(fn, args, unit_dim)(*args)
        except Exception as exc:
            if required:
                raise
            out = fn(*args)  # raises too when the inputs are at fault, not the compiler
            _FAILED[fn] = exc
            return out


def _why_not(x: torch.Tensor, kernels: Kernels) -> str | None:
    """Why the compiled kernels cannot run on ``x`` now, or None."""
    if kernels.forward is None or kernels.backward is None:
        return "this configuration has no fused kernels"
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return "TorchScript"
    if _is_compiling():
        return "inside torch.compile or torch.export (the outer compiler fuses)"
    if _functorch_active():
        return "inside a torch.func transform"
    if x.dtype not in FAST_DTYPES:
        return f"dtype {x.dtype} (compiled kernels for {FAST_DTYPES})"
    if x.device.type not in ("cpu", "cuda"):
        return f"device {x.device.type}"
    if kernels.native_applies is not None and kernels.native_applies(x):
        return None  # hand-written kernels: no compiler needed
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python"
    if kernels.forward in _FAILED or kernels.backward in _FAILED:
        return "torch.compile failed earlier: " + str(compile_errors())
    return None


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling() if is_compiling else torch._dynamo.is_compiling())


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def use_fast(x: torch.Tensor, kernels: Kernels, fused: bool | None) -> bool:
    """Whether :func:`run` takes the compiled path for input ``x``.

    ``fused`` None: where it can; True: required (a ``RuntimeError`` names what
    prevents it, except inside an outer compiler, which fuses the maths itself);
    False: never.
    """
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    if fused is False:
        return False
    reason = _why_not(x, kernels)
    if reason is None:
        return True
    if fused and not _is_compiling():
        raise RuntimeError(f"fused=True, but the fused kernels cannot run: {reason}")
    return False


class _Fused(torch.autograd.Function):
    """Compiled forward, hand-written compiled backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, kernels, compiled, required, unit_dim, x, *params):
        y, *saved = _call(
            kernels.forward,
            (x, *params),
            compiled,
            required,
            unit_dim,
            kernels.native_forward,
        )
        ctx.kernels, ctx.compiled, ctx.required = kernels, compiled, required
        ctx.unit_dim = unit_dim
        ctx.n_params = len(params)
        ctx.save_for_backward(x, *params, *saved)
        return y

    @staticmethod
    def backward(ctx, g):
        x, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.n_params], rest[ctx.n_params :]
        need = ctx.needs_input_grad[4:]
        if torch.is_grad_enabled():
            # create_graph=True: the backward itself must be differentiable, so
            # recompute the value under autograd and differentiate that
            inputs = [t for t, n in zip((x, *params), need, strict=True) if n]
            with torch.enable_grad():
                y = ctx.kernels.value(x, *params)
            grads = iter(torch.autograd.grad(y, inputs, g, create_graph=True))
            return (None,) * 4 + tuple(next(grads) if n else None for n in need)
        args = (g.contiguous(), x, *params, *saved)
        k = ctx.kernels
        grads = _call(
            k.backward,
            args,
            ctx.compiled,
            ctx.required,
            ctx.unit_dim,
            k.native_backward,
        )
        return (None,) * 4 + tuple(
            d if n else None for d, n in zip(grads, need, strict=True)
        )


def run(
    kernels: Kernels,
    x,
    *params,
    fused: bool | None = None,
    compiled: bool = True,
    unit_dim: int = 0,
):
    """``kernels.value(x, *params)``: by the compiled kernels when :func:`use_fast`
    allows, otherwise eagerly under autograd.

    ``unit_dim``: the dimension of ``x`` (and of the parameters) that counts the units
    (the rows of :func:`fold`), left dynamic when compiling. ``compiled=False`` runs
    the same hand-written kernels without compiling them (to check the backward with
    ``gradcheck``).
    """
    if not use_fast(x, kernels, fused):
        return kernels.value(x, *params)
    required = bool(fused)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)):
        return _Fused.apply(kernels, compiled, required, unit_dim, x, *params)
    args = (x, *params)
    k = kernels
    return _call(k.forward, args, compiled, required, unit_dim, k.native_forward)[0]


def fold(x: torch.Tensor, *per_channel: torch.Tensor, spatial: bool = False):
    """Units as rows: ``x`` (N, C, *rest) as N·C rows, and each per-channel parameter
    (C, *k) or layer parameter (1, *k) repeated to one row per unit, (N·C, *k).

    Rows are (N·C, L) with L = prod(rest), or with ``spatial`` (1, N·C, *rest) (the
    rows as the channels of one sample, for pooling). A 1-D ``x`` is one row (layer
    parameters only). Returns the rows, the repeated parameters and the function that
    unfolds an output of the rows' layout (any trailing shape) back to (N, C, ...).
    """
    if x.ndim < 2:
        if any(p.shape[0] != 1 for p in per_channel):
            raise ValueError(
                f"input of shape {tuple(x.shape)} has no channel dimension (dim 1)"
            )
        rows = x.reshape(1, -1)
        return (
            rows,
            [p.expand(1, *p.shape[1:]) for p in per_channel],
            (lambda y: y.reshape(x.shape)),
        )
    N, C = x.shape[:2]
    reps = []
    for p in per_channel:
        if p.shape[0] == 1:
            reps.append(p.expand(N * C, *p.shape[1:]))
        elif p.shape[0] == C:
            reps.append(p.expand(N, *p.shape).reshape(N * C, *p.shape[1:]))
        else:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not have {p.shape[0]} "
                "channels in dim 1"
            )
    rows = x.reshape(1, N * C, *x.shape[2:]) if spatial else x.reshape(N * C, -1)
    if spatial:
        return rows, reps, lambda y: y.reshape(N, C, *y.shape[2:])
    return rows, reps, lambda y: y.reshape(x.shape)
