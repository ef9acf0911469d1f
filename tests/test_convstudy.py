"""Tests for smaso.convstudy: the circular smallCNN arms, the denoisers, the stored-run
machinery, and the stored results of the convolution chapter."""

import json

import pytest
import torch
from torch import nn

from smaso import convstudy
from smaso.data import TensorData, find_cifar10_subset
from smaso.models import small_cnn

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
    monkeypatch.setitem(convstudy.CNN_CONFIG, "epochs", 1)
    r = convstudy.run_cnn("bcop", 0, out_dir=tmp_path)
    path = tmp_path / "cnn-bcop-seed0.json"
    stored = json.loads(path.read_text())
    assert stored["config"]["arm"] == "bcop" and len(stored["history"]) == 1
    assert max(stored["operator_errors"]) < 1e-5
    assert r["test_acc"] == stored["test_acc"]
    path.write_text(json.dumps({**stored, "test_acc": -1.0}))
    assert convstudy.run_cnn("bcop", 0, out_dir=tmp_path)["test_acc"] == -1.0
    assert convstudy.run_cnn("bcop", 0, out_dir=tmp_path, force=True)["test_acc"] >= 0
    assert set(convstudy.load_results(tmp_path)["cnn"]) == {("bcop", 0)}


@needs_subset
def test_run_denoise_writes_once(tmp_path, monkeypatch):
    monkeypatch.setitem(convstudy.DENOISE_CONFIG, "steps", 2)
    r = convstudy.run_denoise("cayley", "beta", out_dir=tmp_path, sigmas=(0.2,))
    (row,) = r["runs"]
    assert row["sigma"] == 0.2 and row["psnr_reconstruction"] > 100
    assert row["operator_error"] < 1e-5 and len(row["tau"]) == 16
    again = convstudy.run_denoise("cayley", "beta", out_dir=tmp_path)
    assert again == json.loads((tmp_path / "denoise-cayley-beta.json").read_text())
    assert len(again["runs"]) == 1  # the stored file, not a new run
    assert set(convstudy.load_results(tmp_path)["denoise"]) == {("cayley", "beta")}


@needs_subset
def test_grayscale_subset():
    x_train, x_test = convstudy.grayscale_subset()
    assert x_train.shape == (4000, 1, 32, 32) and x_test.shape == (1000, 1, 32, 32)
    assert x_train.min() >= 0 and x_train.max() <= 1


def test_stored_results_match_the_current_configuration():
    results = convstudy.load_results()
    for (arm, seed), r in results["cnn"].items():
        assert r["config"] == {"arm": arm, "seed": seed, **convstudy.CNN_CONFIG}
        assert len(r["history"]) == convstudy.CNN_CONFIG["epochs"]
    for (arm, shrink), r in results["denoise"].items():
        assert r["config"] == {
            "arm": arm,
            "shrink": shrink,
            "seed": 0,
            **convstudy.DENOISE_CONFIG,
        }
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
