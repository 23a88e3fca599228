"""The statistics of repeated runs (sceneml.comparison) against independent computations: the Student-t
interval by its formula, P(A > B) by counting, the bootstrap interval by resampling by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sceneml.comparison import BOOTSTRAP_RESAMPLES, summarize, verdict, win_indicators

REPEATS = {"sgd-lr0.01": [0.91, 0.93, 0.90, 0.94, 0.92],
           "rmsprop-lr0.001": [0.90, 0.93, 0.89, 0.91, 0.92],
           "adamw-lr0.001": [0.80, 0.85, 0.83, 0.82, 0.84]}


def test_the_table_is_best_first_with_the_student_t_interval_of_the_mean():
    rows = summarize(REPEATS)
    assert [r.config for r in rows] == ["sgd-lr0.01", "rmsprop-lr0.001", "adamw-lr0.001"]
    for row in rows:
        x = np.array(REPEATS[row.config])
        half = stats.t.ppf(0.975, df=len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))  # the textbook formula
        assert (row.n, row.mean, row.std) == (5, pytest.approx(x.mean()), pytest.approx(x.std(ddof=1)))
        assert (row.ci_low, row.ci_high) == (pytest.approx(x.mean() - half), pytest.approx(x.mean() + half))
    lower_first = summarize({"a": [0.3, 0.4], "b": [0.1, 0.2]}, higher_is_better=False)  # e.g. val_loss
    assert [r.config for r in lower_first] == ["b", "a"]


def test_one_repeat_has_no_spread_and_no_interval():
    (row,) = summarize({"adamw-lr0.001": [0.8]})
    assert row.n == 1 and row.mean == 0.8 and all(math.isnan(v) for v in (row.std, row.ci_low, row.ci_high))


def test_p_better_counts_paired_wins_with_ties_as_halves():
    assert list(win_indicators(np.array([3, 2, 1]), np.array([1, 2, 3]))) == [1, 0.5, 0]
    assert list(win_indicators(np.array([3, 2, 1]), np.array([1, 2, 3]), higher_is_better=False)) == [0, 0.5, 1]
    by_repeat = {c: dict(enumerate(v)) for c, v in REPEATS.items()}
    v = verdict(by_repeat, seed=0)
    # sgd vs rmsprop, repeat by repeat: .91>.90, .93=.93, .90>.89, .94>.91, .92=.92 -> 3 wins, 2 ties
    assert (v.best, v.runner_up, v.pairs, v.wins, v.p_better) == ("sgd-lr0.01", "rmsprop-lr0.001", 5, 4.0, 0.8)


def test_the_bootstrap_interval_resamples_the_pairs_with_the_seed():
    by_repeat = {c: dict(enumerate(v)) for c, v in REPEATS.items()}
    v = verdict(by_repeat, seed=3)
    wins = np.array([1, 0.5, 1, 1, 0.5])
    # by hand: resample the 5 pairs with replacement, the same generator scipy draws from
    rng = np.random.default_rng(3)
    means = wins[rng.integers(0, 5, size=(BOOTSTRAP_RESAMPLES, 5))].mean(axis=1)
    assert (v.ci_low, v.ci_high) == (pytest.approx(np.percentile(means, 2.5), abs=0.05),
                                     pytest.approx(np.percentile(means, 97.5), abs=0.05))
    assert verdict(by_repeat, seed=3) == v  # seeded: the same interval again
    assert v.meaningful and v.sentence == f"`sgd-lr0.01` beats `rmsprop-lr0.001` in 4 of 5 paired repeats: " \
                                          f"P = 0.80 [{v.ci_low:.2f}, {v.ci_high:.2f}]"


def test_a_coin_flip_cannot_be_told_apart_and_one_run_cannot_tell():
    close = {"a": {0: 0.9, 1: 0.7, 2: 0.9, 3: 0.7}, "b": {0: 0.8, 1: 0.8, 2: 0.8, 3: 0.8}}
    v = verdict(close)
    assert v.p_better == 0.5 and not v.meaningful
    assert v.sentence.startswith("`b` and `a` cannot be told apart") or v.sentence.startswith("`a` and `b` cannot")
    single = verdict({"adamw-lr0.001": {0: 0.8}, "sgd-lr0.001": {0: 0.7}})
    assert single.pairs == 1 and not single.meaningful and math.isnan(single.ci_low)
    assert single.sentence.startswith("one run per configuration cannot tell `adamw-lr0.001` from `sgd-lr0.001`")
    assert "repeats=5" in single.sentence
    assert verdict({"only": {0: 0.5}}) is None
    # three repeats planned, two of them failed for one configuration or the other: no pair left to ask for
    failed = verdict({"adamw-lr0.001": {0: 0.8, 2: 0.9}, "sgd-lr0.001": {0: 0.7, 1: 0.6}}, repeats=3)
    assert failed.pairs == 1 and not failed.meaningful
    assert failed.sentence == ("`adamw-lr0.001` and `sgd-lr0.001` cannot be told apart: only one of their 3 paired "
                               "repeats finished for both (the others failed)")


def test_every_pair_won_is_p_one_with_an_interval_at_one():
    v = verdict({"lr0.001": {0: 0.9, 1: 0.8, 2: 0.85}, "lr1e-07": {0: 0.2, 1: 0.1, 2: 0.15}})
    assert (v.p_better, v.ci_low, v.ci_high, v.meaningful) == (1.0, 1.0, 1.0, True)
    assert v.sentence == "`lr0.001` beats `lr1e-07` in 3 of 3 paired repeats: P = 1.00 [1.00, 1.00]"
