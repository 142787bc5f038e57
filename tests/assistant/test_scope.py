"""Where the assistant says no: the policies' thresholds, the curve, and estimates made on data they were not
chosen on."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.assistant.scope import (
    CURVE_REJECTED,
    ScopeRefused,
    Share,
    expected_precision,
    moved_to,
    reaching_precision,
    rejecting_at_most,
    shortfalls,
    tune_scope,
)
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.metrics import REJECTED_SCORE


def precision_at(threshold, in_scope, out, share):
    rates = np.array([(in_scope >= threshold).mean()]), np.array([(out >= threshold).mean()])
    return expected_precision(*rates, share)[0]


def test_by_default_the_threshold_turns_away_the_allowed_share_and_not_one_message_more():
    rng = np.random.default_rng(0)
    in_scope, out = rng.beta(5, 2, 1000), rng.beta(2, 4, 300)
    ordered = np.sort(in_scope)
    for share in (0.01, 0.03, 0.05, 0.2):
        threshold = rejecting_at_most(share)(in_scope, out)
        assert (in_scope < threshold).mean() <= share
        kept = ordered[ordered >= threshold][0]
        assert 0 < kept - threshold <= 1e-4  # just below the first message it keeps
        assert (in_scope <= kept).mean() > share  # one step higher turns away one more
    # The out-of-scope examples cannot move it: easy ones, hard ones, or none.
    assert rejecting_at_most(0.05)(in_scope, out) == rejecting_at_most(0.05)(in_scope, out[:0])


def test_a_precision_target_is_met_with_as_much_in_scope_recall_as_it_allows():
    rng = np.random.default_rng(0)
    in_scope, out = rng.beta(5, 2, 2000), rng.beta(2, 4, 300)
    candidates = np.unique(np.concatenate([in_scope, out]))
    for target in (0.9, 0.95, 0.99):
        threshold = reaching_precision(target, 0.2)(in_scope, out)
        # Brute force: the lowest candidate above which every candidate reaches the target.
        reaches = np.array([precision_at(t, in_scope, out, 0.2) >= target for t in candidates])
        safe = next(i for i in range(len(candidates)) if reaches[i:].all())
        assert (in_scope >= threshold).mean() == pytest.approx((in_scope >= candidates[safe]).mean())
        assert (out >= threshold).mean() <= (out >= candidates[safe]).mean()


def test_the_mix_of_the_tuning_examples_does_not_move_a_precision_threshold():
    rng = np.random.default_rng(1)
    in_scope, out = rng.beta(5, 2, 100), rng.beta(2, 4, 100)
    few = reaching_precision(0.95, 0.1)(in_scope, out)
    assert few == reaching_precision(0.95, 0.1)(in_scope, np.tile(out, 20))  # 20x the off-topic examples
    assert reaching_precision(0.95, 0.4)(in_scope, out) > few


def test_a_precision_threshold_that_only_touches_the_target_is_not_taken_nor_sits_on_an_off_topic_score():
    # At 0.3 precision touches 0.6, at 0.5 it falls back to 0.5; only from 0.9 up does it hold.
    assert reaching_precision(0.6, 0.5)(np.array([0.1, 0.3, 0.9, 0.95]), np.array([0.2, 0.5])) == 0.9
    assert reaching_precision(0.6, 0.5)(np.array([0.9]), np.array([0.5, 0.6])) == 0.9
    assert reaching_precision(0.95, 0.1)(np.array([0.1, 0.2]), np.array([0.9])) > 0.9


def test_the_estimate_is_not_made_on_the_examples_the_threshold_was_tuned_on():
    """With a handful of out-of-scope examples, a precision target puts the threshold just above them, so
    measured on those same examples it catches more than it will on new traffic. The estimate comes from the
    folds each threshold was not chosen on, and is as likely to be low as high."""
    rng = np.random.default_rng(7)
    fresh_out = rng.beta(3, 3, 200_000)  # new traffic, from the same source as the examples
    own_errors, estimate_errors = [], []
    for seed in range(100):
        draw = np.random.default_rng(seed)
        in_scope, out = draw.beta(8, 2, 300), draw.beta(3, 3, 6)
        tuned = tune_scope(in_scope, out, max_in_scope_rejected=0.99, target_precision=0.95)
        truth = (fresh_out < tuned.threshold).mean()
        own_errors.append((out < tuned.threshold).mean() - truth)
        estimate_errors.append(tuned.out_of_scope_caught.value - truth)
    assert np.mean(own_errors) > 0.08  # measured on its own examples: flattering
    assert abs(np.mean(estimate_errors)) < 0.03


def test_the_interval_says_how_sure_the_estimate_is():
    wide, narrow = Share.of(8, 10), Share.of(800, 1000)
    assert wide.low < narrow.low < 0.8 < narrow.high < wide.high
    assert str(narrow) == "80.0% [77.4%–82.4%]"
    assert Share.of(0, 0) == Share(0.0, 0.0, 1.0, 0)


def test_a_precision_target_that_would_turn_away_more_than_allowed_is_refused():
    rng = np.random.default_rng(3)
    in_scope, out = rng.beta(5, 2, 400), rng.beta(5, 2, 400)  # the examples look just like the intents
    with pytest.raises(ScopeRefused, match=r"would turn away \d+\.\d% of in-scope messages, more than .* \(5%\)"):
        tune_scope(in_scope, out, max_in_scope_rejected=0.05, target_precision=0.99)
    assert (in_scope < tune_scope(in_scope, out, max_in_scope_rejected=0.05).threshold).mean() <= 0.05
    with pytest.raises(TuneloopError, match="needs out-of-scope examples"):
        tune_scope(in_scope, out[:1], max_in_scope_rejected=0.05, target_precision=0.99)


def test_the_curve_goes_from_nothing_turned_away_to_everything_and_a_person_can_move_along_it():
    rng = np.random.default_rng(4)
    in_scope, out = rng.beta(6, 2, 500), rng.beta(2, 4, 200)
    tuned = tune_scope(in_scope, out, max_in_scope_rejected=0.05)
    rejected = [p.in_scope_rejected for p in tuned.curve]
    caught = [p.out_of_scope_caught for p in tuned.curve]
    assert rejected == sorted(rejected) and caught == sorted(caught)
    assert rejected[0] == 0.0 and rejected[-1] >= CURVE_REJECTED[-2]
    assert tuned.threshold in [p.threshold for p in tuned.curve]  # the policy's point is on it
    point = tuned.curve[len(tuned.curve) // 2]
    moved = moved_to(tuned, point.threshold + 1e-7, "key:ops", "2026-01-01T00:00:00+00:00")
    assert moved.threshold == point.threshold and moved.chosen_by == "key:ops"
    assert moved.in_scope_rejected.value == pytest.approx(point.in_scope_rejected, abs=1 / 500)
    assert moved.out_of_scope_caught.value == pytest.approx(point.out_of_scope_caught, abs=1 / 200)


def test_a_point_that_misses_what_the_definition_asks_says_so():
    rng = np.random.default_rng(5)
    hard = tune_scope(rng.beta(5, 2, 400), rng.beta(4, 2, 200), max_in_scope_rejected=0.05)
    [note] = shortfalls(hard, 0.05, 0.85)
    assert note.startswith(f"expected to catch {hard.out_of_scope_caught} of out-of-scope messages, short of")
    easy = tune_scope(rng.beta(8, 1, 400), rng.beta(1, 8, 200), max_in_scope_rejected=0.05)
    assert shortfalls(easy, 0.05, 0.85) == []
    blind = tune_scope(rng.beta(8, 1, 400), np.array([]), max_in_scope_rejected=0.05)
    assert "no out-of-scope examples" in shortfalls(blind, 0.05, 0.85)[0]


def test_answers_of_the_out_of_scope_label_spend_the_share_first_and_stay_turned_away():
    """Review finding: with more validation messages answered out_of_scope than the share allows, the threshold
    sat on their score, and a message answered out_of_scope no longer counted as caught."""
    in_scope = np.r_[np.full(8, REJECTED_SCORE), np.linspace(0.5, 1.0, 92)]
    out = np.r_[np.full(30, REJECTED_SCORE), np.linspace(0.6, 0.9, 70)]
    threshold = rejecting_at_most(0.05)(in_scope, out)
    assert REJECTED_SCORE < threshold < 0.5  # nothing else turned away: the label already spent more than 5%
    assert (out < threshold).sum() == 30
    assert (in_scope < rejecting_at_most(0.2)(in_scope, out)).mean() == 0.2
    answered = tune_scope(
        in_scope, out, max_in_scope_rejected=0.05
    )  # served, and the start says why it turns away more
    assert (
        answered.threshold < 0.5 and "answers scope.label for 8.0% of in-scope validation messages" in answered.notes[0]
    )
