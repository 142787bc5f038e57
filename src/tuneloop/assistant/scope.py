"""Out-of-scope detection: a confidence threshold tuned to a target in-scope precision.

A message is accepted as in scope when the intent model's confidence reaches the threshold. Of the
accepted messages, the share that really are in scope is the in-scope precision; the threshold is the
lowest one that keeps it at the target on held-out data (validation messages of the known intents plus
out-of-scope examples), which keeps as many in-scope messages as the target allows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tuneloop.errors import TuneloopError


@dataclass(frozen=True)
class ScopeThreshold:
    threshold: float
    target_precision: float
    precision: float  # in-scope precision reached on the tuning data
    in_scope_recall: float
    out_of_scope_recall: float
    in_scope_examples: int
    out_of_scope_examples: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def tune_threshold(in_scope: np.ndarray, out_of_scope: np.ndarray, target_precision: float) -> ScopeThreshold:
    """The confidence threshold for a target in-scope precision on these scores."""
    in_scope, out_of_scope = np.asarray(in_scope, dtype=float), np.asarray(out_of_scope, dtype=float)
    if not len(in_scope) or not len(out_of_scope):
        raise TuneloopError("tuning the out-of-scope threshold needs in-scope and out-of-scope examples")
    candidates = np.unique(np.concatenate([in_scope, out_of_scope]))
    # For every candidate threshold at once: how many of each kind score at or above it.
    accepted_in = len(in_scope) - np.searchsorted(np.sort(in_scope), candidates, side="left")
    accepted_out = len(out_of_scope) - np.searchsorted(np.sort(out_of_scope), candidates, side="left")
    precision = np.divide(accepted_in, accepted_in + accepted_out, out=np.ones(len(candidates)),
                          where=(accepted_in + accepted_out) > 0)
    # Precision is not monotonic in the threshold: take the lowest one above which it never falls short,
    # not merely the first that touches the target.
    falling_short = np.flatnonzero(precision < target_precision)
    start = falling_short[-1] + 1 if len(falling_short) else 0
    if start < len(candidates):
        threshold = float(candidates[start])
    else:  # accept only what scores above every out-of-scope example
        threshold = float(np.nextafter(out_of_scope.max(), np.inf))
    accepted = in_scope >= threshold
    rejected_out = out_of_scope < threshold
    kept = accepted.sum() + (~rejected_out).sum()
    return ScopeThreshold(
        threshold=threshold, target_precision=target_precision,
        precision=float(accepted.sum() / kept) if kept else 1.0,
        in_scope_recall=float(accepted.mean()), out_of_scope_recall=float(rejected_out.mean()),
        in_scope_examples=len(in_scope), out_of_scope_examples=len(out_of_scope))
