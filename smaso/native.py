"""Hand-written C++ kernels for the β-VQ of two-piece MASOs on the CPU.

``smaso/csrc/two_piece.cpp`` holds the forward and backward of
:func:`smaso.activations.two_piece_vq` with the sigmoid weight (α = 1: the β-VQ ReLU,
leaky-ReLU and absolute value), on units as rows (:func:`smaso.fused.fold`). Measured
against kernels compiled by ``torch.compile`` from the same maths, they take one pass
over memory each way as well, but run faster (``benchmarks/activations.py``), which is
what brings the β-VQ ReLU within 1.3x ``nn.SiLU``. They run on PyTorch's intra-op
threads (``torch.set_num_threads``; :func:`parallel_threads`), in chunks of rows fixed
by the row length alone, so their numbers are the same, bit for bit, on any number of
threads.

The extension is built on first use by ``torch.utils.cpp_extension`` (seconds; kept in
its cache, ``TORCH_EXTENSIONS_DIR``), for the vector instructions PyTorch itself uses
on this machine (``torch.backends.cpu.get_cpu_capability()``, which
``ATEN_CPU_CAPABILITY`` sets). Where it cannot be built (no compiler, no ninja), the
functions below return None and :mod:`smaso.fused` uses the compiled kernels instead;
:func:`build_error` says why. Set ``SMASO_NATIVE=0`` to skip these kernels.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import torch

__all__ = [
    "applies",
    "build_error",
    "parallel_threads",
    "two_piece_backward",
    "two_piece_forward",
]

SOURCE = Path(__file__).resolve().parent / "csrc" / "two_piece.cpp"
_DTYPES = (torch.float32, torch.float64)
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_STATE: dict[str, object] = {}


def build_error() -> str | None:
    """Why the C++ kernels could not be built or are switched off, or None."""
    if os.environ.get("SMASO_NATIVE", "1") == "0":
        return "switched off (SMASO_NATIVE=0)"
    return _STATE.get("error")  # type: ignore[return-value]


def _ops():
    """The kernels' operators, building the extension on first use; None if it fails."""
    if os.environ.get("SMASO_NATIVE", "1") == "0" or "error" in _STATE:
        return None
    if "ops" not in _STATE:
        cap = torch.backends.cpu.get_cpu_capability()
        cap = cap if cap in _FLAGS else "DEFAULT"
        flags = ["-O3", f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
        threads = _openmp_flags()
        try:
            from .fused import import_cpp_extension_quietly

            import_cpp_extension_quietly()
            from torch.utils.cpp_extension import load

            logger = logging.getLogger("torch.utils.cpp_extension")
            level = logger.level
            logger.setLevel(logging.ERROR)  # no compiler-version notes in outputs
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    load(
                        f"smaso_native_{cap.lower()}",
                        [str(SOURCE)],
                        extra_cflags=flags + _FLAGS.get(cap, []) + threads,
                        extra_ldflags=threads,
                        is_python_module=False,
                        verbose=False,
                    )
            finally:
                logger.setLevel(level)
            _STATE["ops"] = torch.ops.smaso_native
        except Exception as exc:  # no compiler, no ninja, unsupported platform
            _STATE["error"] = f"{type(exc).__name__}: {exc}"
            return None
    return _STATE["ops"]


def _openmp_flags() -> list[str]:
    """``-fopenmp`` where PyTorch's threads are OpenMP's and the compiler is GCC's
    (Linux): at::parallel_for is a header template that runs on one thread unless the
    extension itself is compiled with OpenMP. The extension then shares PyTorch's
    OpenMP runtime (the library of the same name, already loaded), so
    ``torch.set_num_threads`` applies to it."""
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return ["-fopenmp"] if openmp and sys.platform.startswith("linux") else []


def _applies(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors)


def applies(x: torch.Tensor) -> bool:
    """Whether the C++ kernels run for input ``x``: float32 or float64 on the CPU, and
    the extension builds (built here if it is not yet)."""
    return _applies(x) and _ops() is not None


def _rows(x: torch.Tensor, eta: torch.Tensor) -> bool:
    return x.ndim == 2 and eta.numel() == x.shape[0]


def two_piece_forward(x: torch.Tensor, eta: torch.Tensor, slope: float):
    """(y,) = (two_piece_vq(x, eta, slope),) for rows ``x`` (M, L) and ``eta`` (M, 1)
    (α = 1); None where the C++ kernels do not apply (layout, device, dtype, no
    build)."""
    ops = _ops() if _rows(x, eta) and _applies(x, eta) else None
    if ops is None:
        return None
    return (ops.two_piece_forward(x.contiguous(), eta.reshape(-1).contiguous(), slope),)


def two_piece_backward(g: torch.Tensor, x: torch.Tensor, eta: torch.Tensor, slope):
    """(grad_x, grad_eta) of :func:`two_piece_forward`, grad_eta per row (M, 1), from
    :func:`smaso.activations.two_piece_vq_grads`; None where the kernels do not
    apply."""
    ops = _ops() if _rows(x, eta) and _applies(g, x, eta) else None
    if ops is None:
        return None
    gx, geta = ops.two_piece_backward(
        g.contiguous(), x.contiguous(), eta.reshape(-1).contiguous(), slope
    )
    return gx, geta.view(eta.shape)


def parallel_threads() -> int | None:
    """How many threads the kernels' ``at::parallel_for`` runs on now (at most
    ``torch.get_num_threads()``; 1 if the extension were built without OpenMP), or
    None where the kernels are not built."""
    ops = _ops()
    return None if ops is None else int(ops.parallel_threads())
