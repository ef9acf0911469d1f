"""Tests for smaso.checks: the shared argument checks and their messages."""

import pytest
import torch

from smaso.checks import (
    as_beta,
    as_pair,
    batched,
    check_alpha,
    check_eta,
    check_sigma2,
    choice,
    finite_number,
    nonneg_int,
    positive_int,
)


def test_numbers_and_names():
    assert positive_int("epochs", 3) == 3 and nonneg_int("seed", 0) == 0
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="epochs must be a positive int"):
            positive_int("epochs", bad)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        nonneg_int("seed", -1)
    assert finite_number("lr", 1e-3, 0, low_open=True) == 1e-3
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got 0"):
        finite_number("lr", 0, 0, low_open=True)
    with pytest.raises(ValueError, match=r">= 0 and <= 1, got nan"):
        finite_number("m", float("nan"), 0, 1)
    with pytest.raises(ValueError, match="must be a finite number"):
        finite_number("lam", True)
    assert choice("dataset", "svhn", {"svhn": 1, "cifar10": 2}) == "svhn"
    with pytest.raises(ValueError, match="dataset must be one of svhn, cifar10; got"):
        choice("dataset", "mnist", ("svhn", "cifar10"))


def test_paper_parameters():
    x = torch.zeros(3, dtype=torch.float64)
    assert as_beta(0.5, x).dtype == torch.float64
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
        as_beta(1.5, x)
    with pytest.raises(ValueError, match="eta"):
        check_eta(-1.0, x)
    assert check_sigma2(torch.tensor(2.0)) == 2.0
    with pytest.raises(ValueError, match="sigma2"):
        check_sigma2(0.0)
    with pytest.raises(ValueError, match="alpha"):
        check_alpha(0.5)
    assert as_pair(3) == (3, 3) and as_pair([1, 2]) == (1, 2)
    z, single = batched(torch.ones(4))
    assert z.shape == (1, 4) and single
