"""Nonlinearities induced by soft/β-VQ (Props. 3–7, Table 1) and the learnable-β
modules, on their fast (fused) and eager paths."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smaso import fused, native
from smaso.activations import (
    BetaVQAbs,
    BetaVQLeakyReLU,
    BetaVQMaxout,
    BetaVQMaxPool2d,
    BetaVQReLU,
    TsallisVQReLU,
    abs_maso,
    beta_softmax_pool2d,
    beta_vq_abs,
    beta_vq_leaky_relu,
    convex_maso,
    leaky_relu_maso,
    max_affine_vq,
    max_affine_vq_grads,
    relu_maso,
    scalar_beta_maso,
    softmax_pool_grads,
    softmax_pool_windows,
    swish,
    swish_fused,
    two_piece_vq,
    two_piece_vq_grads,
)
from smaso.layers import layer_maso
from smaso.tsallis import tsallis_vq_relu
from smaso.vq import beta_maso, soft_vq

DT = torch.float64
BETAS = [0.05, 0.3, 0.5, 0.7, 0.95]
x = torch.linspace(-6, 6, 241, dtype=DT)


@pytest.mark.parametrize("beta", BETAS)
def test_beta_vq_of_scalar_masos_equals_the_closed_forms(beta):
    eta = beta / (1 - beta)
    assert torch.allclose(
        scalar_beta_maso(*relu_maso(), x, beta), swish(x, eta), atol=1e-12
    )  # Prop. 7
    assert torch.allclose(
        scalar_beta_maso(*abs_maso(), x, beta), beta_vq_abs(x, eta), atol=1e-12
    )
    assert torch.allclose(
        scalar_beta_maso(*leaky_relu_maso(0.2), x, beta),
        beta_vq_leaky_relu(x, eta, 0.2),
        atol=1e-12,
    )


def test_soft_relu_is_silu_prop3():
    x32 = torch.randn(10_000)
    assert torch.allclose(
        scalar_beta_maso(*relu_maso(torch.float32), x32, 0.5), F.silu(x32), atol=1e-6
    )
    assert torch.allclose(swish(x32, 1.0), F.silu(x32), atol=1e-6)


def test_hard_and_linear_limits_of_scalar_masos():
    A, B = convex_maso([-1.0, -0.25, 0.5, 2.0], [-1.0, 0.0, 0.2, -2.0])
    assert torch.allclose(
        scalar_beta_maso(A, B, x, 1.0),
        (x[:, None] * A[0, :, 0] + B[0]).amax(-1),
        atol=1e-12,
    )
    assert torch.allclose(
        scalar_beta_maso(A, B, x, 0.0),
        (x[:, None] * A[0, :, 0] + B[0]).mean(-1),
        atol=1e-12,
    )
    assert torch.allclose(scalar_beta_maso(*relu_maso(), x, 1.0), F.relu(x))
    assert torch.allclose(swish(x, 0.0), x / 2)


def test_beta_softmax_pooling_is_the_beta_vq_of_the_max_pooling_maso_prop4():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 6, 6, generator=g, dtype=DT)
    A, B = layer_maso([nn.MaxPool2d(2)], (3, 6, 6), dtype=DT)
    for beta in BETAS:
        eta = beta / (1 - beta)
        from_maso = beta_maso(A, B, img.flatten(1), beta).view(2, 3, 3, 3)
        assert torch.allclose(from_maso, beta_softmax_pool2d(img, eta, 2), atol=1e-12)
    u = img.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 3, 3, 3, 4)
    assert torch.allclose(
        beta_softmax_pool2d(img, 1.0, 2), (torch.softmax(u, -1) * u).sum(-1), atol=1e-12
    )
    assert torch.allclose(beta_softmax_pool2d(img, 1e9, 2), F.max_pool2d(img, 2))
    assert torch.allclose(
        beta_softmax_pool2d(img, 0.0, 3, 2, 1),
        F.avg_pool2d(img, 3, 2, 1, count_include_pad=False),
    )


def test_soft_dn_layers_sigmoid_tanh_softmax_props5_6():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).double()
    z = torch.randn(100, 5, dtype=DT)
    u = lin(z)
    A, B = layer_maso([lin, nn.ReLU()], (5,))
    assert torch.allclose(
        soft_vq(A, B, z)[..., 0], torch.sigmoid(u), atol=1e-12
    )  # Prop. 5
    A2, B2 = layer_maso(
        [nn.Linear(5, 4).double().requires_grad_(False), nn.ReLU()], (5,)
    )
    A2, B2 = 2 * A, 2 * B  # App. E.6: doubled weights, then 2p - 1
    assert torch.allclose(2 * soft_vq(A2, B2, z)[..., 0] - 1, torch.tanh(u), atol=1e-12)
    # Prop. 6: one unit whose R = C pieces are the class rows of a fully connected layer
    A_fc, B_fc = lin.weight.detach()[None], lin.bias.detach()[None]
    assert torch.allclose(
        soft_vq(A_fc, B_fc, z)[:, 0], torch.softmax(u, -1), atol=1e-12
    )


# The learnable modules, with an input each (float64): every one has a fast path
# (compiled kernels, hand-written backward: smaso.fused) and an eager one.
MODULES = {
    "relu": (lambda **k: BetaVQReLU(3, beta_init=0.3, **k), (2, 3, 4, 4)),
    "relu, one beta": (lambda **k: BetaVQReLU(None, **k), (2, 3, 4, 4)),
    "relu, linear": (lambda **k: BetaVQReLU(3, beta_init=0.7, **k), (5, 3)),
    "leaky": (lambda **k: BetaVQLeakyReLU(0.1, 3, beta_init=0.6, **k), (2, 3, 4, 4)),
    "abs": (lambda **k: BetaVQAbs(3, beta_init=0.8, **k), (2, 3, 4, 4)),
    "gini": (lambda **k: TsallisVQReLU(3, **k), (2, 3, 4, 4)),
    "entmax15": (lambda **k: TsallisVQReLU(3, alpha=1.5, **k), (2, 3, 4, 4)),
    "maxout": (lambda **k: BetaVQMaxout(3, 4, **k), (2, 3, 4, 4)),
    "pool": (
        lambda **k: BetaVQMaxPool2d(2, num_channels=3, beta_init=0.4, **k),
        (2, 3, 4, 4),
    ),
    "pool 3x3, cropped": (
        lambda **k: BetaVQMaxPool2d(3, beta_init=0.4, **k),
        (1, 3, 4, 7),
    ),
}


def _module(name, **kwargs):
    make, shape = MODULES[name]
    m = make(**kwargs).double()
    if isinstance(m, BetaVQMaxout):  # pieces away from the ReLU initialisation
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            m.slopes.copy_(torch.randn(m.slopes.shape, generator=g, dtype=DT))
            m.offsets.copy_(torch.randn(m.offsets.shape, generator=g, dtype=DT))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    return m, x.requires_grad_(True)


def _ran_fused(y):
    """Whether the graph of y holds the fused kernels' backward node."""
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == "_FusedBackward":
            return True
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return False


def _as_function(m):
    """m as a function of its input and all its parameters (for gradcheck)."""
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    return (
        lambda t, *ps: torch.func.functional_call(
            m, dict(zip(names, ps, strict=True)), (t,)
        ),
        params,
    )


NATIVE = ["relu", "relu, one beta", "relu, linear", "leaky", "abs"]  # C++ kernels


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("name", MODULES)
def test_modules_gradcheck_input_and_parameters_on_both_paths(name, fused):
    m, x = _module(name, fused=fused)
    f, params = _as_function(m)
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("name", NATIVE)
def test_compiled_kernels_where_the_native_ones_are_switched_off(name, monkeypatch):
    """The kernels compiled by torch.compile, which run where the C++ kernels of
    smaso.native cannot be built: gradcheck, and the same numbers as eager."""
    monkeypatch.setenv("SMASO_NATIVE", "0")
    assert native.build_error() == "switched off (SMASO_NATIVE=0)"
    m, x = _module(name, fused=True)
    f, params = _as_function(m)
    assert torch.autograd.gradcheck(f, (x, *params))
    y = m(x)
    m.fused = False
    torch.testing.assert_close(y, m(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("slope", [0.0, 0.1, -1.0])
def test_native_kernels_compute_the_maths(slope, dtype):
    if native.build_error():
        pytest.skip(f"no C++ kernels here: {native.build_error()}")
    g = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(37, 45, generator=g, dtype=dtype)  # odd length: scalar tail
    eta = torch.rand(37, 1, generator=g, dtype=dtype) + 0.1
    gy = torch.randn(37, 45, generator=g, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    (y,) = native.two_piece_forward(x, eta, slope)
    torch.testing.assert_close(y, two_piece_vq(x, eta, slope), **tol)
    gx, geta = native.two_piece_backward(gy, x, eta, slope)
    fx, fe = two_piece_vq_grads(x, eta, slope)
    torch.testing.assert_close(gx, gy * fx, **tol)
    torch.testing.assert_close(geta, (gy * fe).sum(-1, keepdim=True), **tol)
    assert native.two_piece_forward(x.half(), eta.half(), slope) is None  # not for it


@pytest.mark.parametrize("name", MODULES)
def test_the_fast_path_is_the_default_and_computes_the_eager_numbers(name):
    m, x = _module(name)
    y = m(x)
    assert _ran_fused(y)  # the fast path
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, *m.parameters()), g)
    m.fused = False
    y_eager = m(x)
    assert not _ran_fused(y_eager)
    grads_eager = torch.autograd.grad(y_eager, (x, *m.parameters()), g)
    torch.testing.assert_close(y, y_eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # inference runs the compiled forward alone
        m.fused = None
        torch.testing.assert_close(m(x), y_eager.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["relu", "maxout", "pool"])
def test_fast_path_float32_matches_float64(name):
    m, x = _module(name)
    y64 = m(x)
    g = torch.randn_like(y64)
    grads64 = torch.autograd.grad(y64, (x, *m.parameters()), g)
    m = m.float()
    x32 = x.detach().float().requires_grad_(True)
    y32 = m(x32)
    assert _ran_fused(y32)
    grads32 = torch.autograd.grad(y32, (x32, *m.parameters()), g.float())
    torch.testing.assert_close(y32, y64.float(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads32, grads64, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["relu", "maxout", "pool"])
def test_fast_path_double_backward(name):
    # create_graph=True: the fast path's backward recomputes the maths under autograd
    m, x = _module(name)
    f, params = _as_function(m)
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_overlapping_pooling_has_no_fused_kernels():
    m, x = _module("pool")
    m.stride, m.padding = 1, 1
    y = m(x)  # runs eagerly
    assert not _ran_fused(y)
    f, params = _as_function(m)
    assert torch.autograd.gradcheck(f, (x, *params))
    with pytest.raises(RuntimeError, match="no fused kernels"):
        BetaVQMaxPool2d(3, 1, 1, fused=True)(x.float())
    with pytest.raises(RuntimeError, match="no fused kernels"):
        TsallisVQReLU(alpha=1.25, fused=True)(x.float())


def test_fallbacks_tracing_outer_compile_and_func_transforms():
    m, x = _module("relu")
    ref = m(x)
    traced = torch.jit.trace(m, x.detach())  # TorchScript tracing records eager ops
    torch.testing.assert_close(traced(x.detach()), ref.detach())
    outer = torch.compile(m)  # inside an outer compiler: the maths, fused by it
    y = outer(x)
    torch.testing.assert_close(y, ref)
    gx = torch.autograd.grad(y.sum(), x)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(ref.sum(), x)[0])
    gx_func = torch.func.grad(lambda t: m(t).sum())(x.detach())  # torch.func
    torch.testing.assert_close(gx_func, gx)


def test_unsupported_dtype_runs_eagerly_or_raises_when_fused_is_required(
    monkeypatch,
):
    monkeypatch.setattr(fused, "FAST_DTYPES", (torch.float32,))
    m, x = _module("relu")
    y = m(x)
    assert not _ran_fused(y)
    m.fused = False
    torch.testing.assert_close(y, m(x))
    m.fused = True
    with pytest.raises(RuntimeError, match=r"fused=True.*dtype torch\.float64"):
        m(x)
    with pytest.raises(TypeError, match="fused must be"):
        BetaVQReLU(fused="yes")


def test_a_failed_compilation_falls_back_to_the_same_kernels_eagerly(monkeypatch):
    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler found")

        return fail

    monkeypatch.setenv("SMASO_NATIVE", "0")  # no C++ kernels either
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "_FAILED", {})
    monkeypatch.setattr(fused.torch, "compile", no_compiler)
    m, x = _module("leaky")
    y = m(x)  # forward: compilation fails, the kernel runs eagerly
    f, params = _as_function(m)
    assert torch.autograd.gradcheck(f, (x, *params))
    assert any("no C++ compiler" in e for e in fused.compile_errors().values())
    m.fused = False
    torch.testing.assert_close(y, m(x))
    m.fused = True
    with pytest.raises(RuntimeError, match="compile failed earlier"):
        m(x)
    fused._FAILED.clear()
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        m(x)


def test_native_kernels_that_cannot_be_built_leave_the_compiled_ones(monkeypatch):
    monkeypatch.setattr(native, "_STATE", {"error": "RuntimeError: no C++ compiler"})
    assert native.two_piece_forward(torch.ones(2, 3), torch.ones(2, 1), 0.0) is None
    m, x = _module("relu")
    y = m(x)
    assert _ran_fused(y)  # the compiled kernels
    m.fused = False
    torch.testing.assert_close(y, m(x), rtol=1e-12, atol=1e-12)


def test_maths_of_the_fused_kernels_against_autograd_and_closed_forms():
    """The hand-written derivatives equal autograd's, and the maths the modules run
    equals the closed forms of Proposition 7 and Table 1."""
    g = torch.Generator().manual_seed(0)
    xs = 3 * torch.randn(50, 40, generator=g, dtype=DT)
    eta = torch.rand(50, 1, generator=g, dtype=DT) + 0.2
    for slope, alpha in [(0.0, 1.0), (0.1, 1.0), (-1.0, 1.0), (0.0, 2.0), (0.3, 1.5)]:
        t, e = xs.clone().requires_grad_(True), eta.clone().requires_grad_(True)
        y = two_piece_vq(t, e, slope, alpha)
        dx, de = torch.autograd.grad(y.sum(), (t, e))
        fx, fe = two_piece_vq_grads(xs, eta, slope, alpha)
        torch.testing.assert_close(fx, dx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fe.sum(-1, keepdim=True), de)
    torch.testing.assert_close(two_piece_vq(xs, eta), swish(xs, eta))
    torch.testing.assert_close(two_piece_vq(xs, eta, -1.0), beta_vq_abs(xs, eta))
    torch.testing.assert_close(
        two_piece_vq(xs, eta, 0.2), beta_vq_leaky_relu(xs, eta, 0.2)
    )
    torch.testing.assert_close(
        two_piece_vq(xs, eta, 0.0, 2.0), tsallis_vq_relu(xs, eta, 2.0)
    )
    # maxout: against softmax over stacked pieces, derivatives against autograd
    a = torch.randn(50, 3, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(50, 3, generator=g, dtype=DT, requires_grad=True)
    e = eta.clone().requires_grad_(True)
    s = xs.unsqueeze(1) * a.unsqueeze(-1) + b.unsqueeze(-1)
    ref = (torch.softmax(e.unsqueeze(-1) * s, 1) * s).sum(1)
    y = max_affine_vq(xs, a, b, e)
    torch.testing.assert_close(y, ref)
    dy_ds, dy_deta = max_affine_vq_grads(xs, a.detach(), b.detach(), eta)
    ga, gb, ge = torch.autograd.grad(y.sum(), (a, b, e))
    torch.testing.assert_close(torch.stack([d.sum(-1) for d in dy_ds], 1), gb)
    torch.testing.assert_close(torch.stack([(d * xs).sum(-1) for d in dy_ds], 1), ga)
    torch.testing.assert_close(dy_deta.sum(-1, keepdim=True), ge)
    # pooling: (y, lse) against the unfold-based beta-softmax pooling and logsumexp
    img = torch.randn(2, 3, 6, 4, generator=g, dtype=DT)
    eta_c = torch.tensor([0.5, 1.0, 3.0], dtype=DT)
    y, lse = softmax_pool_windows(img, eta_c, 2, 2)
    torch.testing.assert_close(y, beta_softmax_pool2d(img, eta_c, 2))
    w = img.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 3, 3, 2, 4)
    torch.testing.assert_close(lse, torch.logsumexp(eta_c.view(1, 3, 1, 1, 1) * w, -1))
    t = img.clone().requires_grad_(True)
    e = eta_c.clone().requires_grad_(True)
    dt, de = torch.autograd.grad(beta_softmax_pool2d(t, e, 2).sum(), (t, e))
    dx, deta = softmax_pool_grads(img, eta_c, y, lse, 2, 2)
    torch.testing.assert_close(dx, dt)
    torch.testing.assert_close(deta.sum((0, 2, 3)), de)


def test_swish_fused_backward_gradcheck_and_value():
    inp = torch.randn(2, 3, 4, 4, dtype=DT, requires_grad=True)
    eta = torch.rand(1, 3, 1, 1, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, e: swish_fused(t, e, compiled=False), (inp, eta)
    )
    assert torch.allclose(swish_fused(inp, eta, compiled=False), swish(inp, eta))
    y = swish_fused(inp, eta)  # compiled (natural layout: no C++ kernels)
    torch.testing.assert_close(y, swish(inp, eta))
    dx, de = torch.autograd.grad(y.sum(), (inp, eta))
    ex, ee = torch.autograd.grad(swish(inp, eta).sum(), (inp, eta))
    torch.testing.assert_close(dx, ex)
    torch.testing.assert_close(de, ee)
    fixed = eta.detach()  # no gradient wanted for eta: the input-only backward kernel
    assert torch.autograd.gradcheck(
        lambda t: swish_fused(t, fixed, compiled=False), (inp,)
    )


def test_modules_match_the_functional_closed_forms_and_beta_stays_in_unit_interval():
    torch.manual_seed(0)
    inp = torch.randn(4, 3, 6, 6)
    relu = BetaVQReLU(3, beta_init=0.5)
    assert torch.allclose(relu(inp), F.silu(inp), atol=1e-6)
    opt = torch.optim.SGD(relu.parameters(), lr=1.0)
    for _ in range(5):
        opt.zero_grad()
        (relu(inp) ** 2).sum().backward()
        opt.step()
    assert ((relu.beta > 0) & (relu.beta < 1)).all() and relu.beta.shape == (3,)
    assert torch.allclose(relu.eta, relu.beta / (1 - relu.beta), rtol=1e-5)
    assert torch.allclose(
        BetaVQAbs(beta_init=0.5)(inp), inp * torch.tanh(inp), atol=1e-6
    )
    assert torch.allclose(
        BetaVQMaxPool2d(2, beta_init=1 - 1e-7)(inp), F.max_pool2d(inp, 2), atol=1e-4
    )
    assert BetaVQReLU(learnable=False).rho.requires_grad is False


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="beta_init"):
        BetaVQReLU(beta_init=1.0)
    with pytest.raises(ValueError, match="num_channels"):
        BetaVQAbs(num_channels=0)
    with pytest.raises(ValueError, match="channels"):
        BetaVQReLU(4)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="concave"):
        BetaVQLeakyReLU(negative_slope=2.0)
    with pytest.raises(ValueError, match="eta"):
        swish(x, -1.0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        beta_softmax_pool2d(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        beta_softmax_pool2d(torch.randn(1, 3, 4, 4), torch.ones(2))
    with pytest.raises(ValueError, match="equal length"):
        convex_maso([1.0, 2.0], [0.0])
    with pytest.raises(ValueError, match="beta must lie"):
        scalar_beta_maso(*relu_maso(), x, 1.5)


def test_learnable_beta_modules_share_one_constructor():
    """The β-VQ modules set up β through _LearnableBeta; their parameters keep the
    order stored optimiser states were saved in (the maxout's pieces before ρ)."""
    for m in (
        BetaVQReLU(3, beta_init=0.25),
        BetaVQAbs(3, beta_init=0.25),
        BetaVQLeakyReLU(0.1, 3, beta_init=0.25),
        BetaVQMaxPool2d(2, num_channels=3, beta_init=0.25),
        TsallisVQReLU(3, alpha=1.5, beta_init=0.25),
    ):
        assert [n for n, _ in m.named_parameters()] == ["rho"], type(m).__name__
        assert torch.allclose(m.beta, torch.full((3,), 0.25))
    m = BetaVQMaxout(3, pieces=2, learnable=False, fused=False)
    assert [n for n, _ in m.named_parameters()] == ["slopes", "offsets", "rho"]
    assert not m.rho.requires_grad and m.fused is False
    with pytest.raises(ValueError, match="concave"):
        BetaVQLeakyReLU(2.0)
