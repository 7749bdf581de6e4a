"""stats.py: the report's 95 % intervals against hand-computed values, and the comparison wording."""
from __future__ import annotations

import math

import pytest

import stats


@pytest.mark.parametrize("df,expected", [
    (1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (30, 2.042),  # printed t tables
    (31, 2.040), (40, 2.021), (60, 2.000), (120, 1.980), (100000, 1.960),  # beyond the table: the expansion
])
def test_t_quantile_matches_printed_tables(df, expected):
    assert stats.t_quantile_975(df) == pytest.approx(expected, abs=1.5e-3)


def test_t_quantile_decreases_smoothly_past_the_table():
    values = [stats.t_quantile_975(df) for df in range(1, 200)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[29] - values[30] < 3e-3  # no jump where the table hands over to the expansion


def test_t_interval_hand_computed():
    # [70, 72, 74]: mean 72, sample std 2, t(0.975, 2) = 4.3027 -> half width 4.3027 * 2 / sqrt(3) = 4.9683
    lo, hi = stats.t_interval([70.0, 72.0, 74.0])
    assert (lo, hi) == pytest.approx((72 - 4.9683, 72 + 4.9683), abs=1e-3)
    # two seeds [60, 62]: std sqrt(2), t(0.975, 1) = 12.7062, half width 12.7062 * sqrt(2) / sqrt(2)
    assert stats.t_interval([60.0, 62.0]) == pytest.approx((61 - 12.7062, 61 + 12.7062), abs=1e-3)
    assert stats.t_interval([5.0, 5.0, 5.0]) == (5.0, 5.0)
    with pytest.raises(ValueError):
        stats.t_interval([1.0])


def test_wilson_interval_hand_computed():
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half = 1.96 * sqrt(0.0025 + 0.000096) / 1.0384 = 0.09617
    assert stats.wilson_interval(50.0, 100) == pytest.approx((40.383, 59.617), abs=1e-3)
    # p = 0: [0, z^2 / (n + z^2)] = [0, 3.8415 / 13.8415]
    assert stats.wilson_interval(0.0, 10) == pytest.approx((0.0, 100 * 3.8415 / 13.8415), abs=1e-3)
    lo, hi = stats.wilson_interval(90.0, 10000)  # CIFAR-10 test set: +/- 0.59 points
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.09 / 10000) * 100, rel=0.01)


def test_accuracy_interval_one_seed_is_binomial_more_seeds_t():
    assert stats.accuracy_interval([50.0], 100) == stats.wilson_interval(50.0, 100)
    assert stats.accuracy_interval([70.0, 72.0, 74.0], 100) == stats.t_interval([70.0, 72.0, 74.0])


@pytest.mark.parametrize("a,b,word", [
    ((60.0, 62.0), (55.0, 59.9), "better"),  # separated, a above
    ((50.0, 52.0), (52.1, 60.0), "worse"),  # separated, a below
    ((50.0, 56.0), (55.0, 60.0), "no detectable difference"),  # overlapping, means differ by 4.5
    ((50.0, 60.0), (54.0, 56.0), "no detectable difference"),  # nested
])
def test_compare_words(a, b, word):
    assert stats.compare(a, b) == word
