"""Is the best configuration really better? Statistics over repeated runs, pure numpy and scipy.

Each configuration (optimizer x lr) is trained ``repeats`` times; repeat r of every configuration uses
the same seed, so the repeats are paired. Following Bouthillier et al., "Accounting for Variance in
Machine Learning Benchmarks" (MLSys 2021), the table gives each configuration's mean and 95 % Student-t
interval over its repeats, and the verdict between the best configuration and the runner-up is the
probability that the best one outperforms it, P(A > B): the share of paired repeats in which its value
is better, ties counting one half, with a seeded percentile-bootstrap interval over the pairs. The
difference is called meaningful when P > 0.75 and the whole interval lies above 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MEANINGFUL_P = 0.75  # Bouthillier et al.'s threshold on P(A > B)
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class ConfigSummary:
    """One row of the comparison table: a configuration's value over its repeats."""

    config: str
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN for one repeat
    ci_low: float  # the Student-t interval of the mean; NaN for one repeat
    ci_high: float


@dataclass(frozen=True)
class Verdict:
    best: str
    runner_up: str
    pairs: int
    wins: float  # paired repeats the best one won, ties counting one half
    p_better: float
    ci_low: float  # percentile-bootstrap interval of p_better over the pairs; NaN with one pair
    ci_high: float
    meaningful: bool
    sentence: str


def summarize(values: dict[str, list[float]], higher_is_better: bool = True) -> list[ConfigSummary]:
    """One row per configuration, best mean first (ties keep the given order)."""
    rows = []
    for config, vals in values.items():
        x = np.asarray(vals, dtype=float)
        n, mean = len(x), float(np.mean(x))
        if n > 1:
            std = float(np.std(x, ddof=1))
            low, high = (stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=std / math.sqrt(n)) if std > 0
                         else (mean, mean))
        else:
            std, low, high = math.nan, math.nan, math.nan
        rows.append(ConfigSummary(config, n, mean, std, float(low), float(high)))
    sign = -1 if higher_is_better else 1
    return sorted(rows, key=lambda r: sign * r.mean)


def win_indicators(best: np.ndarray, other: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """1 where ``best`` did better than ``other`` in a pair, 0.5 for a tie, 0 where it did worse."""
    diff = (best - other) if higher_is_better else (other - best)
    return np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))


def verdict(by_repeat: dict[str, dict[int, float]], higher_is_better: bool = True, seed: int = 0,
            repeats: int = 1) -> Verdict | None:
    """The best configuration (by mean) against the runner-up, over the repeats both have; None when
    fewer than two configurations have a value. ``repeats``: how many were planned: with one, the verdict
    asks for a study with repeats; with more, failed runs that left fewer than two pairs are named as the
    reason."""
    values = {c: [v for _, v in sorted(r.items())] for c, r in by_repeat.items() if r}
    if len(values) < 2:
        return None
    best, runner_up = (row.config for row in summarize(values, higher_is_better)[:2])
    common = sorted(set(by_repeat[best]) & set(by_repeat[runner_up]))
    a = np.array([by_repeat[best][r] for r in common])
    b = np.array([by_repeat[runner_up][r] for r in common])
    wins = win_indicators(a, b, higher_is_better)
    n, p = len(wins), float(np.mean(wins)) if len(wins) else math.nan
    if n > 1:
        res = stats.bootstrap((wins,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                              method="percentile", random_state=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    else:
        low = high = math.nan
    meaningful = n > 1 and p > MEANINGFUL_P and low > 0.5
    won = f"{wins.sum():g} of {n}"
    if n <= 1 and repeats > 1:
        sentence = (f"`{best}` and `{runner_up}` cannot be told apart: {'only one' if n else 'none'} of their "
                    f"{repeats} paired repeats finished for both (the others failed)")
    elif n <= 1:
        sentence = (f"one run per configuration cannot tell `{best}` from `{runner_up}`: run the study again "
                    "with repeats=5 to compare them over paired repeats")
    elif meaningful:
        sentence = f"`{best}` beats `{runner_up}` in {won} paired repeats: P = {p:.2f} [{low:.2f}, {high:.2f}]"
    else:
        sentence = (f"`{best}` and `{runner_up}` cannot be told apart: `{best}` wins {won} paired repeats, "
                    f"P = {p:.2f} [{low:.2f}, {high:.2f}] (meaningful when P > {MEANINGFUL_P} and the interval "
                    f"lies above 0.5)")
    return Verdict(best, runner_up, n, float(wins.sum()), p, low, high, meaningful, sentence)
