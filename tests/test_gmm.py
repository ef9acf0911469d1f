"""Tests for smaso.gmm: Eq. (3), (4), (6), Theorem 2, Proposition 1, Appendix C."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smaso.gmm import (
    calibration_error,
    log_joint,
    map_vq,
    monte_carlo_prior,
    posterior,
    region_prior,
    relu_prior,
    sigma2_from_beta,
    tanh_to_sigmoid,
)
from smaso.maso import hard_vq, kmeans_offsets, nearest_centroid, scores, vq_codes
from smaso.vq import beta_vq

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
    """T1 == T2 except where the top two MASO scores are within tol (rounding ties)."""
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
    """With a uniform prior instead (the K-means GMM), MAP != MASO VQ for any B."""
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
    """As sigma2 -> 0 with the prior held fixed, the GMM MAP becomes K-means (the
    partition of Prop. 1)."""
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


SIGMA2S = [4.0, 1.0, 0.25, 0.01, 1e-4]


def _rounding(sigma2):
    """Tolerance for posteriors from Gaussian densities: the log-densities carry
    rounding ~ u ||z - A||^2 / sigma2, amplified as sigma2 -> 0."""
    return 1e-12 / min(sigma2, 1.0)


def _bayes_posterior(A, B, z, sigma2):
    """Bayes' rule with torch.distributions: N(z; A_kr, sigma2 I) times the scaled prior
    written out as exp((B + |A|^2 / 2) / sigma2), normalised over r by hand."""
    D = A.shape[-1]
    cov = sigma2 * torch.eye(D, dtype=A.dtype)
    log_lik = torch.distributions.MultivariateNormal(A, cov).log_prob(z[:, None, None])
    log_w = (B + 0.5 * (A**2).sum(-1)) / sigma2
    log_prior = log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)
    return torch.softmax(log_lik + log_prior, dim=-1)


@pytest.mark.parametrize("sigma2", SIGMA2S)
def test_scaled_prior_theorem2_holds_for_every_sigma2(sigma2):
    """Prior ~ exp((B + |A|^2/2) / sigma2): MAP = MASO VQ and posterior =
    softmax(scores / sigma2) at every sigma2, against Bayes' rule computed
    independently."""
    A, B, z = rand_params(3, 4, 5, 400, torch.float64, seed=11, bias_scale=2.0)
    post = posterior(A, B, z, sigma2, scaled_prior=True)
    tol = _rounding(sigma2)
    torch.testing.assert_close(
        post, _bayes_posterior(A, B, z, sigma2), atol=tol, rtol=0
    )
    torch.testing.assert_close(
        post, torch.softmax(scores(A, B, z) / sigma2, -1), atol=tol, rtol=0
    )
    assert torch.equal(map_vq(A, B, z, sigma2, scaled_prior=True), hard_vq(A, B, z))
    w = torch.exp((B + 0.5 * (A**2).sum(-1)) / sigma2)
    if sigma2 >= 0.25:  # the written-out prior does not overflow
        torch.testing.assert_close(
            region_prior(A, B, sigma2), w / w.sum(-1, keepdim=True), atol=1e-12, rtol=0
        )
    # the prior held at its sigma2 = 1 value gives another MAP rule (unless sigma2 = 1)
    fixed = map_vq(A, B, z, sigma2)
    assert torch.equal(fixed, hard_vq(A, B, z)) == (sigma2 == 1.0)


def test_scaled_prior_posterior_tends_to_hard_vq():
    """T_S -> T_H as sigma2 -> 0, at the rate 2 (R - 1) exp(-gap / sigma2)."""
    A, B, z = rand_params(4, 5, 3, 2000, torch.float64, seed=12, bias_scale=2.0)
    top2 = scores(A, B, z).topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    away = gap > 0.05
    T_H = hard_vq(A, B, z)
    errs = []
    for sigma2 in (1.0, 0.1, 0.01, 1e-3):
        err = (posterior(A, B, z, sigma2, scaled_prior=True) - T_H).abs().sum(-1)
        assert bool((err <= 2 * 4 * torch.exp(-gap / sigma2) + _rounding(sigma2)).all())
        errs.append(err[away].max().item())
    assert errs == sorted(errs, reverse=True) and errs[0] > 0.1 and errs[-1] < 1e-12


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.75, 0.99])
def test_beta_vq_is_the_posterior_at_sigma2_from_beta(beta):
    A, B, z = rand_params(3, 4, 5, 300, torch.float64, seed=13, bias_scale=2.0)
    sigma2 = float(sigma2_from_beta(beta))
    assert abs(sigma2 - (1 - beta) / beta) < 1e-12
    torch.testing.assert_close(
        posterior(A, B, z, sigma2, scaled_prior=True),
        beta_vq(A, B, z, beta),
        atol=_rounding(sigma2),
        rtol=0,
    )


def test_sigma2_from_beta_ends():
    s = sigma2_from_beta(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert s.tolist() == [math.inf, 1.0, 0.0]
    with pytest.raises(ValueError, match="beta"):
        sigma2_from_beta(1.5)


def test_tanh_network_is_a_sigmoid_network():
    """Appendix E.6 at network level: tanh net (W, b, W', b') = sigmoid net (2W, 2b,
    2W', b' - W' 1), checked against torch's own Tanh and Sigmoid modules."""
    g = torch.Generator().manual_seed(14)
    for D, H, C in ((5, 7, 3), (1, 1, 1), (16, 32, 10)):
        tanh_net = torch.nn.Sequential(
            torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)
        ).double()
        with torch.no_grad():
            for p in tanh_net.parameters():
                p.normal_(std=1.0, generator=g)
        W, b, W2, b2 = (p.detach() for p in tanh_net.parameters())
        sig_net = torch.nn.Sequential(
            torch.nn.Linear(D, H), torch.nn.Sigmoid(), torch.nn.Linear(H, C)
        ).double()
        with torch.no_grad():
            for p, v in zip(
                sig_net.parameters(), tanh_to_sigmoid(W, b, W2, b2), strict=True
            ):
                p.copy_(v)
        x = 2 * torch.randn(200, D, generator=g, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(sig_net(x), tanh_net(x), atol=1e-12, rtol=0)
            # the sigmoid layer is the soft DN layer of Prop. 5: the posterior of the
            # active region of the ReLU MASO with slopes (2W, 0), offsets (2b, 0)
            A = torch.stack([2 * W, torch.zeros_like(W)], dim=1)
            Bm = torch.stack([2 * b, torch.zeros_like(b)], dim=1)
            hidden = posterior(A, Bm, x)[..., 0]
            torch.testing.assert_close(
                hidden @ (2 * W2).T + b2 - W2.sum(1), tanh_net(x), atol=1e-12, rtol=0
            )
            # the paper's version (2W, b, 2W', b' - 1) is a different network
            paper = torch.sigmoid(x @ (2 * W).T + b) @ (2 * W2).T + b2 - 1
            if H > 1:
                assert (paper - tanh_net(x)).abs().max() > 0.1


def test_tanh_to_sigmoid_errors():
    W, b = torch.randn(3, 2), torch.randn(3)
    with pytest.raises(ValueError, match="do not chain"):
        tanh_to_sigmoid(W, b, torch.randn(4, 2), torch.randn(4))
    with pytest.raises(ValueError, match="2 dims"):
        tanh_to_sigmoid(b, b, W.T, torch.randn(2))
    with pytest.raises(TypeError, match="must be a torch"):
        tanh_to_sigmoid(W, b, W.T.numpy(), torch.randn(2))


def test_calibration_error_against_a_loop():
    g = torch.Generator().manual_seed(15)
    conf = torch.rand(500, generator=g, dtype=torch.float64)
    conf[:5] = torch.tensor([0.0, 1.0, 0.1, 0.5, 0.3], dtype=torch.float64)
    correct = torch.rand(500, generator=g, dtype=torch.float64) < conf
    for n_bins in (1, 5, 10):
        expected = 0.0
        for i in range(n_bins):
            lo, hi = i / n_bins, (i + 1) / n_bins
            members = [
                j
                for j, c in enumerate(conf.tolist())
                if (lo < c <= hi) or (i == 0 and c == 0.0)
            ]
            if members:
                acc = sum(bool(correct[j]) for j in members) / len(members)
                mean_conf = sum(conf[j].item() for j in members) / len(members)
                expected += len(members) / 500 * abs(acc - mean_conf)
        assert abs(calibration_error(conf, correct, n_bins).item() - expected) < 1e-12
    # a hard code states confidence 1 everywhere: its ECE is the error rate
    hard = torch.ones(500, dtype=torch.float64)
    assert (
        abs(calibration_error(hard, correct).item() - (~correct).double().mean())
        < 1e-12
    )
    with pytest.raises(ValueError, match="lie in"):
        calibration_error(conf + 1, correct)
    with pytest.raises(ValueError, match="same shape"):
        calibration_error(conf, correct[:3])
