"""Multiple comparisons for the book's seed studies: Holm's step-down correction.

The chapters compare several training arms, each over a few seeds, with one test per
comparison (Welch's t-test, from SciPy). Read one at a time at level α, a family of m
such tests finds a "difference" somewhere with probability up to m·α even when there
is none. Holm's method (Holm 1979, Scand. J. Statist. 6:65-70) adjusts the m
p-values so that rejecting every hypothesis whose adjusted p-value is at most α keeps
the probability of *any* false rejection at most α (the family-wise error rate),
under any dependence between the tests. It never rejects less than Bonferroni's
correction does.

This is not an idea of the paper: it is how the book states its statistical verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["holm", "holm_reject"]


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (Holm 1979), in the order given.

    Sort the m p-values increasingly, p_(1) <= ... <= p_(m). The adjusted value of the
    i-th smallest is ``max_{j <= i} min(1, (m - j + 1) p_(j))``: each p-value is
    multiplied by the number of hypotheses not yet rejected, and the running maximum
    keeps the adjusted values in the order of the raw ones. Ties get the same value.

    Raises ``ValueError`` for an empty list or a value that is not a probability.
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
