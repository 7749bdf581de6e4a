"""Intervals and the one contrast rule of the experiment report (pure numpy and the standard
library, no scipy).

Every comparison the report makes is `compare_arms` on per-image 0/1 correctness, [runs, test
images] per arm, all arms probed on the same test images:

    c = compare_arms(correct_kd, correct_transfer, paired=True, margin=2.0, level=1 - 0.05 / 3)
    c["diff"], c["lo"], c["hi"]    # points
    c["verdict"]                   # 'higher' | 'lower' | 'equivalent' | 'inconclusive'

The interval holds both noise sources of a probe accuracy: which seeds were run (the run-to-run
variance, from >= 2 runs, with a Student t quantile for its few degrees of freedom) and which test
images were drawn (always, paired image by image since every arm sees the same images).
`accuracy_interval` / `wilson_interval` remain for the per-arm table of result files that hold
accuracies only.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

Z_975 = 1.959963984540054  # standard normal 97.5 % quantile
# Student's t 97.5 % quantiles (two-sided 95 %) for 1..30 degrees of freedom, to 4 decimals.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
HIGHER, LOWER, EQUIVALENT, INCONCLUSIVE = "higher", "lower", "equivalent", "inconclusive"
VERDICTS = (HIGHER, LOWER, EQUIVALENT, INCONCLUSIVE)

Interval = Tuple[float, float]


# ----------------------------------------------------------------- quantiles
def t_quantile_975(df: int) -> float:
    """97.5 % quantile of Student's t with `df` degrees of freedom: the table up to 30, then the
    Cornish-Fisher expansion around the normal quantile (error < 1e-4 from df 30 on)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def z_quantile(level: float) -> float:
    """The two-sided normal quantile: P(|Z| < z) = level."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for integer df, the closed-form series (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        term, total = 1.0, 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos, 2/3 cos^3, (2*4)/(3*5) cos^5, ...
            term = math.cos(theta) if k == 1 else term * c2 * (2 * k - 2) / (2 * k - 1)
            total += term
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 1.0
    for k in range(1, df // 2):  # 1, 1/2 cos^2, (1*3)/(2*4) cos^4, ...
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(df: float, level: float = 0.95) -> float:
    """The two-sided Student t quantile, P(|T| < t) = level; a fractional df is rounded down (wider,
    safe)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    df = int(math.floor(df))
    if df > 400:  # the normal quantile with the first Cornish-Fisher term is exact to < 1e-5 here
        z = z_quantile(level)
        return z + (z**3 + z) / (4 * df)
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


# ----------------------------------------------------------------- the contrast
def _run_means_variance(x: np.ndarray) -> np.ndarray:
    """Variance of the mean of x [..., runs, images] from its run means: sample variance of the runs
    / runs."""
    n = x.shape[-2]
    return x.mean(-1).var(-1, ddof=1) / n


def _within_image_variance(x: np.ndarray) -> np.ndarray:
    """Mean over images of the variance across runs: one run's flips, which more runs average
    out."""
    return x.var(-2, ddof=1).mean(-1) if x.shape[-2] > 1 else np.zeros(x.shape[:-2])


def contrast_parts(
    correct_a: np.ndarray, correct_b: np.ndarray, paired: bool
) -> Dict[str, np.ndarray]:
    """diff, seed variance (with its degrees of freedom and its per-run size) and test-set variance
    of mean(A) - mean(B), as fractions; vectorised over leading axes: [..., runs, images] each (the
    simulation tests use this).

    Seed part: the spread of the run means (per-seed differences when paired), a scaled chi-square
    with n - 1 degrees of freedom, so a t quantile is exact for it. Test part: the spread of the
    per-image differences of the arms' mean correctness. Both hold the image-by-run noise (a run's
    flips on single images), which is counted twice: a little wide, never narrow when two seeds
    happen to score the same.
    """
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    num_test = a.shape[-1]
    per_image = a.mean(-2) - b.mean(-2)
    diff = per_image.mean(-1)
    zero = np.zeros_like(diff)
    test_var = per_image.var(-1, ddof=1) / num_test if num_test > 1 else zero
    if paired:
        n = a.shape[-2]
        seed_var = _run_means_variance(a - b) if n > 1 else zero
        df, run_var = np.full_like(diff, max(n - 1, 1)), seed_var * n
        flips = _within_image_variance(a - b) / num_test
    else:
        flips = sum((_within_image_variance(x) / num_test for x in (a, b)), zero)
        parts = [(_run_means_variance(x), x.shape[-2]) for x in (a, b) if x.shape[-2] > 1]
        seed_var = sum((v for v, _ in parts), zero)
        # Welch-Satterthwaite; with no run-to-run variance seen the df only has to be valid
        denom = sum((v**2 / (k - 1) for v, k in parts), zero)
        fallback = float(min((k - 1 for _, k in parts), default=1))
        df = np.where(denom > 0, seed_var**2 / np.where(denom > 0, denom, 1.0), fallback)
        run_var = sum((v * k for v, k in parts), zero)
    identical = (a == b).all((-2, -1)) if a.shape == b.shape else np.zeros(diff.shape, dtype=bool)
    # One image's worth of disagreement at least: a test set on which the arms differ everywhere in
    # the same direction still leaves the next test set undrawn.
    test_var = np.where(identical, 0.0, np.maximum(test_var, 1.0 / num_test**2))
    return {
        "diff": diff,
        "seed_var": seed_var,
        "df": np.maximum(df, 1.0),
        "test_var": test_var,
        "run_var": run_var,
        "flip_var": np.minimum(flips, test_var),
    }


def decide(diff: float, lo: float, hi: float, margin: float) -> str:
    """'equivalent' when the whole interval lies within +/- margin (a difference shown to be smaller
    than the smallest that matters does not matter, even when shown non-zero), else 'higher' /
    'lower' when it excludes
    0, else 'inconclusive'."""
    if -margin < lo and hi < margin:
        return EQUIVALENT
    if lo > 0:
        return HIGHER
    if hi < 0:
        return LOWER
    return INCONCLUSIVE


def compare_arms(
    correct_a: Any, correct_b: Any, paired: bool, margin: float, level: float = 0.95
) -> Dict[str, Any]:
    """Mean accuracy of A minus B (points), its `level` interval over seeds and test images, and the
    verdict.

    correct_a, correct_b: 0/1 arrays [n_runs, n_test] on the same test images; paired: row k of A
    and of B come from the same seed (then n_a == n_b and the seed part uses the per-seed
    differences). Half-width = sqrt((t(level, df) * se_seed)^2 + (z(level) * se_test)^2): a t
    quantile for the few seeds, the normal one for the thousands of images; close to exact when
    either part dominates. With one run per arm there is no seed part: the claim is about these
    runs, not about the seeds they came from.
    """
    a, b = np.atleast_2d(np.asarray(correct_a)), np.atleast_2d(np.asarray(correct_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(
            f"compare_arms needs [runs, images] arrays on the same images, got {a.shape}, {b.shape}"
        )
    if paired and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"paired needs the same runs in both arms, got {a.shape[0]} and {b.shape[0]}"
        )
    if not 0 < level < 1 or margin < 0:
        raise ValueError(f"level must lie in (0, 1) and margin be >= 0, got {level}, {margin}")
    p = {k: float(v) for k, v in contrast_parts(a, b, paired).items()}
    t, z = t_quantile(p["df"], level), z_quantile(level)
    half = math.sqrt(t**2 * p["seed_var"] + z**2 * p["test_var"])
    diff = 100 * p["diff"]
    lo, hi = max(diff - 100 * half, -100.0), min(diff + 100 * half, 100.0)
    return {
        "diff": diff,
        "lo": lo,
        "hi": hi,
        "verdict": decide(diff, lo, hi, margin),
        "n_a": a.shape[0],
        "n_b": b.shape[0],
        "paired": bool(paired),
        "level": level,
        "margin": margin,
        "num_test": a.shape[1],
        "df": p["df"],
        "seed_half": 100 * t * math.sqrt(p["seed_var"]),
        "test_half": 100 * z * math.sqrt(p["test_var"]),
        "run_var": p["run_var"],
        "test_var": p["test_var"],
        "flip_var": p["flip_var"],
        "method": method_text(a.shape[0], b.shape[0], paired, p["df"], level, a.shape[1]),
    }


def method_text(n_a: int, n_b: int, paired: bool, df: float, level: float, num_test: int) -> str:
    test = f"normal test-set part over {num_test} images paired per image"
    pct = f"{100 * level:.4g} %"
    if n_a == 1 and n_b == 1:
        return (
            f"{pct}; one run per arm: {test} only; the claim is about these runs, not their seeds"
        )
    if paired:
        return (f"{pct}; paired by seed ({n_a} seeds): t({int(df)}) on the per-seed differences + "
                f"{test}")
    single = [
        f"{name} has one run: the claim is about that run"
        for name, n in (("A", n_a), ("B", n_b))
        if n == 1
    ]
    return f"{pct}; unpaired ({n_a} vs {n_b} runs): Welch t({int(df)}) over runs + {test}" + (
        "; " + "; ".join(single) if single else ""
    )


def seeds_needed(c: Dict[str, Any], margin: float, limit: int = 1000) -> Optional[int]:
    """Seeds per arm at which this contrast's half-width falls below margin / 2 (then every
    difference resolves: equivalent, higher or lower), at the run-to-run variance seen; the test
    part keeps its image variance while its single-run flips (flip_var) average over the seeds. None
    when the images alone are too few (more test images are needed, not seeds) or no run-to-run
    variance was seen (one run per arm).
    """
    z2 = z_quantile(c["level"]) ** 2
    runs = max(c["n_a"], c["n_b"])
    flips = c.get("flip_var", 0.0) * runs  # the flip variance of one run per arm
    images = c["test_var"] - c.get("flip_var", 0.0)
    if c["run_var"] <= 0 or z2 * images >= (margin / 200) ** 2:
        return None
    for n in range(2, limit + 1):
        seed = t_quantile(n - 1, c["level"]) ** 2 * c["run_var"] / n
        if math.sqrt(seed + z2 * (images + flips / n)) < margin / 200:
            return n
    return None


# ----------------------------------------------------------------- per-arm intervals (accuracies
# only)
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
    p, n, z2 = acc_percent / 100.0, num_test, Z_975**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_975 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100.0 * max(centre - half, 0.0), 100.0 * min(centre + half, 1.0)


def accuracy_interval(values: Sequence[float], num_test: int) -> Interval:
    """An arm's 95 % accuracy interval (%) from accuracies alone, within [0, 100]: the seeds'
    t-interval widened by the test set's binomial half-width at the mean (both noise sources), or
    Wilson for a single run.
    """
    if len(values) == 1:
        return wilson_interval(values[0], num_test)
    lo, hi = t_interval(values)
    mean = sum(values) / len(values)
    test = Z_975 * 100 * math.sqrt(max(mean / 100 * (1 - mean / 100), 0.0) / num_test)
    seed = (hi - lo) / 2
    half = math.sqrt(seed**2 + test**2)
    return max(mean - half, 0.0), min(mean + half, 100.0)
