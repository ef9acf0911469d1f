"""Tests for smaso.gmm: Eq. (3), (4), (6), Theorem 2, Proposition 1, Appendix C."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smaso.gmm import (
    log_joint,
    map_vq,
    monte_carlo_prior,
    posterior,
    region_prior,
    relu_prior,
)
from smaso.maso import hard_vq, kmeans_offsets, nearest_centroid, scores, vq_codes

DTYPES = [torch.float32, torch.float64]
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}
ACTIVE = math.exp(0.5) / (1 + math.exp(0.5))  # 0.6225


def rand_params(
    K, R, D, N, dtype, seed=0, slope_scale=1.0, bias_scale=1.0, z_scale=1.0
):
    g = torch.Generator().manual_seed(seed)
    A = slope_scale * torch.randn(K, R, D, generator=g, dtype=torch.float64)
    B = bias_scale * torch.randn(K, R, generator=g, dtype=torch.float64)
    z = z_scale * torch.randn(N, D, generator=g, dtype=torch.float64)
    return A.to(dtype), B.to(dtype), z.to(dtype)


def assert_same_vq_up_to_near_ties(T1, T2, A, B, z, tol):
    """T1 == T2 except where the top two MASO scores are within tol (rounding-level ties)."""
    diff = (T1 != T2).any(-1)
    if bool(diff.any()):
        top2 = scores(A, B, z).double().topk(2, dim=-1).values
        gap = top2[..., 0] - top2[..., 1]
        assert bool((gap[diff] < tol).all()), gap[diff]
        assert int(diff.sum()) <= max(1, diff.numel() // 1000)


@pytest.mark.parametrize("dtype", DTYPES)
def test_theorem2_map_equals_hard_vq_arbitrary_biases(dtype):
    A, B, z = rand_params(
        4, 5, 6, 3000, dtype, seed=1, slope_scale=1.5, bias_scale=3.0, z_scale=2.0
    )
    T_map = map_vq(A, B, z)
    T_h = hard_vq(A, B, z)
    assert T_map.shape == (3000, 4, 5) and T_map.dtype == dtype
    assert bool((T_map.sum(-1) == 1).all())
    if dtype == torch.float64:
        assert torch.equal(T_map, T_h)
    else:
        assert_same_vq_up_to_near_ties(T_map, T_h, A, B, z, tol=1e-4)
    # the partition is non-trivial: several regions are used
    assert len(torch.unique(T_h.argmax(-1))) == 5


def test_theorem2_needs_its_prior():
    """With a uniform prior instead (the K-means GMM), MAP != MASO VQ for arbitrary B."""
    A, B, z = rand_params(3, 4, 2, 2000, torch.float64, seed=2, bias_scale=3.0)
    uniform = torch.softmax(torch.zeros(3, 4, dtype=torch.float64), -1)
    sq = ((z[:, None, None] - A[None]) ** 2).sum(-1)
    map_uniform = (-0.5 * sq + uniform.log()).argmax(-1)
    assert bool((map_uniform != vq_codes(A, B, z)).any())


@pytest.mark.parametrize("dtype", DTYPES)
def test_posterior_is_soft_vq_at_unit_variance(dtype):
    """p(t = r | z) at sigma2 = 1 is the SVQ of Eq. (6): softmax_r(<A, z> + B)."""
    A, B, z = rand_params(3, 4, 5, 500, dtype, seed=3, bias_scale=2.0)
    post = posterior(A, B, z)
    torch.testing.assert_close(post, torch.softmax(scores(A, B, z), -1), **TOL[dtype])
    torch.testing.assert_close(
        post.sum(-1), torch.ones(500, 3, dtype=dtype), **TOL[dtype]
    )
    # unbatched
    torch.testing.assert_close(posterior(A, B, z[7]), post[7], **TOL[dtype])
    assert log_joint(A, B, z[7]).shape == (3, 4)


def test_log_joint_is_the_gaussian_density():
    A, B, z = rand_params(2, 3, 4, 10, torch.float64, seed=4)
    sigma2 = 0.7
    lj = log_joint(A, B, z, sigma2)
    mvn = torch.distributions.MultivariateNormal(
        A, covariance_matrix=sigma2 * torch.eye(4, dtype=torch.float64)
    )
    expected = mvn.log_prob(z[:, None, None, :]) + region_prior(A, B).log()
    torch.testing.assert_close(lj, expected, atol=1e-12, rtol=1e-12)
    # general sigma2: posterior = softmax((<A, z> - ||A||^2 / 2) / sigma2 + B + ||A||^2
    # / 2), not the SVQ
    half = 0.5 * (A**2).sum(-1)
    logits = (torch.einsum("krd,nd->nkr", A, z) - half) / sigma2 + B + half
    torch.testing.assert_close(
        posterior(A, B, z, sigma2), torch.softmax(logits, -1), atol=1e-12, rtol=1e-12
    )
    assert not torch.allclose(
        posterior(A, B, z, sigma2), torch.softmax(scores(A, B, z), -1)
    )


def test_small_variance_map_is_nearest_centroid():
    """As sigma2 -> 0 with the prior held fixed, the GMM MAP becomes K-means (Prop. 1 partition)."""
    A, B, z = rand_params(3, 4, 3, 1000, torch.float64, seed=5, bias_scale=3.0)
    codes = map_vq(A, B, z, sigma2=1e-6).argmax(-1)
    assert torch.equal(codes, nearest_centroid(A, z))


@pytest.mark.parametrize("dtype", DTYPES)
def test_region_prior(dtype):
    A, B, _ = rand_params(5, 3, 4, 1, dtype, seed=6, bias_scale=2.0)
    pi = region_prior(A, B)
    assert pi.shape == (5, 3) and pi.dtype == dtype
    assert bool((pi > 0).all())
    torch.testing.assert_close(pi.sum(-1), torch.ones(5, dtype=dtype), **TOL[dtype])
    w = torch.exp(B + 0.5 * (A**2).sum(-1))
    torch.testing.assert_close(pi, w / w.sum(-1, keepdim=True), **TOL[dtype])
    # Proposition 1 special case: K-means offsets give a uniform prior
    torch.testing.assert_close(
        region_prior(A, kmeans_offsets(A)),
        torch.full((5, 3), 1 / 3, dtype=dtype),
        **TOL[dtype],
    )


def test_relu_prior():
    torch.testing.assert_close(
        relu_prior(1.0), torch.tensor([0.6225, 0.3775]), atol=1e-4, rtol=0
    )
    assert abs(float(relu_prior(1.0)[0]) - ACTIVE) < 1e-7
    torch.testing.assert_close(relu_prior(torch.tensor(0.0)), torch.tensor([0.5, 0.5]))
    n2 = torch.tensor([[0.0, 0.3], [2.0, 50.0]], dtype=torch.float64)
    p = relu_prior(n2)
    assert p.shape == (2, 2, 2)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, dtype=torch.float64))
    assert bool((p[..., 0] >= 0.5).all())  # the active region never gets less mass
    # agrees with region_prior of the ReLU MASO (A = [w, 0], B = 0)
    w = torch.randn(6, 4, dtype=torch.float64)
    A = torch.stack([w, torch.zeros_like(w)], 1)
    torch.testing.assert_close(
        relu_prior((w**2).sum(-1)),
        region_prior(A, torch.zeros(6, 2, dtype=torch.float64)),
        atol=1e-12,
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="nonnegative"):
        relu_prior(-1.0)


def test_monte_carlo_prior_abs_is_exactly_uniform():
    g = torch.Generator().manual_seed(0)
    for init in (
        "xavier_normal",
        "xavier_uniform",
        "kaiming_uniform_torch_default",
        0.3,
    ):
        pi = monte_carlo_prior(init, "abs", 16, 8, 5, g, dtype=torch.float64)
        assert pi.shape == (40, 2)
        torch.testing.assert_close(
            pi, torch.full((40, 2), 0.5, dtype=torch.float64), atol=1e-12, rtol=0
        )


def test_monte_carlo_prior_relu_xavier():
    g = torch.Generator().manual_seed(0)
    pi = monte_carlo_prior("xavier_normal", "relu", 64, 64, 20, g, dtype=torch.float64)
    assert pi.shape == (1280, 2)
    assert abs(float(pi[:, 0].mean()) - ACTIVE) < 0.01  # the ACTIVE region gets ~0.62
    assert bool((pi[:, 0] > 0.5).all())
    pi_u = monte_carlo_prior(
        "xavier_uniform", "relu", 64, 64, 20, g, dtype=torch.float64
    )
    assert abs(float(pi_u[:, 0].mean()) - ACTIVE) < 0.01
    # fan_in != fan_out: fan_in * v^2 = 2 fan_in / (fan_in + fan_out) = 0.5, prior ~
    # sigmoid(1/4)
    pi_r = monte_carlo_prior(
        "xavier_normal", "relu", 32, 96, 10, g, dtype=torch.float64
    )
    assert abs(float(pi_r[:, 0].mean()) - 1 / (1 + math.exp(-0.25))) < 0.01
    # PyTorch default nn.Linear init: fan_in * v^2 = 1/3
    pi_k = monte_carlo_prior(
        "kaiming_uniform_torch_default", "relu", 64, 64, 20, g, dtype=torch.float64
    )
    assert abs(float(pi_k[:, 0].mean()) - 1 / (1 + math.exp(-1 / 6))) < 0.01
    # smaller std -> closer to (0.5, 0.5), never towards the inactive state
    pi_s = monte_carlo_prior(0.01, "relu", 64, 64, 5, g, dtype=torch.float64)
    assert bool((pi_s[:, 0] > 0.5).all()) and abs(float(pi_s[:, 0].mean()) - 0.5) < 0.01


def test_monte_carlo_prior_reproducible_and_errors():
    a = monte_carlo_prior(
        "xavier_normal", "relu", 8, 4, 3, torch.Generator().manual_seed(7)
    )
    b = monte_carlo_prior(
        "xavier_normal", "relu", 8, 4, 3, torch.Generator().manual_seed(7)
    )
    c = monte_carlo_prior(
        "xavier_normal", "relu", 8, 4, 3, torch.Generator().manual_seed(8)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="init must be one of"):
        monte_carlo_prior("he", "relu", 8, 4, 3)
    with pytest.raises(ValueError, match="activation"):
        monte_carlo_prior("xavier_normal", "tanh", 8, 4, 3)
    with pytest.raises(ValueError, match="fan_in"):
        monte_carlo_prior("xavier_normal", "relu", 0, 4, 3)


def test_gmm_errors():
    A, B, z = rand_params(2, 3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="sigma2 must be a positive"):
        posterior(A, B, z, sigma2=0.0)
    with pytest.raises(ValueError, match="sigma2 must be a positive"):
        log_joint(A, B, z, sigma2=float("nan"))
    with pytest.raises(ValueError, match="last dimension"):
        map_vq(A, B, z[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        map_vq(A, B, torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="R = 0"):
        region_prior(A[:, :0], B[:, :0])


@settings(max_examples=50, deadline=None)
@given(
    K=st.integers(1, 4),
    R=st.integers(1, 6),
    D=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    slope_scale=st.floats(0.05, 5.0),
    bias_scale=st.floats(0.0, 10.0),
    double=st.booleans(),
)
def test_property_map_equals_maso_vq(K, R, D, seed, slope_scale, bias_scale, double):
    dtype = torch.float64 if double else torch.float32
    A, B, z = rand_params(
        K,
        R,
        D,
        64,
        dtype,
        seed=seed,
        slope_scale=slope_scale,
        bias_scale=bias_scale,
        z_scale=2.0,
    )
    T_map, T_h = map_vq(A, B, z), hard_vq(A, B, z)
    scale = 1 + slope_scale**2 * D + bias_scale
    tol = (1e-9 if double else 1e-3) * scale
    assert_same_vq_up_to_near_ties(T_map, T_h, A, B, z, tol)
