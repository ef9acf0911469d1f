"""Soft and β-VQ (Eq. 6–9, Proposition 2, Theorem 3) for arbitrary MASOs."""

import pytest
import torch

from smaso.gmm import posterior
from smaso.maso import hard_vq, maso, scores
from smaso.vq import (
    beta_from_eta,
    beta_maso,
    beta_softmax,
    beta_vq,
    entropy,
    eta_from_beta,
    maximise_on_simplex,
    soft_maso,
    soft_vq,
    vq_objective,
)

DT = torch.float64


def params(K=5, R=4, D=3, N=200, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, R, D, generator=g, dtype=dtype)
    B = torch.randn(K, R, generator=g, dtype=dtype)
    z = 2 * torch.randn(N, D, generator=g, dtype=dtype)
    return A, B, z


def test_soft_vq_is_eq6_and_the_gmm_posterior():
    A, B, z = params()
    T = soft_vq(A, B, z)
    assert torch.allclose(T, torch.softmax(scores(A, B, z), -1), atol=1e-15)
    assert torch.allclose(T, posterior(A, B, z), atol=1e-12)
    assert torch.allclose(T.sum(-1), torch.ones(200, 5, dtype=DT))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_closed_forms_maximise_the_entropy_penalised_objective(beta):
    """Proposition 2 (β = ½) and Theorem 3: the closed form is the optimum found
    numerically."""
    A, B, z = params(N=50)
    s = scores(A, B, z)
    T = beta_vq(A, B, z, beta)
    T_num = maximise_on_simplex(s, beta)
    assert torch.allclose(T, T_num, atol=1e-8)
    # and it beats random points of the simplex
    g = torch.Generator().manual_seed(1)
    # Dirichlet(1, ..., 1) from the seeded generator: normalised Exp(1) variables
    # (torch.distributions.Dirichlet takes no generator: it would use the global RNG)
    exp1 = -torch.log(torch.rand(50, 5, 4, dtype=DT, generator=g))
    other = exp1 / exp1.sum(-1, keepdim=True)
    assert (vq_objective(T, s, beta) >= vq_objective(other, s, beta) - 1e-12).all()


def test_eq7_and_eq8_at_half_have_the_same_maximiser():
    s = scores(*params(N=20))
    t = soft_vq(*params(N=20))
    eq7 = (t * s).sum(-1) + entropy(t)
    assert torch.allclose(vq_objective(t, s, 0.5), eq7 / 2, atol=1e-14)


def test_limits_hard_soft_linear():
    A, B, z = params()
    assert torch.equal(
        beta_vq(A, B, z, 1.0), hard_vq(A, B, z)
    )  # no ties in continuous data
    assert torch.allclose(beta_vq(A, B, z, 0.5), soft_vq(A, B, z), atol=1e-15)
    assert torch.equal(beta_vq(A, B, z, 0.0), torch.full((200, 5, 4), 0.25, dtype=DT))
    assert torch.allclose(beta_maso(A, B, z, 1.0), maso(A, B, z), atol=1e-12)
    assert torch.allclose(beta_maso(A, B, z, 0.5), soft_maso(A, B, z), atol=1e-15)
    # approaching the limits continuously
    assert torch.allclose(beta_vq(A, B, z, 1 - 1e-9), hard_vq(A, B, z), atol=1e-6)
    assert torch.allclose(beta_vq(A, B, z, 1e-12), beta_vq(A, B, z, 0.0), atol=1e-9)


def test_ties_split_evenly_at_beta_one():
    s = torch.tensor([[2.0, 2.0, -1.0], [0.0, 0.0, 0.0]], dtype=DT)
    T = beta_softmax(s, 1.0)
    assert torch.equal(
        T, torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=DT)
    )


def test_per_unit_beta():
    A, B, z = params(K=3)
    beta = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    T = beta_vq(A, B, z, beta)
    assert torch.allclose(T[:, 0], torch.full((200, 4), 0.25, dtype=DT))
    assert torch.allclose(T[:, 1], soft_vq(A, B, z)[:, 1], atol=1e-15)
    assert torch.equal(T[:, 2], hard_vq(A, B, z)[:, 2])


def test_stable_at_extreme_scores_and_beta():
    s = torch.tensor([[1e300, 0.0, -1e300], [1e-300, 0.0, 5.0]], dtype=DT)
    for beta in (0.0, 1e-300, 0.5, 1 - 1e-16, 1.0):
        T = beta_softmax(s, beta)
        assert torch.isfinite(T).all() and torch.allclose(
            T.sum(-1), torch.ones(2, dtype=DT)
        )
    s32 = torch.tensor([[1e38, -1e38]], dtype=torch.float32)
    assert torch.isfinite(beta_softmax(s32, 0.9)).all()


def test_gradients_are_finite_at_the_limits():
    s = torch.randn(4, 3, dtype=DT, requires_grad=True)
    for b in (0.0, 0.5, 1.0):
        beta = torch.tensor(b, dtype=DT, requires_grad=True)
        (beta_softmax(s, beta) * s).sum().backward()
        assert torch.isfinite(s.grad).all() and torch.isfinite(beta.grad)
        s.grad = None


def test_gradcheck_beta_softmax():
    s = torch.randn(3, 4, dtype=DT, requires_grad=True)
    beta = torch.tensor([0.3, 0.6, 0.8], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(beta_softmax, (s, beta))  # one beta per row of s


def test_eta_beta_round_trip():
    beta = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=DT)
    eta = eta_from_beta(beta)
    assert torch.allclose(
        eta[:4], torch.tensor([0.0, 1 / 3, 1.0, 9.0], dtype=DT)
    ) and torch.isinf(eta[4])
    assert torch.allclose(beta_from_eta(eta), beta)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_beta_out_of_range_is_refused(bad):
    A, B, z = params()
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
        beta_vq(A, B, z, bad)


def test_bad_shapes_are_refused():
    A, B, z = params(K=3)
    with pytest.raises(ValueError, match="shape \\(K,\\)"):
        beta_vq(A, B, z, torch.full((4,), 0.5, dtype=DT))
    with pytest.raises(ValueError, match="last dimension"):
        soft_vq(A, B, z[:, :2])
    with pytest.raises(TypeError, match="beta must be a number"):
        beta_vq(A, B, z, "0.5")
    with pytest.raises(ValueError, match="NaN or inf"):
        beta_softmax(torch.tensor([float("nan"), 0.0]), 0.5)
    with pytest.raises(ValueError, match="beta < 1"):
        maximise_on_simplex(torch.zeros(2, 3), 1.0)
