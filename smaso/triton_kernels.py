"""Triton kernels of the β-VQ activations on CUDA: the fast path's default there.

On CUDA, the learnable activations of :mod:`smaso.activations` run these kernels
(:mod:`smaso._triton_jit`) through :mod:`smaso.fused`, as the CPU runs the C++ kernels
of :mod:`smaso.native`:

* the two-piece family :func:`smaso.activations.two_piece_vq` (Theorem 3 with R = 2,
  Eq. 9, then Eq. 2): :class:`~smaso.activations.BetaVQReLU`,
  :class:`~smaso.activations.BetaVQLeakyReLU`, :class:`~smaso.activations.BetaVQAbs`,
  and with the α-entropy weight of (8.3) of the book (α ∈ {1, 1.5, 2})
  :class:`~smaso.activations.TsallisVQReLU`;
* β-softmax pooling over non-overlapping windows (Proposition 4):
  :class:`~smaso.activations.BetaVQMaxPool2d`;
* the β-VQ of learned max-affine units (Theorem 3, Eq. 9):
  :class:`~smaso.activations.BetaVQMaxout` (α = 1).

Each op is one forward kernel and one backward kernel; the backward writes the input
gradient and sums the parameter gradients (dη per unit, and the maxout's slopes and
offsets) in the same pass, as per-program partials added in a fixed order
(deterministic, no atomics). Inputs float32, bfloat16, float16 (computed in float32)
or float64 (computed in float64). A call is a plain kernel launch on a grid computed
from the shapes: no compiler guards, no host synchronisation, no allocation besides
the outputs and the small partial sums, so forward and backward can be captured in a
CUDA graph.

Triton is imported on the first CUDA input (not at all on the CPU). Where it is
missing or older than :data:`TRITON_MIN`, or a kernel fails to build, :func:`attempt`
returns None and the fast path uses its other kernels (``torch.compile``);
:func:`errors` says why. ``SMASO_TRITON=0`` switches these kernels off.
``SMASO_TRITON=interpret`` together with ``TRITON_INTERPRET=1`` (set before triton is
imported) runs them on CPU tensors in Triton's interpreter instead of on CUDA ones: how
the tests check them without a GPU (``tests/test_triton.py``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "DTYPES",
    "applies",
    "attempt",
    "errors",
    "max_affine_backward",
    "max_affine_forward",
    "pool_backward",
    "pool_forward",
    "two_piece_backward",
    "two_piece_forward",
]

#: Input dtypes of the kernels.
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

#: The oldest triton (major, minor) the kernels are tested on (torch 2.6 brings it).
TRITON_MIN = (3, 2)

#: Elements of one program's tile, and the number of programs a backward aims at (it
#: splits rows into chunks when there are fewer rows): tuning, not maths.
TILE = 1024
PROGRAMS = 1024

_STATE: dict[str, object] = {}
_FAILED: dict[str, str] = {}


def _too_old(version: str) -> str:
    """Why triton ``version`` does not run these kernels ('' where it does): older than
    :data:`TRITON_MIN`, the oldest whose interpreter runs ``tests/test_triton.py``
    (triton 3.1, beside torch 2.5, rejects the kernels' ``tl.arange`` bounds). Such a
    torch takes the other kernels of the fast path, with the same maths."""
    parts = re.match(r"(\d+)\.(\d+)", version)
    if parts and tuple(map(int, parts.groups())) >= TRITON_MIN:
        return ""
    least = ".".join(map(str, TRITON_MIN))
    return f"triton {version} is older than {least}, the oldest these kernels run on"


def _mode() -> str:
    return os.environ.get("SMASO_TRITON", "1")


def _jit():
    """The module of ``@triton.jit`` kernels, importing triton on first use; None
    where it cannot be imported or the kernels are switched off."""
    mode = _mode()
    if mode == "0" or "error" in _STATE:
        return None
    if "jit" not in _STATE:
        if mode == "interpret" and os.environ.get("TRITON_INTERPRET") != "1":
            _STATE["error"] = (
                "SMASO_TRITON=interpret needs TRITON_INTERPRET=1 set before triton "
                "is imported"
            )
            return None
        try:
            import triton

            too_old = _too_old(triton.__version__)
            if too_old:
                _STATE["error"] = too_old
                return None
            from . import _triton_jit
        except Exception as exc:  # no triton (e.g. a CPU-only torch), or a broken one
            _STATE["error"] = f"{type(exc).__name__}: {exc}"
            return None
        _STATE["jit"] = _triton_jit
    return _STATE["jit"]


def errors() -> dict[str, str]:
    """Why the Triton kernels are not in use: ``{"import": ...}`` where triton cannot
    be imported, else one entry per kernel that failed to build or run (those run
    the other kernels of the fast path from then on); empty when none failed."""
    out = dict(_FAILED)
    if _mode() == "0":
        out["import"] = "switched off (SMASO_TRITON=0)"
    elif "error" in _STATE:
        out["import"] = str(_STATE["error"])
    return out


def applies(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for input ``x``: a CUDA tensor (a CPU one under
    ``SMASO_TRITON=interpret``) of a dtype in :data:`DTYPES`, and triton imports."""
    device = "cpu" if _mode() == "interpret" else "cuda"
    return x.device.type == device and x.dtype in DTYPES and _jit() is not None


def attempt(fn: Callable, *args):
    """``fn(*args)`` (one of this module's kernels) where :func:`applies` to
    ``args[0]`` and ``fn`` has not failed before; None otherwise: where the inputs'
    shapes are not the kernel's (its ``ValueError``, e.g. a 4-D input to a kernel on
    rows), or when it fails now (the reason goes to :func:`errors`, and ``fn`` is not
    tried again)."""
    if fn.__name__ in _FAILED or not applies(args[0]):
        return None
    try:
        return fn(*args)
    except ValueError:  # inputs of another layout: not for these kernels
        return None
    except Exception as exc:
        _FAILED[fn.__name__] = f"{type(exc).__name__}: {exc}"
        return None


# --------------------------------------------------------------------------------------
# Launch plans


class _Plan(NamedTuple):
    block_m: int  # rows per tile
    block_l: int  # positions per tile
    row_blocks: int
    col_blocks: int
    splits: int  # backward: programs per row block
    chunk: int  # backward: positions per split (a multiple of block_l)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=4096)
def _plan(M: int, L: int, width: int, tile: int, programs: int) -> _Plan:
    """Tiles of about ``tile`` elements (``width`` per position: the maxout's padded
    pieces) over M rows of L positions, and the backward's split of each row into
    chunks so that there are about ``programs`` programs when rows are few."""
    block_l = min(_pow2(L), max(1, tile // width))
    block_m = min(_pow2(M), max(1, tile // (width * block_l)))
    row_blocks, col_blocks = -(-M // block_m), -(-L // block_l)
    want = min(col_blocks, max(1, -(-programs // row_blocks)))
    per = -(-col_blocks // want)
    return _Plan(
        block_m, block_l, row_blocks, col_blocks, -(-col_blocks // per), per * block_l
    )


def _get_plan(M: int, L: int, width: int = 1) -> _Plan:
    return _plan(M, L, width, TILE, PROGRAMS)


def _kernels():
    jit = _jit()
    if jit is None:
        raise RuntimeError(f"the Triton kernels cannot run: {errors()}")
    return jit


def _device(x: torch.Tensor):
    """The CUDA device of ``x`` made current for the launch (Triton launches on the
    current device)."""
    if x.device.type != "cuda" or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_row(eta: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """``eta`` as a 1-D view of ``n`` values (strides kept: a repeated layer η has
    stride 0)."""
    if eta.numel() != n:
        raise ValueError(f"{what}: expected {n} values of eta, got {eta.numel()}")
    return eta.reshape(n)


def _check_rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"{what}: expected rows (M, L), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{what}: dtype {x.dtype} not in {DTYPES}")
    return x.contiguous()


def _row_sums(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The partials (M, splits, ...) added over the splits, in ``like``'s dtype and
    shape."""
    total = part[:, 0] if part.shape[1] == 1 else part.sum(1)
    return total.to(like.dtype).reshape(like.shape)


# --------------------------------------------------------------------------------------
# Two-piece family: β-VQ ReLU, leaky-ReLU, absolute value; α-entropy VQ ReLU


def two_piece_forward(x: torch.Tensor, eta: torch.Tensor, slope=0.0, alpha=1.0):
    """(y,) = (:func:`smaso.activations.two_piece_vq` (x, eta, slope, alpha),) for rows
    ``x`` (M, L) and ``eta`` with one value per row ((M, 1) or (M,)): the β-VQ of the
    two-piece MASO {x, s x} (Theorem 3 with R = 2, Eq. 9; Eq. 2), with the α-entropy
    weight of (8.3) of the book for α = 1.5 and 2."""
    jit = _kernels()
    x = _check_rows(x, "two_piece_forward")
    M, L = x.shape
    e = _per_row(eta, M, "two_piece_forward")
    _check_alpha(alpha)
    y = torch.empty_like(x)
    if y.numel() == 0:
        return (y,)
    p = _get_plan(M, L)
    with _device(x):
        jit.two_piece_forward_kernel[(p.row_blocks * p.col_blocks,)](
            x,
            e,
            y,
            M,
            L,
            e.stride(0),
            p.col_blocks,
            SLOPE=float(slope),
            ALPHA=float(alpha),
            F64=x.dtype == torch.float64,
            BLOCK_M=p.block_m,
            BLOCK_L=p.block_l,
        )
    return (y,)


def two_piece_backward(g, x, eta, slope=0.0, alpha=1.0):
    """(grad_x, grad_eta) of :func:`two_piece_forward`, grad_eta per row in ``eta``'s
    shape: :func:`smaso.activations.two_piece_vq_grads` with dη summed over each row
    in the same pass."""
    jit = _kernels()
    x = _check_rows(x, "two_piece_backward")
    g = _like(g, x, "two_piece_backward")
    M, L = x.shape
    e = _per_row(eta, M, "two_piece_backward")
    _check_alpha(alpha)
    gx = torch.empty_like(x)
    if M * L == 0:
        return gx, torch.zeros_like(eta)
    p = _get_plan(M, L)
    part = torch.empty((M, p.splits), dtype=_acc_dtype(x), device=x.device)
    with _device(x):
        jit.two_piece_backward_kernel[(p.row_blocks * p.splits,)](
            g,
            x,
            e,
            gx,
            part,
            M,
            L,
            e.stride(0),
            p.splits,
            p.chunk,
            SLOPE=float(slope),
            ALPHA=float(alpha),
            F64=x.dtype == torch.float64,
            BLOCK_M=p.block_m,
            BLOCK_L=p.block_l,
        )
    return gx, _row_sums(part, eta)


def _check_alpha(alpha) -> None:
    if float(alpha) not in (1.0, 1.5, 2.0):
        raise ValueError(f"the Triton kernels have alpha in (1, 1.5, 2), got {alpha}")


def _like(g: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
    if g.shape != x.shape:
        raise ValueError(
            f"{what}: gradient of shape {tuple(g.shape)} for input {tuple(x.shape)}"
        )
    return g.contiguous()


# --------------------------------------------------------------------------------------
# β-softmax pooling over non-overlapping windows


def _check_pool(x: torch.Tensor, kh: int, kw: int, what: str) -> torch.Tensor:
    if x.ndim != 4 or x.dtype not in DTYPES:
        raise ValueError(
            f"{what}: expected (N, C, H, W) in {DTYPES}, got {tuple(x.shape)} {x.dtype}"
        )
    if kh < 1 or kw < 1 or x.shape[2] % kh or x.shape[3] % kw:
        raise ValueError(
            f"{what}: H, W = {tuple(x.shape[2:])} are not multiples of the window "
            f"{kh}x{kw}"
        )
    return x.contiguous()


def pool_forward(x: torch.Tensor, eta: torch.Tensor, kh: int, kw: int):
    """(y, y_acc, lse) of :func:`smaso.activations.softmax_pool_windows`: β-softmax
    pooling y = Σ_i softmax(η u)_i u_i over the kh×kw windows (stride kh×kw) of
    ``x`` (N, C, H, W), H and W multiples of kh and kw (Proposition 4, Eq. 9), with
    ``eta`` one value per channel; y_acc (y itself for float32 and float64 inputs)
    and lse = log Σ_i exp(η u_i) in the compute dtype (float32, float64 for float64
    inputs): the fast path's ``forward`` returns the output, then what the backward
    needs."""
    jit = _kernels()
    x = _check_pool(x, kh, kw, "pool_forward")
    N, C, H, W = x.shape
    e = _per_row(eta, C, "pool_forward")
    Ho, Wo = H // kh, W // kw
    y = torch.empty((N, C, Ho, Wo), dtype=x.dtype, device=x.device)
    lse = torch.empty((N, C, Ho, Wo), dtype=_acc_dtype(x), device=x.device)
    y_acc = y if y.dtype == lse.dtype else torch.empty_like(lse)
    if y.numel() == 0:
        return y, y_acc, lse
    p = _get_plan(N * C, Ho * Wo)
    with _device(x):
        jit.pool_forward_kernel[(p.row_blocks * p.col_blocks,)](
            x,
            e,
            y,
            y_acc,
            lse,
            N * C,
            C,
            H,
            W,
            Wo,
            Ho * Wo,
            e.stride(0),
            p.col_blocks,
            KH=kh,
            KW=kw,
            F64=x.dtype == torch.float64,
            SAVE_ACC=y_acc is not y,
            BLOCK_M=p.block_m,
            BLOCK_L=p.block_l,
        )
    return y, y_acc, lse


def pool_backward(g, x, eta, y, lse, kh: int, kw: int):
    """(grad_x, grad_eta) of :func:`pool_forward` from its (y_acc, lse):
    :func:`smaso.activations.softmax_pool_grads`, with dη summed per channel (in
    ``eta``'s shape) in the same pass."""
    jit = _kernels()
    x = _check_pool(x, kh, kw, "pool_backward")
    N, C, H, W = x.shape
    e = _per_row(eta, C, "pool_backward")
    g = _like(g, y, "pool_backward")
    y, lse = y.contiguous(), lse.contiguous()
    Ho, Wo = H // kh, W // kw
    gx = torch.empty_like(x)
    if g.numel() == 0:
        return gx.zero_(), torch.zeros_like(eta)
    p = _get_plan(N * C, Ho * Wo)
    part = torch.empty((N * C, p.splits), dtype=_acc_dtype(x), device=x.device)
    with _device(x):
        jit.pool_backward_kernel[(p.row_blocks * p.splits,)](
            g,
            x,
            e,
            y,
            lse,
            gx,
            part,
            N * C,
            C,
            H,
            W,
            Wo,
            Ho * Wo,
            e.stride(0),
            p.splits,
            p.chunk,
            KH=kh,
            KW=kw,
            F64=x.dtype == torch.float64,
            BLOCK_M=p.block_m,
            BLOCK_L=p.block_l,
        )
    per_unit = part[:, 0] if p.splits == 1 else part.sum(1)
    return gx, per_unit.view(N, C).sum(0).to(eta.dtype).reshape(eta.shape)


# --------------------------------------------------------------------------------------
# β-VQ of learned max-affine units (the maxout of BetaVQMaxout)


def _check_pieces(x, slopes, offsets, what):
    M = x.shape[0]
    if slopes.ndim != 2 or slopes.shape[0] != M or offsets.shape != slopes.shape:
        raise ValueError(
            f"{what}: expected slopes and offsets ({M}, R), got "
            f"{tuple(slopes.shape)} and {tuple(offsets.shape)}"
        )
    return slopes.shape[1]


def max_affine_forward(x, slopes, offsets, eta):
    """(y,) = (:func:`smaso.activations.max_affine_vq` (x, slopes, offsets, eta),): y =
    Σ_r T_r s_r with s_r = a_r x + b_r and T = softmax(η s) (Theorem 3, Eq. 9; Eq. 2)
    for rows ``x`` (M, L), ``slopes`` and ``offsets`` (M, R), one η per row."""
    jit = _kernels()
    x = _check_rows(x, "max_affine_forward")
    M, L = x.shape
    R = _check_pieces(x, slopes, offsets, "max_affine_forward")
    e = _per_row(eta, M, "max_affine_forward")
    y = torch.empty_like(x)
    if y.numel() == 0:
        return (y,)
    p = _get_plan(M, L, _pow2(R))
    with _device(x):
        jit.max_affine_forward_kernel[(p.row_blocks * p.col_blocks,)](
            x,
            slopes,
            offsets,
            e,
            y,
            M,
            L,
            R,
            *slopes.stride(),
            *offsets.stride(),
            e.stride(0),
            p.col_blocks,
            F64=x.dtype == torch.float64,
            R_P2=_pow2(R),
            BLOCK_M=p.block_m,
            BLOCK_L=p.block_l,
        )
    return (y,)


def max_affine_backward(g, x, slopes, offsets, eta):
    """(grad_x, grad_slopes, grad_offsets, grad_eta) of :func:`max_affine_forward`:
    :func:`smaso.activations.max_affine_vq_grads` with the parameters' gradients
    summed over each row in the same pass."""
    jit = _kernels()
    x = _check_rows(x, "max_affine_backward")
    g = _like(g, x, "max_affine_backward")
    M, L = x.shape
    R = _check_pieces(x, slopes, offsets, "max_affine_backward")
    e = _per_row(eta, M, "max_affine_backward")
    gx = torch.empty_like(x)
    if M * L == 0:
        return (
            gx,
            torch.zeros_like(slopes),
            torch.zeros_like(offsets),
            torch.zeros_like(eta),
        )
    p = _get_plan(M, L, _pow2(R))
    acc = _acc_dtype(x)
    part_a = torch.empty((M, p.splits, R), dtype=acc, device=x.device)
    part_b = torch.empty((M, p.splits, R), dtype=acc, device=x.device)
    part_eta = torch.empty((M, p.splits), dtype=acc, device=x.device)
    with _device(x):
        jit.max_affine_backward_kernel[(p.row_blocks * p.splits,)](
            g,
            x,
            slopes,
            offsets,
            e,
            gx,
            part_a,
            part_b,
            part_eta,
            M,
            L,
            R,
            *slopes.stride(),
            *offsets.stride(),
            e.stride(0),
            p.splits,
            p.chunk,
            F64=x.dtype == torch.float64,
            R_P2=_pow2(R),
            BLOCK_M=p.block_m,
            BLOCK_L=p.block_l,
        )
    return (
        gx,
        _row_sums(part_a, slopes),
        _row_sums(part_b, offsets),
        _row_sums(part_eta, eta),
    )
