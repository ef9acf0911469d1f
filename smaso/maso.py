"""The max-affine spline operator (MASO) and its hard vector quantisation.

Notation follows Balestriero & Baraniuk (ICLR 2019), Section 2 and Appendix A:

* ``A`` -- slopes, shape ``(K, R, D)``: ``K`` units (output dimensions), ``R``
  regions (affine pieces) per unit, input dimension ``D``;
* ``B`` -- offsets, shape ``(K, R)``;
* ``z`` -- the layer input, shape ``(N, D)`` (a batch) or ``(D,)`` (one vector;
  results are then returned without the batch dimension);
* ``T`` -- a VQ ("selection") matrix, shape ``(N, K, R)`` or ``(K, R)``.

Region indices are 0-based here (the paper counts ``r = 1, ..., R``).
All functions are vectorised over the batch and work on any device, in
float32 or float64.
"""

import torch

from .checks import batched, check_tensor

__all__ = [
    "apply_vq",
    "check_params",
    "hard_vq",
    "kmeans_offsets",
    "maso",
    "nearest_centroid",
    "region_affine",
    "scores",
    "vq_codes",
]


def check_params(A, B, z=None):
    """Validate MASO parameters ``A`` (K, R, D), ``B`` (K, R) and optionally an input
    ``z``.

    These are the parameters of the operator S[A, B] of Eq. (1) / Eq. (14).
    ``z`` may be ``(N, D)`` or ``(D,)``. Checks: tensor types, number of
    dimensions, matching shapes, ``K >= 1`` and ``R >= 1``, floating point
    dtype, one common dtype and device, and finite values.

    Returns ``(K, R, D)``. Raises ``TypeError`` for non-tensors and
    ``ValueError`` for everything else.
    """
    check_tensor(A, "A")
    check_tensor(B, "B")
    if A.ndim != 3:
        raise ValueError(
            f"A must have shape (K, R, D), got {tuple(A.shape)} ({A.ndim} dims)"
        )
    if B.ndim != 2:
        raise ValueError(
            f"B must have shape (K, R), got {tuple(B.shape)} ({B.ndim} dims)"
        )
    K, R, D = A.shape
    if tuple(B.shape) != (K, R):
        raise ValueError(
            f"B must have shape (K, R) = {(K, R)} to match A of shape "
            f"{tuple(A.shape)}, "
            f"got {tuple(B.shape)}"
        )
    if R == 0:
        raise ValueError(
            "R = 0 regions: a MASO needs at least one affine piece per unit (A has "
            f"shape {tuple(A.shape)})"
        )
    if K == 0:
        raise ValueError(f"K = 0 units: A has shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise ValueError(f"A must be floating point, got dtype {A.dtype}")
    if B.dtype != A.dtype:
        raise ValueError(f"dtype mismatch: A is {A.dtype} but B is {B.dtype}")
    if B.device != A.device:
        raise ValueError(f"device mismatch: A is on {A.device} but B is on {B.device}")
    if not bool(torch.isfinite(A).all()):
        raise ValueError("A contains NaN or inf entries")
    if not bool(torch.isfinite(B).all()):
        raise ValueError("B contains NaN or inf entries")
    if z is not None:
        check_tensor(z, "z")
        if z.ndim not in (1, 2):
            raise ValueError(f"z must have shape (N, D) or (D,), got {tuple(z.shape)}")
        if z.shape[-1] != D:
            raise ValueError(
                f"z has last dimension {z.shape[-1]} (shape {tuple(z.shape)}) but A "
                f"has D = {D} "
                f"(shape {tuple(A.shape)})"
            )
        if not z.is_floating_point():
            raise ValueError(f"z must be floating point, got dtype {z.dtype}")
        if z.dtype != A.dtype:
            raise ValueError(f"dtype mismatch: z is {z.dtype} but A, B are {A.dtype}")
        if z.device != A.device:
            raise ValueError(
                f"device mismatch: z is on {z.device} but A, B are on {A.device}"
            )
        if not bool(torch.isfinite(z).all()):
            raise ValueError(
                "z contains NaN or inf entries; the MASO input must be finite"
            )
    return K, R, D


def scores(A, B, z):
    """Per-region affine scores ``<A[k, r], z> + B[k, r]``, shape (N, K, R).

    These are the quantities maximised in Eq. (1) (and the logits of the soft
    VQ of Eq. (6)). Unbatched ``z`` of shape (D,) gives (K, R).
    """
    check_params(A, B, z)
    z2, single = batched(z)
    s = _scores(A, B, z2)
    return s[0] if single else s


def _scores(A, B, z2):
    """Unchecked scores of a batch ``z2`` (N, D): the einsum shared by :func:`scores`
    and :func:`apply_vq`."""
    return torch.einsum("krd,nd->nkr", A, z2) + B


def maso(A, B, z):
    """The MASO output, Eq. (1) / Eq. (14): ``max_r <A[k, r], z> + B[k, r]``.

    Each unit ``k`` takes the maximum of its ``R`` affine scores
    (:func:`scores`).

    Args:
        A: slopes, shape ``(K, R, D)``.
        B: offsets, shape ``(K, R)``.
        z: the input, shape ``(N, D)`` or ``(D,)``.

    Returns:
        The output, shape ``(N, K)``, or ``(K,)`` for unbatched ``z``.

    Example::

        >>> import torch
        >>> from smaso.maso import maso
        >>> A = torch.tensor([[[1.0], [0.0]]])  # ReLU: pieces u and 0
        >>> B = torch.zeros(1, 2)
        >>> z = torch.linspace(-2, 2, 5)[:, None]
        >>> torch.allclose(maso(A, B, z), torch.relu(z))
        True
    """
    return scores(A, B, z).amax(dim=-1)


def vq_codes(A, B, z):
    """The VQ code ``t`` of Eq. (2): ``argmax_r <A[k, r], z> + B[k, r]``.

    Returns a ``torch.long`` tensor (N, K) (or (K,)) of 0-based region indices.
    Ties are resolved to the lowest region index (``torch.argmax`` returns the
    first maximal index).
    """
    return scores(A, B, z).argmax(dim=-1)


def hard_vq(A, B, z):
    """The hard-VQ selection matrix T_H of Eq. (2) and Proposition 8.

    ``T_H[n, k, r] = 1`` if ``r`` is the arg max of Eq. (1) for unit ``k`` and
    input ``z[n]``, else 0. Ties are resolved to the lowest region index, so every
    row is exactly one-hot.

    Args:
        A: slopes, shape ``(K, R, D)``.
        B: offsets, shape ``(K, R)``.
        z: the input, shape ``(N, D)`` or ``(D,)``.

    Returns:
        The one-hot matrix, shape ``(N, K, R)`` (or ``(K, R)`` for unbatched ``z``),
        in the dtype of ``z``.

    Example::

        >>> import torch
        >>> from smaso.maso import hard_vq
        >>> A, B = torch.tensor([[[1.0], [0.0]]]), torch.zeros(1, 2)  # ReLU
        >>> hard_vq(A, B, torch.tensor([[-1.0], [2.0]]))
        tensor([[[0., 1.]],
        <BLANKLINE>
                [[1., 0.]]])
    """
    s = scores(A, B, z)
    codes = s.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(s).scatter_(-1, codes, 1.0)


def _check_T(T, K, R, ref, name="T"):
    """Validate a VQ matrix against (K, R) and the reference tensor's dtype/device."""
    check_tensor(T, name)
    if T.ndim not in (2, 3) or tuple(T.shape[-2:]) != (K, R):
        raise ValueError(
            f"{name} must have shape (N, K, R) or (K, R) with (K, R) = {(K, R)}, got "
            f"{tuple(T.shape)}"
        )
    if T.device != ref.device:
        raise ValueError(
            f"device mismatch: {name} is on {T.device} but A is on {ref.device}"
        )
    if T.is_floating_point():
        if T.dtype != ref.dtype:
            raise ValueError(
                f"dtype mismatch: {name} is {T.dtype} but A is {ref.dtype}"
            )
    elif T.is_complex():
        raise ValueError(f"{name} must be real, got dtype {T.dtype}")
    else:  # bool / integer one-hot codes are exact in any float dtype
        T = T.to(ref.dtype)
    return T


def apply_vq(A, B, z, T):
    """MASO output for a given VQ matrix ``T``, Eq. (2) / Eq. (16).

    ``out[n, k] = sum_r T[n, k, r] * (<A[k, r], z[n]> + B[k, r])``.

    ``T`` may be any (N, K, R) matrix -- the one-hot ``hard_vq`` (which gives
    back Eq. (1)), a soft VQ such as the posterior of Eq. (6), or anything else --
    or a single (K, R) matrix broadcast over the batch. Boolean/integer ``T``
    are converted to the dtype of ``A``.

    Args:
        A: slopes, shape ``(K, R, D)``.
        B: offsets, shape ``(K, R)``.
        z: the input, shape ``(N, D)`` or ``(D,)``.
        T: the VQ matrix, shape ``(N, K, R)`` or ``(K, R)`` (a batched ``T`` needs a
            batched ``z`` with the same ``N``).

    Returns:
        The output, shape ``(N, K)``, or ``(K,)`` for unbatched ``z``.

    Example::

        >>> import torch
        >>> from smaso.maso import apply_vq, hard_vq, maso
        >>> g = torch.Generator().manual_seed(0)
        >>> A, B = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, generator=g)
        >>> z = torch.randn(6, 5, generator=g)
        >>> torch.allclose(apply_vq(A, B, z, hard_vq(A, B, z)), maso(A, B, z))
        True
    """
    T, z2, single = _check_apply_vq(A, B, z, T)
    out = (T * _scores(A, B, z2)).sum(dim=-1)
    return out[0] if single else out


def _check_apply_vq(A, B, z, T):
    """The argument checks of :func:`apply_vq`: ``T`` in the dtype of ``A``, the
    batch ``z2`` (N, D) and whether ``z`` was a single vector."""
    K, R, _ = check_params(A, B, z)
    T = _check_T(T, K, R, A)
    z2, single = batched(z)
    if T.ndim == 3:
        if single:
            raise ValueError(
                f"T has a batch dimension (shape {tuple(T.shape)}) but z is a single "
                f"vector of shape {tuple(z.shape)}"
            )
        if T.shape[0] != z2.shape[0]:
            raise ValueError(
                f"T has batch size {T.shape[0]} (shape {tuple(T.shape)}) but z has "
                f"{z2.shape[0]} (shape {tuple(z.shape)})"
            )
    return T, z2, single


def region_affine(A, B, T):
    """Region-specific affine parameters ``(A[T], B[T])``, Eq. (15).

    ``A[T][..., k, :] = sum_r T[..., k, r] A[k, r, :]`` and
    ``B[T][..., k] = sum_r T[..., k, r] B[k, r]``, so that for ``T = hard_vq(A, B, z)``
    the MASO output is the affine map ``A[T] z + B[T]`` of Eq. (16).

    ``T`` of shape (N, K, R) gives ``A[T]`` (N, K, D) and ``B[T]`` (N, K);
    ``T`` of shape (K, R) gives (K, D) and (K,).
    """
    K, R, _ = check_params(A, B)
    T = _check_T(T, K, R, A)
    AT = torch.einsum("...kr,krd->...kd", T, A)
    BT = (T * B).sum(dim=-1)
    return AT, BT


def kmeans_offsets(A):
    """Offsets ``B[k, r] = -1/2 ||A[k, r]||^2`` of Proposition 1.

    With these offsets the MASO VQ is a nearest-centroid (K-means) assignment
    with centroids ``A[k, r]``; see :func:`nearest_centroid`.
    """
    check_tensor(A, "A")
    if A.ndim != 3:
        raise ValueError(f"A must have shape (K, R, D), got {tuple(A.shape)}")
    return -0.5 * (A * A).sum(dim=-1)


def nearest_centroid(A, z):
    """``argmin_r ||A[k, r] - z||^2`` for every unit ``k`` (Proposition 1).

    Computed from explicit differences (memory O(N K R D)), not via the
    expansion used by the MASO, so that ``vq_codes(A, kmeans_offsets(A), z) ==
    nearest_centroid(A, z)`` is a genuine check of Proposition 1. Returns long
    (N, K) (or (K,) for unbatched ``z``); ties go to the lowest index.
    """
    check_tensor(A, "A")
    if A.ndim != 3:
        raise ValueError(f"A must have shape (K, R, D), got {tuple(A.shape)}")
    check_params(A, torch.zeros(A.shape[:2], dtype=A.dtype, device=A.device), z)
    z2, single = batched(z)
    d2 = ((z2[:, None, None, :] - A[None]) ** 2).sum(dim=-1)
    codes = d2.argmin(dim=-1)
    return codes[0] if single else codes
