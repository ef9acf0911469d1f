"""Argument checks shared by the package: one place, one wording of each error.

Every public function of ``smaso`` checks what it is given and raises a ``TypeError`` or
``ValueError`` that names the argument. The checks used by more than one module live
here; a module-specific check stays in its module.

* numbers and names: :func:`positive_int`, :func:`nonneg_int`, :func:`finite_number`,
  :func:`choice`;
* tensors: :func:`check_tensor`, :func:`check_float_tensor`, :func:`batched`;
* the VQ parameters of the paper: β ∈ [0, 1] (Eq. 8, :func:`as_beta`), η = β / (1 − β)
  ≥ 0 (Theorem 3, :func:`check_eta`), σ² > 0 (Theorem 2, :func:`check_sigma2`), the
  Tsallis index α ≥ 1 (:func:`check_alpha`);
* :func:`as_pair` for kernel sizes, strides and paddings.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "as_beta",
    "as_pair",
    "batched",
    "check_alpha",
    "check_eta",
    "check_float_tensor",
    "check_sigma2",
    "check_tensor",
    "choice",
    "finite_number",
    "nonneg_int",
    "positive_int",
]


def positive_int(name: str, v) -> int:
    """``v`` if it is an int >= 1 (not a bool), else ``ValueError`` naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def nonneg_int(name: str, v) -> int:
    """``v`` if it is an int >= 0 (not a bool), else ``ValueError`` naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return v


def finite_number(name: str, v, low=None, high=None, low_open=False) -> float:
    """``float(v)`` if ``v`` is a finite real number in ``[low, high]`` (``(low, high]``
    with ``low_open``), else ``ValueError`` naming ``name`` and the range."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v <= high
    if not ok:
        lo = "" if low is None else f" {'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{' and' if lo else ''} <= {high:g}"
        raise ValueError(f"{name} must be a finite number{lo}{hi}, got {v!r}")
    return float(v)


def choice(name: str, v, allowed):
    """``v`` if it is one of ``allowed`` (any iterable of names), else ``ValueError``
    listing them."""
    allowed = tuple(allowed)
    if v not in allowed:
        raise ValueError(
            f"{name} must be one of {', '.join(map(str, allowed))}; got {v!r}"
        )
    return v


def check_tensor(x, name: str) -> None:
    """``TypeError`` unless ``x`` is a ``torch.Tensor``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_float_tensor(x, name: str) -> None:
    """``TypeError`` unless ``x`` is a floating-point ``torch.Tensor``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")


def batched(z: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(z as (N, D), was_unbatched)``: a single input (D,) becomes a batch of one."""
    if z.ndim == 1:
        return z.unsqueeze(0), True
    return z, False


def as_beta(beta, like: torch.Tensor) -> torch.Tensor:
    """β as a tensor in ``like``'s dtype/device, checked to lie in [0, 1] (Eq. 8)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float, torch.Tensor)):
        raise TypeError(f"beta must be a number or a tensor, got {type(beta).__name__}")
    beta = torch.as_tensor(beta, dtype=like.dtype, device=like.device)
    if torch.isnan(beta).any() or (beta < 0).any() or (beta > 1).any():
        bad = beta[torch.isnan(beta) | (beta < 0) | (beta > 1)]
        raise ValueError(
            f"beta must lie in [0, 1] (Eq. 8), got {bad.flatten()[:4].tolist()}"
        )
    return beta


def check_eta(eta, x: torch.Tensor) -> torch.Tensor:
    """η = β / (1 − β) (Theorem 3, Proposition 7) as a tensor like ``x``, >= 0."""
    eta = torch.as_tensor(eta, dtype=x.dtype, device=x.device)
    if torch.isnan(eta).any() or (eta < 0).any():
        raise ValueError("eta = beta / (1 - beta) must be >= 0 (beta in [0, 1))")
    return eta


def check_sigma2(sigma2) -> float:
    """The GMM variance σ² of Theorem 2 as a positive finite float."""
    if isinstance(sigma2, torch.Tensor):
        if sigma2.numel() != 1:
            raise ValueError(
                f"sigma2 must be a scalar, got a tensor of shape {tuple(sigma2.shape)}"
            )
        sigma2 = float(sigma2)
    if isinstance(sigma2, bool) or not isinstance(sigma2, (int, float)):
        raise TypeError(
            f"sigma2 must be a positive number, got {type(sigma2).__name__}"
        )
    if not (math.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a positive finite number, got {sigma2}")
    return float(sigma2)


def check_alpha(alpha) -> float:
    """The Tsallis index α as a float >= 1 (α = 1: Shannon, 2: Gini)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(
            "alpha must be a Python number >= 1 (the Tsallis index), got "
            f"{type(alpha).__name__}"
        )
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 1:
        raise ValueError(
            "alpha must be a finite number >= 1 (alpha = 1: Shannon, 2: Gini), got "
            f"{alpha}"
        )
    return alpha


def as_pair(v) -> tuple:
    """A kernel size, stride or padding as a pair ``(h, w)``: ``3`` -> ``(3, 3)``."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
