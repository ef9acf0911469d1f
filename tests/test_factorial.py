"""Tests for smaso.factorial: the factorial model Eq. (10), Theorem 4, Corollary 1 / Eq.
(12)."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smaso.factorial import (
    configurations,
    coupling,
    disagreement,
    factorised_map,
    joint_log_posterior,
    joint_map,
    joint_marginals,
    joint_posterior,
    mutual_coherence,
    product_posterior,
    sample_factorial,
)
from smaso.gmm import posterior, region_prior
from smaso.maso import vq_codes

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def orthogonal_slopes(K, R, D, seed=0, zero_region=False):
    """Slopes satisfying Eq. (11): unit k's R slopes span a private block of a random
    rotation."""
    assert D % K == 0
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    b = D // K
    A = torch.stack(
        [
            2 * torch.randn(R, b, generator=g, dtype=F64) @ Q[k * b : (k + 1) * b]
            for k in range(K)
        ]
    )
    if zero_region:  # ReLU-like: the last region has slope 0
        A[:, -1] = 0
    B = torch.randn(K, R, generator=g, dtype=F64)
    return A, B


def test_configurations_order_and_guard():
    t = configurations(3, 2)
    assert t.dtype == torch.long and t.shape == (8, 3)
    assert t.tolist() == [list(c) for c in itertools.product(range(2), repeat=3)]
    assert configurations(1, 4).tolist() == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="max_configs"):
        configurations(21, 2)  # 2**21 > 2**20
    with pytest.raises(ValueError, match="max_configs"):
        configurations(4, 3, max_configs=80)
    with pytest.raises(ValueError, match="K must be a positive int"):
        configurations(0, 3)


def test_joint_posterior_matches_explicit_gaussian_mixture():
    """Eq. (10) evaluated by hand, one configuration at a time."""
    g = torch.Generator().manual_seed(3)
    K, R, D, sigma2 = 2, 3, 4, 0.7
    A = torch.randn(K, R, D, generator=g, dtype=F64)
    B = torch.randn(K, R, generator=g, dtype=F64)
    z = torch.randn(5, D, generator=g, dtype=F64)
    pi = region_prior(A, B)
    logs = []
    for t in itertools.product(range(R), repeat=K):
        mu = sum(A[k, t[k]] for k in range(K))
        log_lik = -0.5 * D * math.log(2 * math.pi * sigma2) - ((z - mu) ** 2).sum(
            -1
        ) / (2 * sigma2)
        logs.append(log_lik + sum(math.log(pi[k, t[k]]) for k in range(K)))
    expected = torch.softmax(torch.stack(logs, dim=-1), dim=-1)
    got = joint_posterior(A, B, z, sigma2)
    assert torch.allclose(got, expected, rtol=0, atol=1e-13)
    assert torch.allclose(
        joint_posterior(A, B, z[0], sigma2), expected[0], rtol=0, atol=1e-13
    )


@pytest.mark.parametrize("sigma2", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("zero_region", [False, True])
def test_theorem4_orthogonal_slopes_factorise(sigma2, zero_region):
    K, R, D = 4, 3, 12
    A, B = orthogonal_slopes(K, R, D, seed=1, zero_region=zero_region)
    assert mutual_coherence(A) < 1e-12
    z, _ = sample_factorial(
        A, B, 500, sigma2, generator=torch.Generator().manual_seed(2)
    )
    P = joint_posterior(A, B, z, sigma2)
    per_unit = posterior(A, B, z, sigma2)
    assert torch.allclose(
        P, product_posterior(per_unit), rtol=0, atol=1e-12
    )  # Theorem 4
    assert torch.allclose(joint_marginals(P, K, R), per_unit, rtol=0, atol=1e-12)
    jm = joint_map(A, B, z, sigma2)
    assert torch.equal(jm, factorised_map(A, B, z, sigma2))  # Corollary 1, Eq. (12)
    if sigma2 == 1.0:
        assert torch.equal(jm, vq_codes(A, B, z))  # ... = the MASO hard VQ (Theorem 2)
    d = disagreement(A, B, z, sigma2)
    assert (
        d["map_mismatch"] == 0
        and max(d["tv_factorised"], d["tv_marginals"], d["coupling"]) < 1e-10
    )


@settings(max_examples=15, deadline=None)
@given(K=st.integers(1, 3), R=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_theorem4_property(K, R, seed):
    A, B = orthogonal_slopes(K, R, 2 * K, seed=seed)
    z = 2 * torch.randn(
        50, 2 * K, generator=torch.Generator().manual_seed(seed), dtype=F64
    )
    P = joint_posterior(A, B, z)
    assert torch.allclose(P, product_posterior(posterior(A, B, z)), rtol=0, atol=1e-11)


def test_non_orthogonal_slopes_do_not_factorise():
    K, R, D = 4, 3, 12
    A, B = orthogonal_slopes(K, R, D, seed=1)
    A = 0.5 * (
        A + torch.randn(K, R, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    )
    z, _ = sample_factorial(A, B, 500, generator=torch.Generator().manual_seed(2))
    d = disagreement(A, B, z)
    assert d["coherence"] > 0.1 and d["coupling"] > 0.1
    assert (
        d["map_mismatch"] > 0.05
        and d["tv_factorised"] > 0.05
        and d["tv_marginals"] > 0.01
    )
    assert not torch.equal(joint_map(A, B, z), vq_codes(A, B, z))


def test_eq11_is_sufficient_not_necessary():
    """A component shared by every slope makes the cross Gram blocks additive: the VQs
    stay independent given z although the coherence is large. If the shared part is
    orthogonal to the rest, the cross term is a constant and the factors are exactly the
    per-unit posteriors."""
    K, R, D = 3, 3, 12
    A, B = orthogonal_slopes(K, R, 9, seed=4)
    A = torch.cat([A, torch.zeros(K, R, 3, dtype=F64)], dim=-1)
    g = torch.Generator().manual_seed(6)
    z = 2 * torch.randn(300, D, generator=g, dtype=F64)
    v_perp = torch.zeros(D, dtype=F64)
    v_perp[9:] = torch.randn(3, generator=g, dtype=F64)
    d = disagreement(A + v_perp, B, z)
    assert d["coherence"] > 0.2 and d["coupling"] < 1e-10
    assert max(d["tv_marginals"], d["tv_factorised"]) < 1e-10 and d["map_mismatch"] == 0
    v = torch.randn(D, generator=g, dtype=F64)  # not orthogonal to the slopes
    d = disagreement(A + v, B, z)
    assert d["coupling"] < 1e-10 and d["tv_marginals"] < 1e-10  # still independent ...
    assert d["tv_factorised"] > 0.01  # ... but not the per-unit GMM posteriors


def test_coupled_prior_breaks_theorem4():
    """Theorem 4 needs a factorised prior: with a prior that couples the units it
    fails."""
    K, R = 2, 2
    A, B = orthogonal_slopes(K, R, 4, seed=2)
    z = torch.randn(100, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = configurations(K, R)
    log_prior = torch.where(t[:, 0] == t[:, 1], 0.0, -3.0).to(
        F64
    )  # units prefer to agree
    P = joint_posterior(A, B, z, log_prior=log_prior)
    Pm = product_posterior(joint_marginals(P, K, R))
    assert 0.5 * (P - Pm).abs().sum(-1).mean() > 0.01
    # a product prior passed explicitly gives back the default
    lp = torch.log(region_prior(A, B))
    prod = lp[0, t[:, 0]] + lp[1, t[:, 1]]
    assert torch.allclose(
        joint_posterior(A, B, z, log_prior=prod + 7.0),
        joint_posterior(A, B, z),
        atol=1e-14,
        rtol=0,
    )


def test_joint_map_chunks_agree_with_posterior_argmax():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(
        6, 4, 5, generator=g, dtype=F64
    )  # 4096 configurations -> chunks of 1024 inputs
    B = torch.randn(6, 4, generator=g, dtype=F64)
    z = torch.randn(1100, 5, generator=g, dtype=F64)
    t = configurations(6, 4)
    sel = torch.cat([torch.arange(100), torch.arange(1000, 1100)])  # both chunks
    expected = t[joint_log_posterior(A, B, z[sel]).argmax(-1)]
    assert torch.equal(joint_map(A, B, z)[sel], expected)
    assert torch.equal(joint_map(A, B, z[3]), expected[3])


def test_marginals_and_products_small_case():
    Q = torch.tensor([[[0.2, 0.8], [0.6, 0.4]]], dtype=F64)  # N=1, K=2, R=2
    P = product_posterior(Q)
    assert torch.allclose(P, torch.tensor([[0.12, 0.08, 0.48, 0.32]], dtype=F64))
    assert torch.allclose(joint_marginals(P, 2, 2), Q)
    assert torch.allclose(product_posterior(Q[0]), P[0])
    with pytest.raises(ValueError, match="R\\*\\*K"):
        joint_marginals(P, 3, 2)


def test_mutual_coherence_and_coupling_hand_cases():
    A = torch.tensor(
        [[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]], dtype=F64
    )  # ReLU-like, zero slopes
    assert math.isclose(mutual_coherence(A).item(), 1 / math.sqrt(2), rel_tol=1e-12)
    # cross block G = [[1, 0], [0, 0]]: double-centred [[.25, -.25], [-.25, .25]], norm
    # 0.5
    C = coupling(A)
    assert torch.allclose(C, torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=F64))
    assert mutual_coherence(A[:1]).item() == 0.0
    with pytest.raises(ValueError, match="K, R, D"):
        mutual_coherence(A[0])


def test_sample_factorial_reproducible_and_prior():
    A, B = orthogonal_slopes(2, 3, 4, seed=0)
    z1, t1 = sample_factorial(
        A, B, 20000, 0.5, generator=torch.Generator().manual_seed(0)
    )
    z2, t2 = sample_factorial(
        A, B, 20000, 0.5, generator=torch.Generator().manual_seed(0)
    )
    assert (
        torch.equal(z1, z2)
        and torch.equal(t1, t2)
        and z1.shape == (20000, 4)
        and t1.shape == (20000, 2)
    )
    freq = (
        torch.stack([torch.bincount(t1[:, k], minlength=3) for k in range(2)]).double()
        / 20000
    )
    assert torch.allclose(freq, region_prior(A, B), atol=0.02)
    resid = z1 - A[0, t1[:, 0]] - A[1, t1[:, 1]]
    assert abs(resid.var().item() - 0.5) < 0.03


def test_bad_inputs():
    A, B = orthogonal_slopes(2, 2, 4)
    z = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="last dimension"):
        joint_posterior(A, B, z[:, :3])
    with pytest.raises(ValueError, match="sigma2"):
        joint_posterior(A, B, z, sigma2=0.0)
    with pytest.raises(ValueError, match="log_prior must have shape"):
        joint_posterior(A, B, z, log_prior=torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="zero probability"):
        joint_posterior(A, B, z, log_prior=torch.full((4,), -math.inf, dtype=F64))
    with pytest.raises(ValueError, match="max_configs"):
        joint_map(A, B, z, max_configs=3)
    with pytest.raises(ValueError, match="n must be"):
        sample_factorial(A, B, 0)
    with pytest.raises(TypeError, match="generator"):
        sample_factorial(A, B, 3, generator=0)
    with pytest.raises(TypeError, match="Q must be"):
        product_posterior([[0.5, 0.5]])
