"""Tests of smaso.tsallis: the Tsallis α-entropy VQ ((8.2)–(8.3) of the book), its
closed forms and identities."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from smaso.activations import (
    abs_maso,
    beta_softmax_pool2d,
    leaky_relu_maso,
    relu_maso,
    scalar_beta_maso,
    swish,
)
from smaso.layers import layer_maso
from smaso.maso import hard_vq, scores
from smaso.tsallis import (
    CLOSED_FORM_ALPHAS,
    HARD_SWISH_ETA,
    beta_entmax,
    entmax,
    entmax_kkt_residual,
    scalar_tsallis_maso,
    sparse_pool_closed_form,
    sparsemax,
    tsallis_entropy,
    tsallis_maso,
    tsallis_objective,
    tsallis_pool2d,
    tsallis_sigmoid,
    tsallis_sigmoid_slope,
    tsallis_vq,
    tsallis_vq_abs,
    tsallis_vq_leaky_relu,
    tsallis_vq_relu,
)
from smaso.vq import beta_softmax, beta_vq, entropy

D64 = torch.float64
ALPHAS = [1.0, 1.25, 1.5, 2.0, 3.0]


def _rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(
        *shape, generator=torch.Generator().manual_seed(seed), dtype=D64
    )


# --------------------------------------------------------------------------------------
# entropy


def test_tsallis_entropy_limits_and_gini():
    t = torch.softmax(_rand(20, 6), -1)
    assert torch.allclose(tsallis_entropy(t, 1.0), entropy(t), atol=1e-15)
    assert torch.allclose(
        tsallis_entropy(t, 1 + 1e-7), entropy(t), atol=1e-5
    )  # alpha -> 1: Shannon
    assert torch.allclose(
        tsallis_entropy(t, 2.0), (1 - (t * t).sum(-1)) / 2, atol=1e-15
    )  # half the Gini index
    for a in ALPHAS:
        h = tsallis_entropy(t, a)
        assert (h >= 0).all() and (
            h <= tsallis_entropy(torch.full((6,), 1 / 6, dtype=D64), a) + 1e-12
        ).all()
        assert torch.allclose(
            tsallis_entropy(torch.eye(6, dtype=D64), a), torch.zeros(6, dtype=D64)
        )


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf"), -1.0])
def test_bad_alpha_values(bad):
    with pytest.raises(ValueError, match="alpha"):
        entmax(_rand(3, 4), bad)
    with pytest.raises(ValueError, match="alpha"):
        tsallis_entropy(torch.full((4,), 0.25, dtype=D64), bad)


@pytest.mark.parametrize("bad", [True, "2", torch.tensor(2.0), None])
def test_bad_alpha_types(bad):
    with pytest.raises(TypeError, match="alpha"):
        entmax(_rand(3, 4), bad)


# --------------------------------------------------------------------------------------
# entmax


@pytest.mark.parametrize("alpha", ALPHAS)
def test_entmax_satisfies_kkt(alpha):
    u = _rand(200, 7, scale=3.0)
    t = entmax(u, alpha)
    assert (
        torch.allclose(t.sum(-1), torch.ones(200, dtype=D64), atol=1e-14)
        and (t >= 0).all()
    )
    assert entmax_kkt_residual(t, u, alpha).max() < 1e-10


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-20, 20), min_size=1, max_size=9),
    st.sampled_from([1.0, 1.3, 1.5, 2.0, 2.7]),
)
def test_entmax_kkt_hypothesis(values, alpha):
    u = torch.tensor(values, dtype=D64)
    t = entmax(u, alpha)
    assert entmax_kkt_residual(t, u, alpha).item() < 1e-9


def test_kkt_residual_detects_non_optimal_points():
    u = _rand(50, 5, scale=2.0)
    for alpha in (1.5, 2.0):
        t = entmax(u, alpha)
        assert entmax_kkt_residual(torch.full_like(t, 0.2), u, alpha).min() > 1e-3
        assert entmax_kkt_residual(torch.softmax(u, -1), u, alpha).min() > 1e-4
    with pytest.raises(ValueError, match="same shape"):
        entmax_kkt_residual(t, u[:, :3], 1.5)


def test_entmax_special_cases():
    u = _rand(30, 6, scale=2.0)
    assert torch.equal(entmax(u, 1.0), torch.softmax(u, -1))
    assert torch.equal(sparsemax(u), entmax(u, 2.0))
    # sparsemax is the Euclidean projection onto the simplex: the tie-free 2-entry case
    # by hand
    a = torch.tensor([[0.3, 0.0], [2.0, 0.0]], dtype=D64)
    assert torch.allclose(
        sparsemax(a), torch.tensor([[0.65, 0.35], [1.0, 0.0]], dtype=D64), atol=1e-15
    )
    # shift invariance and the dim argument
    for alpha in (1.5, 2.0):
        assert torch.allclose(entmax(u + 7.5, alpha), entmax(u, alpha), atol=1e-12)
        assert torch.allclose(entmax(u.T, alpha, dim=0), entmax(u, alpha).T, atol=1e-15)


def test_entmax_alpha_to_one_is_softmax():
    u = _rand(40, 5, scale=2.0)
    errs = [
        (entmax(u, 1 + d) - torch.softmax(u, -1)).abs().max().item()
        for d in (1e-2, 1e-3, 1e-4)
    ]
    assert (
        errs[0] > errs[1] > errs[2] and errs[2] < 1e-4
    )  # converges, at rate O(alpha - 1)


def test_entmax_is_sparse_for_alpha_above_one():
    u = torch.tensor([3.0, 0.0, -5.0], dtype=D64)
    for alpha in (1.25, 1.5, 2.0):
        assert entmax(u, alpha)[2] == 0.0
    assert (torch.softmax(u, -1) > 0).all()


def test_entmax_against_numerical_maximiser():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    for alpha in (1.5, 2.0, 2.5):
        for _ in range(3):
            u = rng.normal(size=5) * 1.5

            def f(t, u=u, alpha=alpha):
                h = np.sum(t - np.clip(t, 0, None) ** alpha) / (alpha * (alpha - 1))
                return -(t @ u + h)

            res = minimize(
                f,
                np.full(5, 0.2),
                method="SLSQP",
                bounds=[(0, 1)] * 5,
                constraints=[{"type": "eq", "fun": lambda t: t.sum() - 1}],
                options={"ftol": 1e-14},
            )
            t = entmax(torch.tensor(u), alpha).numpy()
            assert f(t) <= res.fun + 1e-10
            assert np.allclose(t, res.x, atol=1e-4)


def test_entmax_against_reference_package():
    ref = pytest.importorskip("entmax")
    u = _rand(64, 9, scale=2.0)
    assert torch.allclose(entmax(u, 2.0), ref.sparsemax(u, dim=-1), atol=1e-14)
    assert torch.allclose(entmax(u, 1.5), ref.entmax15(u, dim=-1), atol=1e-12)
    for alpha in (1.2, 1.7, 3.0):
        assert torch.allclose(
            entmax(u, alpha), ref.entmax_bisect(u, alpha, n_iter=100), atol=1e-12
        )


@pytest.mark.parametrize("alpha", [1.3, 1.5, 2.0])
def test_entmax_gradcheck(alpha):
    u = _rand(4, 6, scale=1.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: entmax(v, alpha), (u,))
    assert torch.autograd.gradcheck(lambda v: entmax(v, alpha, dim=0), (u,))


def test_entmax_minus_inf_and_bad_inputs():
    u = torch.tensor(
        [[1.0, float("-inf"), 0.5], [float("-inf"), 2.0, float("-inf")]], dtype=D64
    )
    for alpha in (1.0, 1.5, 2.0):
        t = entmax(u, alpha)
        assert t[0, 1] == 0 and torch.allclose(
            t[1], torch.tensor([0.0, 1.0, 0.0], dtype=D64)
        )
        assert torch.allclose(t[0, [0, 2]], entmax(u[0, [0, 2]], alpha), atol=1e-14)
    with pytest.raises(ValueError, match="NaN"):
        entmax(torch.tensor([1.0, float("nan")]), 1.5)
    with pytest.raises(ValueError, match="\\+inf"):
        entmax(torch.tensor([1.0, float("inf")]), 1.5)
    with pytest.raises(ValueError, match="no finite"):
        entmax(torch.full((2, 3), float("-inf")), 1.5)
    with pytest.raises(TypeError, match="floating"):
        entmax(torch.tensor([1, 2]), 1.5)
    with pytest.raises(ValueError, match="n_iter"):
        entmax(_rand(2, 3), 1.5, n_iter=0)


def test_entmax_float32():
    u = _rand(100, 8, scale=2.0)
    for alpha in (1.5, 2.0):
        assert torch.allclose(
            entmax(u.float(), alpha).double(), entmax(u, alpha), atol=1e-5
        )


# --------------------------------------------------------------------------------------
# the VQ


def _maso(K=6, R=4, D=5, N=80, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, R, D, generator=g, dtype=D64)
    B = torch.randn(K, R, generator=g, dtype=D64)
    z = 2 * torch.randn(N, D, generator=g, dtype=D64)
    return A, B, z


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_tsallis_vq_maximises_objective(alpha):
    A, B, z = _maso()
    s = scores(A, B, z)
    rivals = torch.distributions.Dirichlet(torch.ones(4, dtype=D64)).sample((80, 6))
    for beta in (0.1, 0.25, 0.5, 0.8, 0.95):
        T = tsallis_vq(A, B, z, beta, alpha)
        eta = beta / (1 - beta)
        assert entmax_kkt_residual(T, eta * s, alpha).max() < 1e-10
        assert (
            tsallis_objective(T, s, beta, alpha)
            >= tsallis_objective(rivals, s, beta, alpha) - 1e-12
        ).all()
        assert (
            tsallis_objective(T, s, beta, alpha)
            >= tsallis_objective(hard_vq(A, B, z), s, beta, alpha) - 1e-12
        ).all()


def test_tsallis_vq_endpoints_and_alpha_one():
    A, B, z = _maso()
    for alpha in (1.5, 2.0):
        assert torch.equal(tsallis_vq(A, B, z, 1.0, alpha), hard_vq(A, B, z))
        assert torch.equal(
            tsallis_vq(A, B, z, 0.0, alpha), torch.full((80, 6, 4), 0.25, dtype=D64)
        )
        assert torch.allclose(
            tsallis_vq(A, B, z, 1 - 1e-9, alpha), hard_vq(A, B, z), atol=1e-12
        )
    assert torch.allclose(
        tsallis_vq(A, B, z, 0.5, 2.0), sparsemax(scores(A, B, z)), atol=1e-15
    )
    for beta in (0.2, 0.7):
        assert torch.equal(tsallis_vq(A, B, z, beta, 1.0), beta_vq(A, B, z, beta))
        assert torch.allclose(
            tsallis_vq(A, B, z, beta, 1 + 1e-6), beta_vq(A, B, z, beta), atol=1e-4
        )
    # per-unit beta
    betas = torch.linspace(0.1, 0.9, 6, dtype=D64)
    T = tsallis_vq(A, B, z, betas, 1.5)
    for k in range(6):
        assert torch.allclose(
            T[:, k], tsallis_vq(A, B, z, betas[k].item(), 1.5)[:, k], atol=1e-14
        )
    out = tsallis_maso(A, B, z, 0.3, 2.0)
    assert out.shape == (80, 6)
    assert torch.allclose(
        out, (tsallis_vq(A, B, z, 0.3, 2.0) * scores(A, B, z)).sum(-1)
    )


def test_beta_entmax_ties_and_gradients():
    s = torch.tensor([[1.0, 1.0, -2.0]], dtype=D64)
    assert torch.equal(
        beta_entmax(s, 1.0, 2.0), torch.tensor([[0.5, 0.5, 0.0]], dtype=D64)
    )
    assert torch.equal(beta_entmax(s, 0.3, 1.0), beta_softmax(s, 0.3))
    s = _rand(3, 4).requires_grad_()
    beta = torch.tensor(0.4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: beta_entmax(a, b, 1.5), (s, beta))
    assert torch.autograd.gradcheck(lambda a, b: beta_entmax(a, b, 2.0), (s, beta))


def test_tsallis_vq_bad_inputs():
    A, B, z = _maso()
    with pytest.raises(ValueError, match="beta must lie"):
        tsallis_vq(A, B, z, 1.5, 2.0)
    with pytest.raises(ValueError, match="shape \\(K,\\)"):
        tsallis_vq(A, B, z, torch.full((3,), 0.5, dtype=D64), 2.0)
    with pytest.raises(ValueError, match="alpha"):
        tsallis_vq(A, B, z, 0.5, 0.9)
    with pytest.raises(ValueError, match="NaN or inf"):
        beta_entmax(torch.tensor([1.0, float("nan")]), 0.5, 2.0)
    with pytest.raises(ValueError, match="scalar MASO"):
        scalar_tsallis_maso(A, B, z, 0.5, 2.0)


# --------------------------------------------------------------------------------------
# closed forms


X = torch.linspace(-8, 8, 3201, dtype=D64)


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 2.0])
def test_tsallis_sigmoid_is_entmax_of_the_pair(alpha):
    pair = entmax(torch.stack([X, torch.zeros_like(X)], -1), alpha)[:, 0]
    assert torch.allclose(tsallis_sigmoid(X, alpha), pair, atol=1e-13)
    assert torch.allclose(
        tsallis_sigmoid(X, alpha) + tsallis_sigmoid(-X, alpha),
        torch.ones_like(X),
        atol=1e-13,
    )
    assert (tsallis_sigmoid(X, alpha).diff() >= -1e-15).all()


@pytest.mark.parametrize("alpha", CLOSED_FORM_ALPHAS)
def test_tsallis_sigmoid_slope_is_the_derivative(alpha):
    """The slope the fused backward uses equals autograd's derivative of the weight
    (0 at the kinks u = -1, 1 for alpha = 2, as autograd's clamp) and a central
    difference of the pair's entmax (an independent reference) away from kinks."""
    u = torch.cat([X, torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=D64)])
    t = u.clone().requires_grad_(True)
    w = tsallis_sigmoid(t, alpha)
    (autograd,) = torch.autograd.grad(w.sum(), t)
    slope = tsallis_sigmoid_slope(u, w.detach(), alpha)
    assert torch.allclose(slope, autograd, atol=1e-14)
    h = 1e-6
    away = (u.abs() - 1).abs().gt(1e-3) & (u.abs() - 2).abs().gt(1e-3)

    def pair(v):
        return entmax(torch.stack([v, torch.zeros_like(v)], -1), alpha)[:, 0]

    central = (pair(u + h) - pair(u - h)) / (2 * h)
    assert torch.allclose(slope[away], central[away], atol=1e-7)


def test_tsallis_sigmoid_slope_refuses_alpha_without_closed_form():
    with pytest.raises(ValueError, match="closed forms for alpha"):
        tsallis_sigmoid_slope(X, tsallis_sigmoid(X, 1.3), 1.3)


def test_sparse_sigmoid_closed_forms():
    assert torch.equal(tsallis_sigmoid(X, 1.0), torch.sigmoid(X))
    assert torch.allclose(tsallis_sigmoid(X, 2.0), ((X + 1) / 2).clamp(0, 1), atol=0)
    # at scale 1/3 the sparse sigmoid is MobileNetV3's hard-sigmoid relu6(x + 3)/6
    assert torch.allclose(
        tsallis_sigmoid(HARD_SWISH_ETA * X, 2.0), F.relu6(X + 3) / 6, atol=1e-15
    )
    assert torch.allclose(
        tsallis_sigmoid(HARD_SWISH_ETA * X, 2.0), F.hardsigmoid(X), atol=1e-15
    )
    t15 = tsallis_sigmoid(X, 1.5)
    assert (
        (t15[X <= -2] == 0).all()
        and (t15[X >= 2] == 1).all()
        and ((t15 > 0) & (t15 < 1))[X.abs() < 1.9].all()
    )


def test_soft_dn_layer_outputs():
    """Prop. 5 and 6 with H -> H_alpha: the region probability of the ReLU MASO is the
    alpha-sigmoid; that of the fully-connected-pooling MASO (one unit, one region per
    class) is alpha-entmax."""
    x = X[::40, None]
    A, B = relu_maso()
    for alpha in (1.0, 1.5, 2.0):
        for beta in (0.25, 0.5, 0.8):
            eta = beta / (1 - beta)
            p = tsallis_vq(A, B, x, beta, alpha)[:, 0, 0]
            assert torch.allclose(p, tsallis_sigmoid(eta * x[:, 0], alpha), atol=1e-13)
    W, b, z = _rand(10, 5, seed=3), _rand(10, seed=4), _rand(30, 5, seed=5)
    T = tsallis_vq(W[None], b[None], z, 0.5, 2.0)[:, 0]
    assert torch.allclose(T, sparsemax(z @ W.T + b), atol=1e-14)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
def test_scalar_closed_forms_match_the_maso(alpha):
    for beta in (0.1, 0.25, 0.5, 0.9):
        eta = beta / (1 - beta)
        assert torch.allclose(
            tsallis_vq_relu(X, eta, alpha),
            scalar_tsallis_maso(*relu_maso(), X, beta, alpha),
            atol=1e-12,
        )
        assert torch.allclose(
            tsallis_vq_abs(X, eta, alpha),
            scalar_tsallis_maso(*abs_maso(), X, beta, alpha),
            atol=1e-12,
        )
        assert torch.allclose(
            tsallis_vq_leaky_relu(X, eta, alpha, 0.2),
            scalar_tsallis_maso(*leaky_relu_maso(0.2), X, beta, alpha),
            atol=1e-12,
        )
        if alpha == 1.0:
            assert torch.allclose(
                tsallis_vq_relu(X, eta, 1.0), swish(X, eta), atol=1e-15
            )
            assert torch.allclose(
                scalar_tsallis_maso(*abs_maso(), X, beta, 1.0),
                scalar_beta_maso(*abs_maso(), X, beta),
                atol=1e-15,
            )


def test_gini_relu_is_hard_swish_at_one_third():
    assert HARD_SWISH_ETA == 1 / 3
    assert torch.allclose(
        tsallis_vq_relu(X, HARD_SWISH_ETA, 2.0), X * F.relu6(X + 3) / 6, atol=1e-15
    )
    assert torch.allclose(
        tsallis_vq_relu(X, HARD_SWISH_ETA, 2.0), F.hardswish(X), atol=1e-14
    )
    x32 = torch.randn(10_000)
    assert torch.allclose(
        tsallis_vq_relu(x32, HARD_SWISH_ETA, 2.0), F.hardswish(x32), atol=1e-6
    )
    # beta = 1/4 in the MASO form, and the scale is unique: other eta differ from
    # hard-swish
    assert torch.allclose(
        scalar_tsallis_maso(*relu_maso(), X, 0.25, 2.0), F.hardswish(X), atol=1e-14
    )
    for eta in (0.3, 0.34, 1.0):
        assert (tsallis_vq_relu(X, eta, 2.0) - F.hardswish(X)).abs().max() > 1e-3


def test_gini_relu_and_abs_piecewise():
    for eta in (0.5, 1.0, 3.0):
        y = tsallis_vq_relu(X, eta, 2.0)
        lo, hi = -1 / eta >= X, 1 / eta <= X
        mid = ~(lo | hi)
        assert (y[lo] == 0).all() and torch.equal(y[hi], X[hi])
        assert torch.allclose(y[mid], (eta * X[mid] ** 2 + X[mid]) / 2, atol=1e-14)
        assert torch.allclose(
            tsallis_vq_abs(X, eta, 2.0), X * (2 * eta * X).clamp(-1, 1), atol=1e-14
        )
    assert torch.allclose(tsallis_vq_relu(X, 0.0, 2.0), X / 2) and torch.allclose(
        tsallis_vq_relu(X, 1e9, 2.0), X.relu()
    )
    assert torch.allclose(tsallis_vq_abs(X, 1.0, 1.0), X * torch.tanh(X), atol=1e-15)


def test_closed_forms_gradcheck_and_errors():
    x = _rand(20, scale=2.0).requires_grad_()
    eta = torch.tensor(0.7, dtype=D64, requires_grad=True)
    for alpha in (1.5, 2.0):
        assert torch.autograd.gradcheck(
            lambda a, e, alpha=alpha: tsallis_vq_relu(a, e, alpha), (x, eta)
        )
    with pytest.raises(ValueError, match="eta"):
        tsallis_vq_relu(X, -1.0)
    with pytest.raises(ValueError, match="concave"):
        tsallis_vq_leaky_relu(X, 1.0, 2.0, negative_slope=2.0)
    with pytest.raises(TypeError, match="floating"):
        tsallis_sigmoid(torch.arange(3), 2.0)


# --------------------------------------------------------------------------------------
# pooling


def test_sparse_pool_closed_form():
    u = _rand(500, 4, scale=2.0)
    for eta in (0.1, 0.5, 1.0, 4.0):
        ref = (sparsemax(eta * u) * u).sum(-1)
        assert torch.allclose(sparse_pool_closed_form(u, eta), ref, atol=1e-12)
    assert torch.allclose(sparse_pool_closed_form(u, 1e-9), u.mean(-1), atol=1e-6)
    assert torch.allclose(sparse_pool_closed_form(u, 1e9), u.amax(-1))
    # two entries at eta = 1/3: u2 + hardswish(u1 - u2), as max(u1, u2) = u2 + relu(u1 -
    # u2)
    u1, u2 = u[:, 0], u[:, 1]
    assert torch.allclose(
        sparse_pool_closed_form(u[:, :2], HARD_SWISH_ETA),
        u2 + F.hardswish(u1 - u2),
        atol=1e-14,
    )


def test_tsallis_pool2d_matches_maso_and_limits():
    img = _rand(3, 2, 6, 6, scale=1.5)
    A, B = layer_maso([nn.MaxPool2d(2)], (2, 6, 6), dtype=D64)
    for alpha in (1.5, 2.0):
        for beta in (0.3, 0.6):
            eta = beta / (1 - beta)
            assert torch.allclose(
                tsallis_pool2d(img, eta, alpha, 2).flatten(1),
                tsallis_maso(A, B, img.flatten(1), beta, alpha),
                atol=1e-12,
            )
    assert torch.allclose(
        tsallis_pool2d(img, 0.7, 1.0, 2), beta_softmax_pool2d(img, 0.7, 2), atol=1e-14
    )
    assert torch.allclose(tsallis_pool2d(img, 1e9, 2.0, 2), F.max_pool2d(img, 2))
    assert torch.allclose(
        tsallis_pool2d(img, 0.0, 2.0, 2), F.avg_pool2d(img, 2), atol=1e-14
    )
    windows = img.unfold(2, 2, 2).unfold(3, 2, 2).reshape(3, 2, 3, 3, 4)
    assert torch.allclose(
        tsallis_pool2d(img, 0.8, 2.0, 2),
        sparse_pool_closed_form(windows, 0.8),
        atol=1e-12,
    )
    # padding positions are excluded (large eta: max-pooling of the valid entries, even
    # for negative inputs)
    neg = -img.abs() - 1
    assert torch.allclose(
        tsallis_pool2d(neg, 1e9, 2.0, 3, 2, 1), F.max_pool2d(neg, 3, 2, 1)
    )
    assert torch.allclose(
        tsallis_pool2d(img, torch.tensor([0.5, 2.0], dtype=D64), 1.5, 2)[:, 1],
        tsallis_pool2d(img[:, 1:], 2.0, 1.5, 2)[:, 0],
        atol=1e-14,
    )
    with pytest.raises(ValueError, match="channels"):
        tsallis_pool2d(img, torch.ones(3, dtype=D64), 2.0)
    with pytest.raises(ValueError, match="N, C, H, W"):
        tsallis_pool2d(img[0], 1.0, 2.0)
    p = img.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: tsallis_pool2d(v, 0.9, 1.5, 2), (p[:1, :1],)
    )
