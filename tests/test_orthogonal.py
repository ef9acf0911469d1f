"""Tests for smaso.orthogonal: penalties (Section 5, the authors' template penalty) and
exact
orthogonal filters by Gram-Schmidt / modified Gram-Schmidt / QR (Eq. 11)."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from smaso.orthogonal import (
    OrthogonalFilters,
    filter_matrix,
    filter_penalty,
    gram_schmidt,
    input_templates,
    maso_orthogonality_penalty,
    modified_gram_schmidt,
    orthogonality_penalty,
    orthogonalize,
    penalty_loss,
    qr_orthogonalize,
    register_orthogonal,
    template_penalty,
)

F64 = torch.float64
METHODS = ["gs", "mgs", "qr"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(
        *shape, generator=torch.Generator().manual_seed(seed), dtype=F64
    ).to(dtype)


# ------------------------------------------------------------------ penalties


def test_penalty_hand_computed():
    W = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=F64)
    # Gram off-diagonal entries: <w0,w1> = 1, <w0,w2> = 0, <w1,w2> = 2 -> 2 * (1 + 0 +
    # 4)
    assert orthogonality_penalty(W).item() == 10.0
    # cosines 1/sqrt2, 0, 1/sqrt2 -> 2 * (1/2 + 0 + 1/2)
    assert math.isclose(
        orthogonality_penalty(W, normalized=True).item(), 2.0, rel_tol=1e-12
    )
    # scale-free variant does not change with the filter norms; the paper's one scales
    # with ||w||^4
    assert math.isclose(
        orthogonality_penalty(3 * W, normalized=True).item(), 2.0, rel_tol=1e-12
    )
    assert orthogonality_penalty(3 * W).item() == 810.0
    # a zero filter counts as orthogonal to everything
    assert (
        orthogonality_penalty(
            torch.tensor([[0.0, 0.0], [1.0, 1.0]]), normalized=True
        ).item()
        == 0.0
    )


def test_penalty_of_conv_weight_uses_flattened_filters():
    W = rand(5, 2, 3, 3)
    F = W.reshape(5, 18)
    G = F @ F.T
    expected = sum(G[i, j] ** 2 for i in range(5) for j in range(5) if i != j)
    assert torch.allclose(orthogonality_penalty(W), expected, rtol=1e-12, atol=0)
    assert torch.equal(filter_matrix(W), F)


def test_maso_penalty_relu_and_abs():
    W = rand(4, 6, seed=1)
    relu_A = torch.stack([W, torch.zeros_like(W)], dim=1)  # slopes (w_k, 0)
    abs_A = torch.stack([W, -W], dim=1)  # slopes (w_k, -w_k)
    assert torch.allclose(
        maso_orthogonality_penalty(relu_A), orthogonality_penalty(W), rtol=1e-12, atol=0
    )
    assert torch.allclose(
        maso_orthogonality_penalty(abs_A),
        4 * orthogonality_penalty(W),
        rtol=1e-12,
        atol=0,
    )
    A = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [2.0, 0.0]]], dtype=F64)
    # cross inner products <A0r, A1s>: [[0, 2], [1, 2]] -> 2 * (0 + 4 + 1 + 4)
    assert maso_orthogonality_penalty(A).item() == 18.0


def test_filter_penalty_sums_over_layers():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)
    ).double()
    expected = orthogonality_penalty(model[0].weight) + orthogonality_penalty(
        model[3].weight
    )
    assert torch.allclose(filter_penalty(model), expected)
    with pytest.raises(ValueError, match=r"no nn\.Linear or nn\.Conv2d"):
        filter_penalty(nn.ReLU())


def test_template_penalty_linear_model_hand_case():
    torch.manual_seed(0)
    lin = nn.Linear(7, 4).double()
    x = rand(5, 7, seed=2)
    T = input_templates(lin, x)
    assert T.shape == (5, 4, 7)
    assert torch.allclose(T, lin.weight.expand(5, 4, 7), rtol=0, atol=1e-15)
    assert torch.allclose(
        template_penalty(lin, x),
        orthogonality_penalty(lin.weight) / 16,
        rtol=1e-12,
        atol=0,
    )


def test_templates_match_autograd_jacobian_and_penalty_gradient():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).double()
    x = rand(4, 1, 2, 3, seed=3)
    T = input_templates(model, x)
    assert T.shape == (4, 3, 1, 2, 3)
    for n in range(4):
        J = torch.autograd.functional.jacobian(
            lambda v: model(v[None])[0], x[n]
        )  # (3, 1, 2, 3)
        assert torch.allclose(T[n], J, rtol=0, atol=1e-13)
    # the penalty from the autograd Jacobians, and its gradient in the parameters
    # (double backprop)
    Tf = T.flatten(2)
    G = Tf @ Tf.transpose(1, 2)
    expected = (G**2).sum() - (G.diagonal(dim1=1, dim2=2) ** 2).sum()
    assert torch.allclose(
        template_penalty(model, x), expected / (4 * 9), rtol=1e-12, atol=0
    )
    # gradcheck of the parameters -> penalty map, through the double backward
    ps = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(lambda *ps: _penalty_functional(model, x, ps), ps)


def _penalty_functional(model, x, ps):
    """template_penalty with the model's parameters replaced by ps (for gradcheck)."""
    names = [n for n, _ in model.named_parameters()]

    class Wrapped(nn.Module):
        def forward(self, v):
            return torch.func.functional_call(
                model, dict(zip(names, ps, strict=True)), (v,)
            )

    return template_penalty(Wrapped(), x)


def test_penalty_loss_kinds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x = rand(2, 1, 2, 2)
    assert torch.allclose(
        penalty_loss("filters", 2.0)(model, x, None), 2 * filter_penalty(model)
    )
    assert torch.allclose(
        penalty_loss("filters_normalized")(model, x, None), filter_penalty(model, True)
    )
    assert torch.allclose(
        penalty_loss("templates", 0.5)(model, x, None), 0.5 * template_penalty(model, x)
    )
    with pytest.raises(ValueError, match="kind must be one of"):
        penalty_loss("gram")
    with pytest.raises(ValueError, match="lam"):
        penalty_loss("filters", -1.0)


# ------------------------------------------------------------------ exact
# orthogonalisation


@pytest.mark.parametrize(
    "shape", [(6, 10), (5, 2, 2, 2), (7, 7), (12, 5), (9, 1, 2, 2)]
)
def test_gs_mgs_qr_same_function_and_gradients_float64(shape):
    W = rand(*shape, seed=4).requires_grad_(True)
    up = rand(*shape, seed=5)
    outs = {m: orthogonalize(W, m) for m in METHODS}
    grads = {m: torch.autograd.grad((o * up).sum(), W)[0] for m, o in outs.items()}
    for m in ("gs", "mgs"):
        assert torch.allclose(outs[m], outs["qr"], rtol=0, atol=1e-12), m
        assert torch.allclose(grads[m], grads["qr"], rtol=0, atol=1e-11), m
    M = filter_matrix(outs["qr"])
    small = min(M.shape)
    gram = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    assert torch.allclose(gram, torch.eye(small, dtype=F64), rtol=0, atol=1e-13)
    # same function as the wrappers; first filter is the normalised first raw filter
    # (Gram-Schmidt order)
    assert torch.equal(gram_schmidt(W), outs["gs"]) and torch.equal(
        modified_gram_schmidt(W), outs["mgs"]
    )
    assert torch.equal(qr_orthogonalize(W), outs["qr"])
    if M.shape[0] <= M.shape[1]:
        w0 = filter_matrix(W)[0]
        assert torch.allclose(M[0], w0 / w0.norm(), rtol=0, atol=1e-14)


def test_keep_norms():
    W = rand(4, 9, seed=6)
    Q = orthogonalize(W, "qr", keep_norms=True)
    assert torch.allclose(Q.norm(dim=1), W.norm(dim=1), rtol=1e-12, atol=0)
    G = Q @ Q.T
    assert torch.allclose(
        G - torch.diag(G.diagonal()), torch.zeros(4, 4, dtype=F64), atol=1e-12
    )


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_parametrisation(method):
    for shape in [(3, 5), (2, 1, 2, 2), (5, 3)]:
        W = rand(*shape, seed=7).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda w: OrthogonalFilters(method)(w), (W,))
    W = rand(3, 5, seed=8).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w: orthogonalize(w, method, keep_norms=True), (W,)
    )


@pytest.mark.parametrize("method", METHODS)
def test_orthogonal_after_optimizer_steps_float32(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 10),
    )
    layers = register_orthogonal(model, method)
    assert len(layers) == 3 and all(
        parametrize.is_parametrized(m, "weight") for m in layers
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 3, 9, 9), torch.randint(0, 10, (16,))
    raw0 = layers[1].parametrizations.weight.original.detach().clone()
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(
        raw0, layers[1].parametrizations.weight.original
    )  # it trained
    for m in layers:
        F = filter_matrix(m.weight.detach())
        assert F.dtype == torch.float32
        assert (F @ F.T - torch.eye(F.shape[0])).abs().max() < 1e-5


def test_builtin_orthogonal_on_conv_is_per_slice_not_per_filter():
    """PyTorch's parametrizations.orthogonal orthogonalises each kh x kw slice of a 4-D
    weight."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3).double()
    nn.utils.parametrizations.orthogonal(conv)
    F = filter_matrix(conv.weight.detach())
    assert (F @ F.T - torch.diag((F @ F.T).diagonal())).abs().max() > 1e-3
    conv2 = nn.Conv2d(2, 4, 3).double()
    register_orthogonal(conv2)
    F2 = filter_matrix(conv2.weight.detach())
    assert torch.allclose(F2 @ F2.T, torch.eye(4, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_assigning_the_weight_after_registration_right_inverse(method):
    """``layer.weight = W`` after registration, as with PyTorch's parametrizations:
    orthonormal filters come back exactly; others end up orthogonalised."""
    conv = nn.Conv2d(2, 4, 3).double()
    register_orthogonal(conv, method)
    W = orthogonalize(rand(4, 2, 3, 3, seed=3), "qr")  # orthonormal filters
    conv.weight = W
    assert torch.allclose(conv.weight, W, atol=1e-12)
    W_before = W.clone()
    with torch.no_grad():
        conv.parametrizations.weight.original.add_(1.0)  # the layer owns a copy
    assert torch.equal(W, W_before)
    V = rand(4, 2, 3, 3, seed=4)  # not orthogonal: projected, like PyTorch's own
    conv.weight = V
    assert torch.allclose(conv.weight, orthogonalize(V, method), atol=1e-12)
    assert not torch.allclose(conv.weight, V, atol=1e-3)
    # keep_norms: orthogonal filters of any norms are a possible weight
    lin = nn.Linear(5, 3).double()
    register_orthogonal(lin, method, keep_norms=True)
    W = orthogonalize(rand(3, 5, seed=5), "qr") * torch.tensor([[2.0], [0.5], [3.0]])
    lin.weight = W.to(F64)
    assert torch.allclose(lin.weight, W.to(F64), atol=1e-12)
    # tall weights: orthonormal columns come back; keep_norms has no inverse
    tall = nn.Linear(2, 5).double()
    register_orthogonal(tall, method)
    W = orthogonalize(rand(5, 2, seed=6), "qr")
    tall.weight = W
    assert torch.allclose(tall.weight, W, atol=1e-12)
    tall_norms = nn.Linear(2, 5).double()
    register_orthogonal(tall_norms, method, keep_norms=True)  # registration works
    with pytest.raises(
        NotImplementedError, match=r"parametrizations\.weight\.original"
    ):
        tall_norms.weight = W
    with pytest.raises(ValueError, match=r"expected a weight of shape \(4, 2, 3, 3\)"):
        conv.weight = rand(4, 2, 3, seed=7)
    assert conv.weight.shape == (4, 2, 3, 3)


def test_more_filters_than_fan_in():
    """96 filters of 3x3 on RGB live in R^27: orthonormal columns, or a clear error;
    never NaN."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 96, 3)
    for method in METHODS:
        Q = orthogonalize(conv.weight.detach(), method)
        assert torch.isfinite(Q).all() and Q.shape == (96, 3, 3, 3)
        F = filter_matrix(Q)
        assert (F.T @ F - torch.eye(27)).abs().max() < 1e-5  # W^T W = I
    with pytest.raises(
        ValueError, match=r"96 filters in R\^27 .*cannot be mutually orthogonal"
    ):
        orthogonalize(conv.weight, "gs", tall="error")
    with pytest.raises(ValueError, match="cannot be mutually orthogonal"):
        register_orthogonal(nn.Sequential(conv), tall="error")
    assert not parametrize.is_parametrized(conv)  # refused before registering anything


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 dims"):
        orthogonalize(torch.randn(5))
    with pytest.raises(ValueError, match="floating point"):
        orthogonalize(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        orthogonalize([[1.0, 0.0]])
    with pytest.raises(ValueError, match="method must be one of"):
        orthogonalize(torch.randn(2, 3), "householder")
    with pytest.raises(ValueError, match="tall must be one of"):
        OrthogonalFilters("qr", tall="rows")
    with pytest.raises(ValueError, match="NaN or inf"):
        orthogonalize(torch.tensor([[1.0, float("nan")]]))
    dependent = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]], dtype=F64)
    for method in METHODS:
        with pytest.raises(ValueError, match="linearly dependent"):
            orthogonalize(dependent, method)
        with pytest.raises(ValueError, match="linearly dependent"):
            orthogonalize(torch.zeros(2, 3), method)
    with pytest.raises(ValueError, match="grouped"):
        register_orthogonal(nn.Conv2d(4, 4, 3, groups=2))
    lin = nn.Linear(3, 2)
    register_orthogonal(lin)
    with pytest.raises(ValueError, match="already parametrised"):
        register_orthogonal(lin)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        register_orthogonal(torch.randn(2, 2))
    with pytest.raises(ValueError, match="\\(N, C\\) outputs"):
        input_templates(nn.Identity(), torch.randn(2, 1, 3))


@pytest.mark.parametrize("method", ["gs", "mgs"])
def test_orthogonal_under_bf16_autocast(method):
    """Under autocast the parametrisation runs in full precision: a layer stays
    orthogonal to float32 rounding. (Its Gram-Schmidt matmuls in bf16 would leave the
    filters orthogonal only to ~1e-3, and the check below shows that they would.)"""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 5)  # 64 filters in R^75, as the exact row's first layer
    register_orthogonal(conv, method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W = conv.weight
        raw = orthogonalize(conv.parametrizations.weight.original, method)
        out = conv(torch.randn(2, 3, 9, 9))
    assert out.dtype == torch.bfloat16  # the layer itself does run under autocast
    F = filter_matrix(W.detach()).double()
    assert W.dtype == torch.float32
    assert (F @ F.T - torch.eye(64, dtype=F64)).abs().max() <= 1e-5
    G = filter_matrix(raw.detach()).double()
    assert (G @ G.T - torch.eye(64, dtype=F64)).abs().max() > 1e-4
