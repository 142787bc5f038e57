"""Tuning the out-of-scope threshold to a target in-scope precision."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.assistant.scope import tune_threshold
from tuneloop.errors import TuneloopError


def test_separable_scores_give_full_precision_and_recall():
    result = tune_threshold(np.array([0.9, 0.8, 0.95]), np.array([0.2, 0.3]), 0.95)
    assert 0.3 < result.threshold <= 0.8
    assert (result.precision, result.in_scope_recall, result.out_of_scope_recall) == (1.0, 1.0, 1.0)


def test_the_target_is_met_with_as_much_in_scope_recall_as_it_allows():
    rng = np.random.default_rng(0)
    in_scope, out = rng.beta(5, 2, 2000), rng.beta(2, 4, 300)
    for target in (0.9, 0.95, 0.99):
        result = tune_threshold(in_scope, out, target)
        accepted_in, accepted_out = (in_scope >= result.threshold).sum(), (out >= result.threshold).sum()
        assert accepted_in / (accepted_in + accepted_out) >= target
        lower = np.nextafter(result.threshold, 0)  # one notch lower would miss the target or gain nothing
        more_in, more_out = (in_scope >= lower).sum(), (out >= lower).sum()
        assert more_in == accepted_in or more_in / (more_in + more_out) < target
    assert tune_threshold(in_scope, out, 0.99).in_scope_recall < tune_threshold(in_scope, out, 0.9).in_scope_recall


def test_a_threshold_that_only_touches_the_target_is_not_taken():
    # At 0.5 precision is 2/2 (touches the target) but just above, at 0.55, it falls to 1/2 again.
    result = tune_threshold(np.array([0.5, 0.52, 0.9]), np.array([0.55]), 0.99)
    assert result.threshold > 0.55 and result.precision == 1.0


def test_no_reachable_target_accepts_only_what_beats_every_out_of_scope_score():
    result = tune_threshold(np.array([0.1, 0.2]), np.array([0.9]), 0.95)
    assert result.threshold > 0.9 and result.in_scope_recall == 0.0


def test_needs_both_kinds():
    with pytest.raises(TuneloopError, match="needs in-scope and out-of-scope"):
        tune_threshold(np.array([0.5]), np.array([]), 0.9)
