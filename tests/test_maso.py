"""Tests for smaso.maso: Eq. (1), (2), (14)-(16), Proposition 1, Proposition 8."""

import pytest
import torch

from smaso.maso import (
    apply_vq,
    check_params,
    hard_vq,
    kmeans_offsets,
    maso,
    nearest_centroid,
    region_affine,
    scores,
    vq_codes,
)

DTYPES = [torch.float32, torch.float64]
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}


def rand_params(K, R, D, N, dtype, seed=0, bias_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, R, D, generator=g, dtype=dtype)
    B = bias_scale * torch.randn(K, R, generator=g, dtype=dtype)
    z = torch.randn(N, D, generator=g, dtype=dtype)
    return A, B, z


def test_check_params_returns_sizes():
    A, B, z = rand_params(3, 4, 5, 2, torch.float64)
    assert check_params(A, B, z) == (3, 4, 5)
    assert check_params(A, B) == (3, 4, 5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_and_eq1_by_definition(dtype):
    A, B, z = rand_params(4, 3, 5, 7, dtype)
    s = scores(A, B, z)
    assert s.shape == (7, 4, 3) and s.dtype == dtype
    # explicit broadcasting, independent of the einsum
    expected = (A[None] * z[:, None, None, :]).sum(-1) + B[None]
    torch.testing.assert_close(s, expected, **TOL[dtype])
    torch.testing.assert_close(maso(A, B, z), expected.max(-1).values, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_eq1_equals_eq2_with_hard_vq(dtype):
    A, B, z = rand_params(6, 5, 4, 200, dtype, bias_scale=2.0)
    T = hard_vq(A, B, z)
    out = maso(A, B, z)
    assert out.shape == (200, 6)
    torch.testing.assert_close(apply_vq(A, B, z, T), out, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_vq_is_one_hot_and_matches_codes(dtype):
    A, B, z = rand_params(5, 4, 3, 300, dtype)
    T = hard_vq(A, B, z)
    assert T.dtype == dtype and T.shape == (300, 5, 4)
    assert bool(((T == 0) | (T == 1)).all())
    assert bool((T.sum(-1) == 1).all())
    codes = vq_codes(A, B, z)
    assert codes.dtype == torch.long and codes.shape == (300, 5)
    assert torch.equal(T.argmax(-1), codes)
    # the selected region attains the max of Eq. (1)
    s = scores(A, B, z)
    assert torch.equal(s.gather(-1, codes[..., None])[..., 0], s.max(-1).values)
    # every region is used by some input for at least one unit (nontrivial partition)
    assert len(torch.unique(codes)) == 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_region_affine_reproduces_maso(dtype):
    """Eq. (15)-(16): output = A[T] z + B[T]."""
    A, B, z = rand_params(4, 3, 6, 50, dtype, bias_scale=0.5)
    T = hard_vq(A, B, z)
    AT, BT = region_affine(A, B, T)
    assert AT.shape == (50, 4, 6) and BT.shape == (50, 4)
    out = torch.einsum("nkd,nd->nk", AT, z) + BT
    torch.testing.assert_close(out, maso(A, B, z), **TOL[dtype])
    # rows of A[T] are the selected slopes
    codes = vq_codes(A, B, z)
    assert torch.equal(AT, A[torch.arange(4)[None, :], codes])
    # unbatched T
    AT1, BT1 = region_affine(A, B, T[3])
    assert AT1.shape == (4, 6) and BT1.shape == (4,)
    torch.testing.assert_close(AT1 @ z[3] + BT1, maso(A, B, z[3]), **TOL[dtype])


def test_ties_go_to_lowest_index():
    A = torch.zeros(2, 4, 3, dtype=torch.float64)
    B = torch.zeros(2, 4, dtype=torch.float64)
    B[1] = torch.tensor([-1.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    z = torch.randn(5, 3, dtype=torch.float64)
    codes = vq_codes(A, B, z)
    assert torch.equal(codes[:, 0], torch.zeros(5, dtype=torch.long))
    assert torch.equal(codes[:, 1], torch.ones(5, dtype=torch.long))
    T = hard_vq(A, B, z)
    assert torch.equal(
        T[:, 1], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64).expand(5, 4)
    )
    # duplicated pieces (e.g. ReLU written as [w, 0, w]) -> first copy wins
    w = torch.tensor([1.0, -2.0, 0.5])
    A2 = torch.stack([torch.zeros(3), w, w])[None]
    B2 = torch.zeros(1, 3)
    z2 = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    assert vq_codes(A2, B2, z2)[:, 0].tolist() == [1, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_input(dtype):
    A, B, z = rand_params(3, 4, 5, 6, dtype)
    for n in range(6):
        assert maso(A, B, z[n]).shape == (3,)
        torch.testing.assert_close(maso(A, B, z[n]), maso(A, B, z)[n], **TOL[dtype])
        assert torch.equal(hard_vq(A, B, z[n]), hard_vq(A, B, z)[n])
        assert torch.equal(vq_codes(A, B, z[n]), vq_codes(A, B, z)[n])
        assert scores(A, B, z[n]).shape == (3, 4)
        T = hard_vq(A, B, z[n])
        torch.testing.assert_close(
            apply_vq(A, B, z[n], T), maso(A, B, z[n]), **TOL[dtype]
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_vq_with_soft_and_broadcast_T(dtype):
    A, B, z = rand_params(4, 3, 5, 20, dtype)
    s = scores(A, B, z)
    T = torch.softmax(s, dim=-1)  # a soft VQ (Eq. (6))
    out = apply_vq(A, B, z, T)
    torch.testing.assert_close(out, (T * s).sum(-1), **TOL[dtype])
    # Eq. (15)-(16) also hold for soft T (linearity)
    AT, BT = region_affine(A, B, T)
    torch.testing.assert_close(
        out, torch.einsum("nkd,nd->nk", AT, z) + BT, **TOL[dtype]
    )
    # a soft VQ gives at most the hard output (convex combination of the pieces)
    assert bool((out <= maso(A, B, z) + 1e-6).all())
    assert bool((out < maso(A, B, z) - 1e-3).any())
    # one (K, R) matrix broadcast over the batch; bool one-hot accepted
    Tk = torch.zeros(4, 3, dtype=torch.bool)
    Tk[:, 2] = True
    torch.testing.assert_close(apply_vq(A, B, z, Tk), s[..., 2], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_proposition_1_kmeans(dtype):
    """With B = -1/2 ||A||^2 the MASO VQ is nearest-centroid assignment."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 4, 3, generator=g, dtype=dtype)
    z = 1.5 * torch.randn(4000, 3, generator=g, dtype=dtype)
    B = kmeans_offsets(A)
    torch.testing.assert_close(
        B, -0.5 * torch.linalg.vector_norm(A, dim=-1) ** 2, **TOL[dtype]
    )
    codes = vq_codes(A, B, z)
    nc = nearest_centroid(A, z)
    assert nc.shape == (4000, 5) and nc.dtype == torch.long
    mismatch = codes != nc
    if dtype == torch.float64:
        assert not bool(mismatch.any())
    else:
        # float32: only rounding-level near-ties may disagree
        d2 = ((z[:, None, None] - A[None]) ** 2).sum(-1).double()
        gap = (d2.gather(-1, codes[..., None]) - d2.gather(-1, nc[..., None]))[..., 0]
        assert int(mismatch.sum()) <= 5
        assert bool((gap[mismatch].abs() < 1e-4).all())
    # all centroids used: the test is not trivially passing
    assert len(torch.unique(nc)) == 4
    assert nearest_centroid(A, z[0]).shape == (5,)


def test_kmeans_without_offsets_differs():
    """Prop. 1 needs its offsets: with B = 0 the VQ is not nearest-centroid."""
    g = torch.Generator().manual_seed(2)
    A = (
        torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
        * torch.tensor([0.2, 1.0, 2.0, 3.0])[:, None].double()
    )
    z = torch.randn(1000, 2, generator=g, dtype=torch.float64)
    B = torch.zeros(3, 4, dtype=torch.float64)
    assert bool((vq_codes(A, B, z) != nearest_centroid(A, z)).any())


def _bad_inputs():
    A, B, z = rand_params(3, 4, 5, 2, torch.float32)
    nan_z = z.clone()
    nan_z[0, 1] = float("nan")
    inf_z = z.clone()
    inf_z[1, 0] = float("inf")
    return [
        (
            "A ndim",
            lambda: maso(A[0], B, z),
            ValueError,
            r"A must have shape \(K, R, D\)",
        ),
        (
            "B shape",
            lambda: maso(A, B[:, :3], z),
            ValueError,
            r"B must have shape \(K, R\) = \(3, 4\)",
        ),
        ("B ndim", lambda: maso(A, B[0], z), ValueError, r"B must have shape \(K, R\)"),
        ("z dim", lambda: maso(A, B, z[:, :4]), ValueError, r"last dimension 4.*D = 5"),
        (
            "z ndim",
            lambda: maso(A, B, z[None]),
            ValueError,
            r"z must have shape \(N, D\) or \(D,\)",
        ),
        ("R = 0", lambda: maso(A[:, :0], B[:, :0], z), ValueError, r"R = 0 regions"),
        ("K = 0", lambda: maso(A[:0], B[:0], z), ValueError, r"K = 0 units"),
        ("nan", lambda: maso(A, B, nan_z), ValueError, r"NaN"),
        ("inf", lambda: hard_vq(A, B, inf_z), ValueError, r"NaN or inf"),
        (
            "dtype z",
            lambda: maso(A, B, z.double()),
            ValueError,
            r"dtype mismatch: z is torch.float64",
        ),
        (
            "dtype B",
            lambda: maso(A, B.double(), z),
            ValueError,
            r"dtype mismatch: A is torch.float32 but B is torch.float64",
        ),
        (
            "int z",
            lambda: maso(A, B, z.long()),
            ValueError,
            r"z must be floating point",
        ),
        (
            "int A",
            lambda: maso(A.long(), B.long(), z),
            ValueError,
            r"A must be floating point",
        ),
        (
            "T shape",
            lambda: apply_vq(A, B, z, torch.ones(2, 3, 3)),
            ValueError,
            r"T must have shape .*\(3, 4\).*got \(2, 3, 3\)",
        ),
        (
            "T batch",
            lambda: apply_vq(A, B, z, torch.ones(5, 3, 4)),
            ValueError,
            r"T has batch size 5",
        ),
        (
            "T dtype",
            lambda: apply_vq(A, B, z, torch.ones(2, 3, 4, dtype=torch.float64)),
            ValueError,
            r"dtype mismatch: T",
        ),
        (
            "T region_affine",
            lambda: region_affine(A, B, torch.ones(3, 5)),
            ValueError,
            r"T must have shape",
        ),
        (
            "not tensor",
            lambda: maso(A.numpy(), B, z),
            TypeError,
            r"A must be a torch.Tensor",
        ),
        (
            "not tensor z",
            lambda: maso(A, B, [1.0] * 5),
            TypeError,
            r"z must be a torch.Tensor",
        ),
    ]


@pytest.mark.parametrize(
    "name,fn,exc,match", _bad_inputs(), ids=[c[0] for c in _bad_inputs()]
)
def test_bad_inputs(name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.cuda
def test_cuda_matches_cpu():
    A, B, z = rand_params(4, 3, 5, 100, torch.float64)
    out = maso(A.cuda(), B.cuda(), z.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), maso(A, B, z))
    assert torch.equal(hard_vq(A.cuda(), B.cuda(), z.cuda()).cpu(), hard_vq(A, B, z))
    with pytest.raises(ValueError, match="device mismatch"):
        maso(A.cuda(), B.cuda(), z)
