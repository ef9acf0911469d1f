"""Multiple comparisons for the book's seed studies: Holm's step-down correction.

The chapters compare several training arms, each over a few seeds, with one test per
comparison (Welch's t-test, from SciPy). Read one at a time at level α, a family of m
such tests finds a "difference" somewhere with probability up to m·α even when there
is none. Holm's method (Holm 1979, Scand. J. Statist. 6:65-70) adjusts the m
p-values so that rejecting every hypothesis whose adjusted p-value is at most α keeps
the probability of *any* false rejection at most α (the family-wise error rate),
under any dependence between the tests. It never rejects less than Bonferroni's
correction does.

Each comparison itself is Welch's t-test (:func:`welch`, unequal variances, SciPy), and
:func:`welch_family` tests a family of comparisons at once with Holm's correction.

This is not an idea of the paper: it is how the book states its statistical verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["bonferroni_halfwidth", "holm", "holm_reject", "welch", "welch_family"]


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (Holm 1979), in the order given.

    Sort the m p-values increasingly, p_(1) <= ... <= p_(m). The adjusted value of the
    i-th smallest is ``max_{j <= i} min(1, (m - j + 1) p_(j))``: each p-value is
    multiplied by the number of hypotheses not yet rejected, and the running maximum
    keeps the adjusted values in the order of the raw ones. Ties get the same value.

    Raises ``ValueError`` for an empty list or a value that is not a probability.

    Args:
        pvalues: the m raw p-values, each in [0, 1] (m ≥ 1).

    Returns:
        the m adjusted p-values, a list of floats in the order of ``pvalues``.

    Example::

        >>> from smaso.stats import holm
        >>> [round(q, 4) for q in holm([0.01, 0.04, 0.03])]
        [0.03, 0.06, 0.06]
    """
    p = [float(v) for v in pvalues]
    if not p:
        raise ValueError("holm needs at least one p-value, got none")
    bad = [v for v in p if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise ValueError(f"p-values must lie in [0, 1], got {bad[:3]}")
    m = len(p)
    order = sorted(range(m), key=p.__getitem__)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def holm_reject(pvalues: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Which hypotheses Holm's procedure rejects at family-wise level ``alpha``.

    ``adjusted <= alpha`` for each adjusted p-value of :func:`holm`.
    """
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return [q <= alpha for q in holm(pvalues)]


def welch(x: Sequence[float], y: Sequence[float]) -> dict:
    """Welch's two-sided t-test of the means of ``x`` and ``y`` (unequal variances):
    ``diff`` (mean of x minus mean of y), its standard error ``se`` =
    sqrt(s_x^2/n_x + s_y^2/n_y) (sample variances, ddof 1), the p-value ``p`` and the
    Welch-Satterthwaite degrees of freedom ``df`` (SciPy's ``ttest_ind``).

    Raises ``ValueError`` if a side has fewer than two values.
    """
    import numpy as np
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(
            f"Welch's test needs at least 2 values a side, got {len(x)} and {len(y)}"
        )
    se = np.hypot(np.std(x, ddof=1) / len(x) ** 0.5, np.std(y, ddof=1) / len(y) ** 0.5)
    test = stats.ttest_ind(x, y, equal_var=False)
    return dict(diff=np.mean(x) - np.mean(y), se=se, p=test.pvalue, df=test.df)


def bonferroni_halfwidth(se: float, df: float, m: int, alpha: float = 0.05) -> float:
    """Half-width of the two-sided interval around a Welch difference (:func:`welch`:
    standard error ``se``, ``df`` degrees of freedom) at level ``1 - alpha / m``: one
    of ``m`` simultaneous intervals (Bonferroni). A difference is significant after
    Bonferroni's correction (``m * p <= alpha``) exactly when it is at least this
    large, so it is also the smallest difference the family can detect; Holm's
    correction rejects whatever Bonferroni's does.

    Args:
        se: the standard error of the difference (> 0).
        df: Welch's degrees of freedom (> 0).
        m: the number of tests in the family (>= 1).
        alpha: the family-wise error rate.

    Returns:
        ``t_{1 - alpha / (2 m)}(df) * se``, in the units of the difference.

    Example::

        >>> from smaso.stats import bonferroni_halfwidth
        >>> round(bonferroni_halfwidth(1.0, 1e9, 1), 3)  # the normal's 1.96
        1.96
    """
    from scipy import stats

    if not (se > 0 and df > 0 and m >= 1 and 0 < alpha < 1):
        raise ValueError(
            f"need se > 0, df > 0, m >= 1 and 0 < alpha < 1, got {se}, {df}, {m}, "
            f"{alpha}"
        )
    return float(stats.t.ppf(1 - alpha / (2 * m), df) * se)


def welch_family(pairs: dict) -> dict:
    """:func:`welch` of each ``key: (x, y)`` of ``pairs``, each result with its
    Holm-adjusted p-value ``holm`` over the family (:func:`holm`).

    Args:
        pairs: ``key: (x, y)``, two sequences of at least two values each per
            comparison.

    Returns:
        ``key:`` the dict of :func:`welch` (``diff``, ``se``, ``p``, ``df``) with
        ``holm`` added, per key of ``pairs`` (an empty dict for no pairs).

    Example::

        >>> from smaso.stats import welch_family
        >>> tests = welch_family({"a": ([1, 2, 3], [4, 5, 6]), "b": ([1, 2], [1, 2])})
        >>> sorted(tests["a"])
        ['df', 'diff', 'holm', 'p', 'se']
        >>> [round(float(tests["a"][k]), 4) for k in ("diff", "p", "holm")]
        [-3.0, 0.0213, 0.0426]
    """
    out = {key: welch(x, y) for key, (x, y) in pairs.items()}
    if out:
        adjusted = holm([t["p"] for t in out.values()])
        for t, q in zip(out.values(), adjusted, strict=True):
            t["holm"] = q
    return out
