"""The study's paired statistics against independent references.

* t quantiles: the central 95% mass of Student's t density, integrated numerically (Simpson's rule
  on the closed-form density), between -q and q for every tabulated q;
* sign test: hand-computed binomial tails;
* the interval: a textbook example worked by hand.
"""

from __future__ import annotations

import math

import pytest

from rift_megatron.demo.paired import T_975, paired_comparison, sign_test_p, t_quantile_975


def _t_density(x: float, df: int) -> float:
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    return norm * (1 + x * x / df) ** (-(df + 1) / 2)


def _central_mass(q: float, df: int, intervals: int = 20000) -> float:
    h = 2 * q / intervals
    total = _t_density(-q, df) + _t_density(q, df)
    for i in range(1, intervals):
        total += (4 if i % 2 else 2) * _t_density(-q + i * h, df)
    return total * h / 3


@pytest.mark.parametrize("df", range(1, len(T_975) + 1))
def test_tabulated_t_quantiles_hold_95_percent(df: int) -> None:
    # Table values are rounded to 3 decimals: the mass is 0.95 to within the density times 0.0005.
    assert _central_mass(t_quantile_975(df), df) == pytest.approx(0.95, abs=2e-4)


def test_beyond_the_table_the_normal_quantile_is_used_and_df_below_one_refused() -> None:
    assert t_quantile_975(31) == 1.960 and t_quantile_975(1000) == 1.960
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_sign_test_matches_hand_computed_binomial_tails() -> None:
    assert sign_test_p(10, 0) == pytest.approx(2 / 1024)           # 2 * 0.5**10
    assert sign_test_p(8, 2) == pytest.approx(2 * 56 / 1024)       # 2 * (1 + 10 + 45) / 1024
    assert sign_test_p(2, 8) == sign_test_p(8, 2)                  # two-sided: symmetric
    assert sign_test_p(5, 5) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(4, 1) == pytest.approx(12 / 32)             # 2 * (1 + 5) / 32


def test_paired_comparison_by_hand() -> None:
    a = [0.60, 0.55, 0.70, 0.65, 0.50]
    b = [0.50, 0.55, 0.60, 0.70, 0.40]
    result = paired_comparison(a, b)
    differences = [0.10, 0.0, 0.10, -0.05, 0.10]
    assert result["differences"] == pytest.approx(differences)
    mean = 0.05
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 4)  # sample standard deviation
    assert result["mean"] == pytest.approx(mean)
    assert result["standard_error"] == pytest.approx(sd / math.sqrt(5))
    assert result["ci95"] == pytest.approx([mean - 2.776 * sd / math.sqrt(5), mean + 2.776 * sd / math.sqrt(5)])
    assert (result["wins"], result["losses"], result["ties"]) == (3, 1, 1)
    assert result["sign_test_p"] == pytest.approx(2 * 5 / 16)  # 3 vs 1: 2 * (1 + 4) / 16


def test_unpaired_lengths_are_refused_and_one_seed_has_no_interval() -> None:
    with pytest.raises(ValueError, match="same seeds"):
        paired_comparison([0.1, 0.2], [0.1])
    single = paired_comparison([0.5], [0.4])
    assert single["standard_error"] is None and single["ci95"] is None and single["wins"] == 1
