"""Tests for smaso.experiment.convstudy: the circular smallCNN arms, the denoisers,
the stored-run machinery, and the stored results of the convolution chapter."""

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from smaso.data import TensorData, find_cifar10_subset
from smaso.experiment import convstudy
from smaso.experiment.frame import ResultsError
from smaso.factorial import joint_log_posterior, mutual_coherence
from smaso.layers import layer_maso
from smaso.models import small_cnn
from smaso.orthoconv import bcop_conv2d, cayley_conv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _has_subset():
    try:
        find_cifar10_subset()
    except FileNotFoundError:
        return False
    return True


needs_subset = pytest.mark.skipif(not _has_subset(), reason="no CIFAR-10 subset here")


def convs(model):
    return [m for m in model if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("arm", convstudy.CNN_ARMS)
def test_circular_small_cnn(arm):
    torch.manual_seed(0)
    model = convstudy.circular_small_cnn(arm)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    errors = [
        convstudy.operator_error(c, n)
        for c, n in zip(convs(model), (32, 16, 8), strict=True)
    ]
    if arm in ("cayley", "bcop"):
        assert max(errors) < 1e-5  # every convolution an orthogonal operator
    else:
        assert min(errors[:2]) > 0.1
    # the same initial (raw) weights as the smallCNN it is built from
    torch.manual_seed(0)
    base = small_cnn(version=1, bn_momentum=0.1)
    for c, b in zip(convs(model), convs(base), strict=True):
        raw = c.parametrizations.weight.original if arm != "none" else c.weight
        assert torch.equal(raw.detach(), b.weight.detach())
        assert c.padding_mode == "circular"


@pytest.mark.parametrize("arm", convstudy.CNN_ARMS)
def test_orthogonal_cnn(arm):
    torch.manual_seed(0)
    model = convstudy.orthogonal_cnn(arm, width=8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    square = convstudy.square_layers(model)
    assert [(c.in_channels, c.out_channels, n) for _, c, _, n in square] == [
        (8, 8, 16),
        (8, 8, 8),
    ]
    assert all(model[i] is c and model[i + 1] is bn for i, c, bn, _ in square)
    errors = [convstudy.operator_error(c, n) for _, c, _, n in square]
    coherence = [convstudy.row_coherence(c, n) for _, c, _, n in square]
    if arm in ("cayley", "bcop"):  # orthonormal rows: Theorem 4 applies
        assert max(errors) < 1e-5 and max(coherence) < 1e-5
    else:
        assert min(errors) > 0.1 and min(coherence) > 0.05
    stem = model[0]
    assert stem.in_channels == 3 and not parametrize.is_parametrized(stem)
    with pytest.raises(ValueError, match="arm must be one of"):
        convstudy.orthogonal_cnn("gs")


@pytest.mark.parametrize("make", [cayley_conv2d, bcop_conv2d, None])
def test_row_coherence_against_the_layer_matrix(make):
    torch.manual_seed(1)
    if make is cayley_conv2d:
        conv = make(3, 3, 3, 4)
    elif make is bcop_conv2d:
        conv = make(3, 2, 3)
    else:
        conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")
    conv = conv.double()
    c_in = conv.in_channels
    A, _ = layer_maso([conv, nn.ReLU()], (c_in, 4, 4))
    ref = mutual_coherence(A).item()  # every pair of rows of the dense matrix
    assert abs(convstudy.row_coherence(conv, 4) - ref) < 1e-12


def test_unit_maso_and_restriction_to_the_span():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular").double()
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    units = [(0, 1, 1), (2, 1, 2), (1, 3, 0)]
    A, B = convstudy.unit_maso(conv, bn, 4, units)
    A_ref, B_ref = layer_maso([conv, bn, nn.ReLU()], (2, 4, 4))
    index = [o * 16 + i * 4 + j for o, i, j in units]
    assert (A - A_ref[index]).abs().max() < 1e-12
    assert (B - B_ref[index]).abs().max() < 1e-12
    z = torch.randn(7, 32, dtype=torch.float64)
    A3, z3 = convstudy.restrict_to_span(A, z)
    assert A3.shape == (3, 2, 3) and z3.shape == (7, 3)
    full, short = joint_log_posterior(A, B, z), joint_log_posterior(A3, B, z3)
    assert (full - short).abs().max() < 1e-10
    with pytest.raises(ValueError, match="eval mode"):
        convstudy.unit_maso(conv, bn.train(), 4, units)


def test_circular_small_cnn_errors():
    with pytest.raises(ValueError, match="arm must be one of"):
        convstudy.circular_small_cnn("gs")
    with pytest.raises(ValueError, match="arm must be one of"):
        convstudy.denoiser("haar")


def test_operator_error_of_known_operators():
    ident = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        ident.weight.copy_(torch.eye(2)[:, :, None, None])
    assert convstudy.operator_error(ident, 4) == 0.0
    with torch.no_grad():
        ident.weight.mul_(2.0)
    assert abs(convstudy.operator_error(ident, 4) - 3.0) < 1e-12  # 4 - 1


def test_denoisers_start_from_the_dct():
    y = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = convstudy.denoiser("dct")(y, 0.1)
        for arm in ("cayley", "qr", "free"):
            assert (convstudy.denoiser(arm)(y, 0.1) - ref).abs().max() < 1e-5, arm
        bcop = convstudy.denoiser("bcop")
        assert (bcop.reconstruct(y) - y).abs().max() < 1e-5  # orthogonal, not the DCT
    fixed = convstudy.denoiser("dct")
    assert not any(p.requires_grad for p in fixed.conv.parameters())


def tiny_subset(standardize=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 3, 32, 32, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (96,), generator=g)
    return TensorData(x[:64], y[:64], x[64:], y[64:], 10)


def test_run_cnn_writes_once(tmp_path, monkeypatch):
    monkeypatch.setattr(convstudy, "cifar10_subset", tiny_subset)
    config = convstudy.CnnRun("bcop", 0, epochs=1)
    r = convstudy.run_cnn(config, out_dir=tmp_path)
    path = tmp_path / "cnn-bcop-seed0.json"
    stored = json.loads(path.read_text())
    assert stored["config"]["arm"] == "bcop" and len(stored["history"]) == 1
    assert max(stored["operator_errors"][1:]) < 1e-5  # [0]: the unconstrained stem
    data = tiny_subset()
    with torch.no_grad():  # the stored weights give the stored accuracy
        pred = convstudy.load_cnn(config, tmp_path)(data.x_test).argmax(1)
    assert (pred == data.y_test).double().mean().item() == stored["test_acc"]
    assert r["test_acc"] == stored["test_acc"]
    path.write_text(json.dumps({**stored, "test_acc": -1.0}))
    assert convstudy.run_cnn(config, out_dir=tmp_path)["test_acc"] == -1.0
    assert convstudy.run_cnn(config, out_dir=tmp_path, force=True)["test_acc"] >= 0
    assert set(convstudy.load_results(tmp_path)["cnn"]) == {("bcop", 0)}
    # a stored file of another configuration under the run's name is never returned
    # as the run's, nor replaced without force
    other = convstudy.CnnRun("bcop", 0, epochs=2)
    before = path.read_text()
    with pytest.raises(ResultsError, match="another configuration"):
        convstudy.run_cnn(other, out_dir=tmp_path)
    assert path.read_text() == before


@needs_subset
def test_run_denoise_writes_once(tmp_path, monkeypatch):
    config = convstudy.DenoiseRun("cayley", "beta", steps=2, sigmas=(0.2,))
    r = convstudy.run_denoise(config, out_dir=tmp_path)
    (row,) = r["runs"]
    assert row["sigma"] == 0.2 and row["psnr_reconstruction"] > 100
    assert row["operator_error"] < 1e-5 and len(row["tau"]) == 16
    again = convstudy.run_denoise(config, out_dir=tmp_path)
    assert again == json.loads((tmp_path / "denoise-cayley-beta.json").read_text())
    assert again["runs"] == r["runs"]  # the stored file, not a new run
    with pytest.raises(ResultsError, match="another configuration"):
        convstudy.run_denoise(convstudy.DenoiseRun("cayley", "beta"), tmp_path)
    assert set(convstudy.load_results(tmp_path)["denoise"]) == {("cayley", "beta")}


@needs_subset
def test_grayscale_subset():
    x_train, x_test = convstudy.grayscale_subset()
    assert x_train.shape == (4000, 1, 32, 32) and x_test.shape == (1000, 1, 32, 32)
    assert x_train.min() >= 0 and x_train.max() <= 1


def test_stored_results_match_the_current_configuration():
    results = convstudy.load_results()
    for (arm, seed), r in results["cnn"].items():
        config = convstudy.CnnRun(arm, seed)
        assert convstudy.CNN.status(config) == "same"
        assert len(r["history"]) == config.epochs
        assert convstudy.CNN.path(config).with_suffix(".pt").is_file()
    for (arm, shrink), r in results["denoise"].items():
        assert convstudy.DENOISE.status(convstudy.DenoiseRun(arm, shrink)) == "same"
        assert [x["sigma"] for x in r["runs"]] == list(convstudy.SIGMAS)
    assert set(results["denoise"]) == {
        (a, s) for a in convstudy.DENOISE_ARMS for s in ("soft", "beta")
    }
    assert set(results["cnn"]) == {(a, s) for a in convstudy.CNN_ARMS for s in range(3)}


def test_stored_denoising_results_support_the_chapter():
    den = convstudy.load_results()["denoise"]
    psnr = {k: [x["psnr"] for x in r["runs"]] for k, r in den.items()}
    noisy = [x["psnr_noisy"] for x in den["dct", "soft"]["runs"]]
    for (arm, shrink), r in den.items():
        assert all(p > q + 2 for p, q in zip(psnr[arm, shrink], noisy, strict=True))
        rec = [x["psnr_reconstruction"] for x in r["runs"]]
        err = [x["operator_error"] for x in r["runs"]]
        if arm in ("dct", "cayley", "bcop"):
            assert min(rec) > 100 and max(err) < 1e-5
        else:
            assert max(rec) < 60 and min(err) > 0.01
    for s in ("soft", "beta"):
        for i in range(len(convstudy.SIGMAS)):
            assert psnr["cayley", s][i] > psnr["dct", s][i]
            assert psnr["bcop", s][i] > psnr["dct", s][i]
            assert psnr["free", s][i] > psnr["qr", s][i] > psnr["cayley", s][i]
            assert abs(psnr["cayley", "soft"][i] - psnr["cayley", "beta"][i]) < 0.1


def test_stored_benchmark_orders_the_costs():
    path = convstudy.RESULTS.parents[2] / "benchmarks" / "results" / "orthoconv.json"
    bench = json.loads(path.read_text())
    ratio = {r["arm"]: r["ratio_to_baseline"] for r in bench["cnn"]}
    assert ratio["none"] == 1.0
    assert ratio["cayley-spatial"] > 3 * ratio["cayley"] > 3 * ratio["bcop"]
    assert ratio["cayley"] > max(ratio["bcop"], ratio["qr"])
