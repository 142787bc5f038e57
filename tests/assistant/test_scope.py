"""Tuning the out-of-scope threshold to a target in-scope precision."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.assistant.scope import expected_precision, tune_threshold
from tuneloop.errors import TuneloopError


def test_separable_scores_give_full_precision_and_recall():
    result = tune_threshold(np.array([0.9, 0.8, 0.95]), np.array([0.2, 0.3]), 0.95)
    assert 0.3 < result.threshold <= 0.8
    assert (result.precision, result.in_scope_recall, result.out_of_scope_recall) == (1.0, 1.0, 1.0)


def precision_at(threshold, in_scope, out, share):
    rates = np.array([(in_scope >= threshold).mean()]), np.array([(out >= threshold).mean()])
    return expected_precision(*rates, share)[0]


def test_the_target_is_met_with_as_much_in_scope_recall_as_it_allows():
    rng = np.random.default_rng(0)
    in_scope, out = rng.beta(5, 2, 2000), rng.beta(2, 4, 300)
    candidates = np.unique(np.concatenate([in_scope, out]))
    for target in (0.9, 0.95, 0.99):
        result = tune_threshold(in_scope, out, target, out_of_scope_share=0.2)
        assert result.precision == pytest.approx(precision_at(result.threshold, in_scope, out, 0.2))
        # Brute force: the lowest candidate above which every candidate reaches the target.
        reaches = np.array([precision_at(t, in_scope, out, 0.2) >= target for t in candidates])
        safe = next(i for i in range(len(candidates)) if reaches[i:].all())
        best_recall = (in_scope >= candidates[safe]).mean()
        assert result.in_scope_recall == pytest.approx(best_recall)
        assert (out >= result.threshold).mean() <= (out >= candidates[safe]).mean()
    assert tune_threshold(in_scope, out, 0.99).in_scope_recall < tune_threshold(in_scope, out, 0.9).in_scope_recall


def test_the_mix_of_the_tuning_examples_does_not_move_the_threshold():
    rng = np.random.default_rng(1)
    in_scope, out = rng.beta(5, 2, 100), rng.beta(2, 4, 100)
    few = tune_threshold(in_scope, out, 0.95, out_of_scope_share=0.1)
    many = tune_threshold(in_scope, np.tile(out, 20), 0.95, out_of_scope_share=0.1)  # 20x the off-topic examples
    assert few.threshold == many.threshold
    assert tune_threshold(in_scope, out, 0.95, out_of_scope_share=0.4).threshold > few.threshold


def test_a_threshold_that_only_touches_the_target_is_not_taken():
    # At 0.3 precision touches 0.6, at 0.5 it falls back to 0.5; only from 0.9 up does it hold.
    result = tune_threshold(np.array([0.1, 0.3, 0.9, 0.95]), np.array([0.2, 0.5]), 0.6, out_of_scope_share=0.5)
    assert result.threshold == 0.9 and result.precision == 1.0


def test_the_threshold_never_sits_on_an_out_of_scope_score():
    result = tune_threshold(np.array([0.9]), np.array([0.5, 0.6]), 0.6, out_of_scope_share=0.5)
    assert result.threshold == 0.9 and result.out_of_scope_recall == 1.0


def test_no_reachable_target_accepts_only_what_beats_every_out_of_scope_score():
    result = tune_threshold(np.array([0.1, 0.2]), np.array([0.9]), 0.95)
    assert result.threshold > 0.9 and result.in_scope_recall == 0.0


def test_needs_both_kinds():
    with pytest.raises(TuneloopError, match="needs in-scope and out-of-scope"):
        tune_threshold(np.array([0.5]), np.array([]), 0.9)
