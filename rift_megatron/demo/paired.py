"""Paired comparison of two algorithms over seeds: mean difference, 95% interval, sign test.

Runs are paired by seed: the same seed gives both algorithms the same warm-up, prompts, buffer,
data order and sampling seeds, so the per-seed differences carry the comparison and most of the
seed-to-seed variation cancels in them. Two summaries with different assumptions:

* the mean difference with a Student-t 95% interval (assumes roughly normal differences);
* the exact two-sided sign test on the number of seeds where A beat B (assumes nothing about the
  size of the differences; ties are dropped, as usual).

No SciPy here (the project does not depend on it): the t quantiles are the standard table values,
checked in tests/unit/test_paired.py against a numerical integration of the t density.
"""

from __future__ import annotations

import math
import statistics

__all__ = ["T_975", "paired_comparison", "sign_test_p", "t_quantile_975"]

# Two-sided 95% (upper 0.975) quantiles of Student's t for 1..30 degrees of freedom.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(degrees_of_freedom: int) -> float:
    """Upper 0.975 quantile of Student's t; the normal 1.960 beyond the table (30+ seeds: < 4% off)."""
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {degrees_of_freedom}")
    return T_975[degrees_of_freedom - 1] if degrees_of_freedom <= len(T_975) else 1.960


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test p-value for `wins` vs `losses` (ties already dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(a: list[float], b: list[float]) -> dict:
    """Compare per-seed results `a` and `b` (same seeds, same order): a - b per seed, its mean,
    standard error, 95% t-interval, wins / losses / ties of a, and the sign test's p-value."""
    if len(a) != len(b):
        raise ValueError(f"paired results need the same seeds: {len(a)} vs {len(b)} values")
    differences = [x - y for x, y in zip(a, b)]
    n = len(differences)
    mean = statistics.fmean(differences) if differences else None
    error = statistics.stdev(differences) / math.sqrt(n) if n > 1 else None
    half_width = t_quantile_975(n - 1) * error if error is not None else None
    wins, losses = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    return {
        "n": n, "differences": differences, "mean": mean, "standard_error": error,
        "ci95": [mean - half_width, mean + half_width] if half_width is not None else None,
        "wins": wins, "losses": losses, "ties": n - wins - losses, "sign_test_p": sign_test_p(wins, losses),
    }
