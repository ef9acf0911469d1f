"""smaso.stats.holm against two independent references.

* statsmodels' ``multipletests(method="holm")``, a third-party implementation;
* the closure principle (Marcus, Peritz and Gabriel 1976): Holm's procedure is the
  closed testing procedure built on Bonferroni tests, so the adjusted p-value of H_i is
  the largest Bonferroni p-value ``min(1, |S| min_{j in S} p_j)`` over all subsets S
  that contain i. Brute force over the 2^m subsets shares no code or formula with the
  step-down loop of :func:`smaso.stats.holm`.

smaso.stats.welch against statsmodels' ``ttest_ind(usevar="unequal")`` and the standard
error written out by hand.
"""

from __future__ import annotations

import itertools
import random

import pytest
from statsmodels.stats.multitest import multipletests

from smaso.stats import holm, holm_reject, welch, welch_family


def closed_testing_holm(p):
    m = len(p)
    adjusted = []
    for i in range(m):
        worst = 0.0
        others = [j for j in range(m) if j != i]
        for size in range(m):
            for rest in itertools.combinations(others, size):
                S = (i, *rest)
                worst = max(worst, min(1.0, len(S) * min(p[j] for j in S)))
        adjusted.append(worst)
    return adjusted


def random_pvalues(rng, m):
    # a mix of small, moderate and tied values, as a real family of tests gives
    pool = [rng.random() ** 3 for _ in range(m)]
    if m > 2:
        pool[1] = pool[0]  # a tie
    return pool


def test_hand_computed_example():
    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 4*0.01, 3*0.02, 2*0.03, 1*0.5, running max
    p = [0.03, 0.5, 0.01, 0.02]
    assert holm(p) == pytest.approx([0.06, 0.5, 0.04, 0.06], abs=1e-15)
    assert holm_reject(p, 0.05) == [False, False, True, False]


@pytest.mark.parametrize("m", [1, 2, 3, 5, 9, 16])
def test_matches_statsmodels(m):
    rng = random.Random(m)
    for _ in range(2):  # multipletests is slow (~0.4 s a call here)
        p = random_pvalues(rng, m)
        ref_reject, ref_adjusted, _, _ = multipletests(p, alpha=0.05, method="holm")
        assert holm(p) == pytest.approx(list(ref_adjusted), abs=1e-12)
        assert holm_reject(p, 0.05) == [bool(v) for v in ref_reject]


@pytest.mark.parametrize("m", [1, 2, 4, 7, 10])
def test_matches_closed_testing_brute_force(m):
    rng = random.Random(100 + m)
    for _ in range(20):
        p = random_pvalues(rng, m)
        assert holm(p) == pytest.approx(closed_testing_holm(p), abs=1e-12)


def test_never_below_raw_never_above_bonferroni():
    rng = random.Random(7)
    p = random_pvalues(rng, 12)
    for raw, adj in zip(p, holm(p), strict=True):
        assert raw <= adj <= min(1.0, 12 * raw)


@pytest.mark.parametrize("bad", [[], [0.1, -0.01], [1.5], [float("nan")]])
def test_bad_input(bad):
    with pytest.raises(ValueError, match="p-value"):
        holm(bad)


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        holm_reject([0.01], alpha=1.0)


def test_welch_against_statsmodels_and_by_hand():
    from statsmodels.stats.weightstats import ttest_ind

    rng = random.Random(3)
    for _ in range(20):
        x = [rng.gauss(50, 3) for _ in range(rng.randint(2, 7))]
        y = [rng.gauss(52, 1) for _ in range(rng.randint(2, 7))]
        t = welch(x, y)
        _, p, df = ttest_ind(x, y, usevar="unequal")
        assert t["p"] == pytest.approx(p, rel=1e-10)
        assert t["df"] == pytest.approx(df, rel=1e-10)
        mx, my = sum(x) / len(x), sum(y) / len(y)
        vx = sum((v - mx) ** 2 for v in x) / (len(x) - 1)
        vy = sum((v - my) ** 2 for v in y) / (len(y) - 1)
        assert t["diff"] == pytest.approx(mx - my, abs=1e-12)
        assert t["se"] == pytest.approx((vx / len(x) + vy / len(y)) ** 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 values a side"):
        welch([1.0], [1.0, 2.0])


def test_welch_family_adjusts_with_holm():
    rng = random.Random(4)
    pairs = {
        k: ([rng.gauss(0, 1) for _ in range(4)], [rng.gauss(k, 1) for _ in range(4)])
        for k in range(5)
    }
    out = welch_family(pairs)
    assert list(out) == list(pairs)
    ref = multipletests([t["p"] for t in out.values()], method="holm")[1]
    assert [t["holm"] for t in out.values()] == pytest.approx(list(ref), abs=1e-15)
    assert welch_family({}) == {}


def test_bonferroni_halfwidth_solves_the_test_at_its_level():
    """The half-width h is where Welch's two-sided p-value, times m, reaches alpha:
    found by a root finder on SciPy's t survival function, and checked against
    statsmodels' Welch test on data shifted to sit just inside and just outside it."""
    import numpy as np
    from scipy import optimize, stats
    from statsmodels.stats.weightstats import ttest_ind

    from smaso.stats import bonferroni_halfwidth

    rng = random.Random(0)
    for _ in range(20):
        x = [rng.gauss(0, 1) for _ in range(rng.randint(2, 6))]
        y = [rng.gauss(0, 2) for _ in range(rng.randint(2, 6))]
        t = welch(x, y)
        m = rng.randint(1, 12)
        h = bonferroni_halfwidth(t["se"], t["df"], m)
        root = optimize.brentq(
            lambda d, t=t, m=m: m * 2 * stats.t.sf(d / t["se"], t["df"]) - 0.05,
            1e-12,
            1e6,
            xtol=1e-14,
        )
        assert h == pytest.approx(root, rel=1e-9)
        # shift x so that the difference is just inside and just outside h
        for factor, significant in ((0.999, False), (1.001, True)):
            shift = factor * h - (np.mean(x) - np.mean(y))
            p = ttest_ind([v + shift for v in x], y, usevar="unequal")[1]
            assert (min(1.0, m * p) <= 0.05) == significant
    with pytest.raises(ValueError, match="se > 0"):
        bonferroni_halfwidth(0.0, 3.0, 2)
