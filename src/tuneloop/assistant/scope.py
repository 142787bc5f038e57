"""Out-of-scope detection: a confidence threshold tuned to a target in-scope precision.

A message is accepted as in scope when the intent model's confidence reaches the threshold. Of the
accepted messages, the share that really are in scope is the in-scope precision. The threshold is tuned
on held-out data (validation messages of the known intents plus out-of-scope examples): the lowest one
above which precision never falls below the target, which keeps as many in-scope messages as the target
safely allows.

Precision depends on how much of the traffic is out of scope, and the tuning data's mix says nothing about
that (a user may bring 1,000 off-topic examples and 70 validation messages). So precision is computed
from the two acceptance rates at the share of out-of-scope traffic the user expects:
    precision = (1 − π)·accepted_in / ((1 − π)·accepted_in + π·accepted_out),  π = out_of_scope_share.
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
    out_of_scope_share: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def expected_precision(accepted_in: np.ndarray, accepted_out: np.ndarray, out_of_scope_share: float) -> np.ndarray:
    """In-scope precision from the acceptance rates of each kind, at a share of out-of-scope traffic."""
    kept_in, kept_out = (1 - out_of_scope_share) * accepted_in, out_of_scope_share * accepted_out
    total = kept_in + kept_out
    return np.divide(kept_in, total, out=np.ones_like(total, dtype=float), where=total > 0)


def tune_threshold(
    in_scope: np.ndarray, out_of_scope: np.ndarray, target_precision: float, out_of_scope_share: float = 0.1
) -> ScopeThreshold:
    """The confidence threshold for a target in-scope precision, at the expected out-of-scope share."""
    in_scope, out_of_scope = np.asarray(in_scope, dtype=float), np.asarray(out_of_scope, dtype=float)
    if not len(in_scope) or not len(out_of_scope):
        raise TuneloopError("tuning the out-of-scope threshold needs in-scope and out-of-scope examples")
    candidates = np.unique(np.concatenate([in_scope, out_of_scope]))
    # For every candidate threshold at once: the share of each kind scoring at or above it.
    accepted_in = (len(in_scope) - np.searchsorted(np.sort(in_scope), candidates, side="left")) / len(in_scope)
    accepted_out = (len(out_of_scope) - np.searchsorted(np.sort(out_of_scope), candidates, side="left")) / len(
        out_of_scope
    )
    precision = expected_precision(accepted_in, accepted_out, out_of_scope_share)
    # Precision is not monotonic in the threshold, so a threshold that merely touches the target could
    # fall short again just above it: take the lowest one above which it never does.
    falling_short = np.flatnonzero(precision < target_precision)
    start = falling_short[-1] + 1 if len(falling_short) else 0
    # Raising it to the next in-scope score keeps every in-scope message and rejects more off-topic ones.
    above = in_scope[in_scope >= candidates[start]] if start < len(candidates) else in_scope[:0]
    threshold = float(above.min()) if len(above) else float(np.nextafter(out_of_scope.max(), np.inf))
    in_recall, out_accepted = float((in_scope >= threshold).mean()), float((out_of_scope >= threshold).mean())
    return ScopeThreshold(
        threshold=threshold,
        target_precision=target_precision,
        precision=float(expected_precision(np.array([in_recall]), np.array([out_accepted]), out_of_scope_share)[0]),
        in_scope_recall=in_recall,
        out_of_scope_recall=1 - out_accepted,
        in_scope_examples=len(in_scope),
        out_of_scope_examples=len(out_of_scope),
        out_of_scope_share=out_of_scope_share,
    )
