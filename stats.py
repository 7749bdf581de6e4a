"""95 % intervals for probe accuracies and the comparison rule of the experiment report (pure, no scipy).

Over several seeds an arm's accuracy gets Student's t-interval on the seeds' mean; a single run gets the binomial
(Wilson) interval of its test-set accuracy, the only uncertainty one run can show. Two results differ only when
their intervals do not overlap, so a verdict never reads a difference out of noise:

    lo, hi = accuracy_interval([71.2, 73.0, 72.1], num_test=10000)     # t-interval, 2 degrees of freedom
    compare((lo, hi), wilson_interval(40.0, 10000))                     # 'better'
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

Z_975 = 1.959963984540054  # standard normal 97.5 % quantile
# Student's t 97.5 % quantiles (two-sided 95 %) for 1..30 degrees of freedom, to 4 decimals.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
BETTER, WORSE, SAME = "better", "worse", "no detectable difference"

Interval = Tuple[float, float]


def t_quantile_975(df: int) -> float:
    """97.5 % quantile of Student's t with `df` degrees of freedom: the table up to 30, then the Cornish-Fisher
    expansion around the normal quantile (error < 1e-4 from df 30 on)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def t_interval(values: Sequence[float]) -> Interval:
    """mean -/+ t(0.975, n-1) * sample std / sqrt(n), for n >= 2 values."""
    n = len(values)
    if n < 2:
        raise ValueError("a t-interval needs at least 2 values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def wilson_interval(acc_percent: float, num_test: int) -> Interval:
    """Wilson score interval (95 %, in %) of an accuracy measured on num_test test images."""
    if num_test < 1:
        raise ValueError(f"num_test must be >= 1, got {num_test}")
    p, n, z2 = acc_percent / 100.0, num_test, Z_975 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_975 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100.0 * max(centre - half, 0.0), 100.0 * min(centre + half, 1.0)


def accuracy_interval(values: Sequence[float], num_test: int) -> Interval:
    """The report's 95 % interval of an arm's accuracy (%): t over seeds, or Wilson for a single run."""
    if len(values) == 1:
        return wilson_interval(values[0], num_test)
    return t_interval(values)


def compare(a: Interval, b: Interval) -> str:
    """'better' / 'worse' when a's interval lies wholly above / below b's, else 'no detectable difference'."""
    if a[0] > b[1]:
        return BETTER
    if a[1] < b[0]:
        return WORSE
    return SAME
