"""Tests for smaso.filters: the authors' unnormalised Gram-Schmidt, Hamming apodisation,
and which layers get which parametrisation."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from smaso.filters import (
    EXACT,
    apodize,
    hamming_window,
    register_filters,
    unnormalised_gram_schmidt,
)
from smaso.models import small_cnn
from smaso.orthogonal import filter_matrix

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_unnormalised_gram_schmidt_is_the_smaso_formula_and_qr_scaled():
    W = rand(6, 4, 3, 3)
    U = filter_matrix(unnormalised_gram_schmidt(W))
    V = filter_matrix(W)
    # the formula, written out: u_k = v_k - sum_{j<k} <v_k, u_j>/<u_j, u_j> u_j
    ref = []
    for k in range(6):
        u = V[k].clone()
        for j in range(k):
            u -= (V[k] @ ref[j]) / (ref[j] @ ref[j]) * ref[j]
        ref.append(u)
    assert torch.allclose(U, torch.stack(ref), atol=1e-12)
    # an independent reference: QR of V^T with a positive diagonal gives u_k = R_kk q_k
    Q, R = torch.linalg.qr(V.T)
    s = R.diagonal().sign()
    assert torch.allclose(U, ((Q * s) * (R.diagonal() * s)).T, atol=1e-12)
    G = U @ U.T
    assert (G - torch.diag(G.diagonal())).abs().max() < 1e-12  # orthogonal ...
    assert (G.diagonal() - 1).abs().max() > 0.5  # ... but not normalised
    assert torch.equal(U[0], V[0])  # the first filter is left as it is
    # the parametrisation's QR route computes the same vectors, and gradients
    Wq = W.clone().requires_grad_(True)
    Wl = W.clone().requires_grad_(True)
    Uq, Ul = unnormalised_gram_schmidt(Wq, "qr"), unnormalised_gram_schmidt(Wl)
    assert torch.allclose(Uq, Ul, atol=1e-12)
    g = rand(*W.shape, seed=1)
    (Uq * g).sum().backward()
    (Ul * g).sum().backward()
    assert torch.allclose(Wq.grad, Wl.grad, atol=1e-10)


def test_unnormalised_gram_schmidt_tall_and_dependent():
    W = rand(10, 4)  # 10 filters in R^4: the columns are processed
    U = unnormalised_gram_schmidt(W)
    G = U.T @ U
    assert (G - torch.diag(G.diagonal())).abs().max() < 1e-12
    assert torch.allclose(unnormalised_gram_schmidt(W, "qr"), U, atol=1e-12)
    for method in ("loop", "qr"):
        with pytest.raises(ValueError, match="linearly dependent"):
            unnormalised_gram_schmidt(torch.stack([W[0], 2 * W[0]]), method)


def test_hamming_window_matches_numpy_and_sums_to_one():
    for kh, kw in ((3, 3), (5, 5), (1, 1), (3, 5)):
        h = hamming_window(kh, kw, dtype=F64)
        ref = np.outer(np.hamming(kh), np.hamming(kw))
        assert np.allclose(h.numpy(), ref / ref.sum(), atol=1e-15)
        assert abs(float(h.sum()) - 1) < 1e-12


def test_apodize_is_window_times_filter_minus_its_sum():
    W = rand(4, 3, 5, 5)
    A = apodize(W)
    h = torch.from_numpy(np.outer(np.hamming(5), np.hamming(5)))
    h = h / h.sum()
    for k in range(4):
        wh = W[k] * h
        assert torch.allclose(A[k], wh - wh.sum(), atol=1e-12)
    with pytest.raises(ValueError, match="conv weight"):
        apodize(rand(4, 3))


def test_register_filters_options():
    torch.manual_seed(0)
    m = small_cnn(version=2, in_channels=3)
    layers = register_filters(m, "gs-unnormalised", apodized=True, dense=False)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert layers == convs and not parametrize.is_parametrized(m[-1], "weight")
    for c in convs:  # apodised, then orthogonalised: orthogonal rows
        F = filter_matrix(c.weight.detach()).double()
        G = F @ F.T
        n = G.diagonal().sqrt()
        assert (
            (G / n[:, None] / n[None]) - torch.eye(len(G), dtype=F64)
        ).abs().max() < 1e-4
        chain = c.parametrizations.weight
        assert [type(p).__name__ for p in chain] == [
            "Apodize",
            "UnnormalisedGramSchmidt",
        ]
    plain = small_cnn(version=2)
    assert len(register_filters(plain, "qr")) == 4  # dense included by default
    assert register_filters(small_cnn(), "none") == []
    assert set(EXACT) == {"qr", "gs", "mgs", "gs-unnormalised"}
    with pytest.raises(ValueError, match="already parametrised"):
        register_filters(plain, "qr")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W = convs[1].weight
    F = filter_matrix(W.detach()).double()
    G = F @ F.T
    n = G.diagonal().sqrt()
    assert (
        (G / n[:, None] / n[None]) - torch.eye(len(G), dtype=F64)
    ).abs().max() < 1e-4
