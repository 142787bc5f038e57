"""Out-of-scope detection: where on the curve the assistant says no, and what it will cost, honestly estimated.

A message is accepted as in scope when the intent model's confidence reaches the threshold. Every threshold is a
point on a curve: the share of in-scope messages it turns away (measured on the intent model's validation split)
against the share of out-of-scope messages it catches (measured on out-of-scope examples). A policy picks the
point:
- by default, the threshold that turns away at most `max_in_scope_rejected` of in-scope messages, which catches
  as many out-of-scope ones as that allows. It needs no out-of-scope example to be set, so examples that do not
  look like the real off-topic traffic cannot move it; they only inform the estimate of what it catches;
- with `target_precision`, the lowest threshold that reaches that in-scope precision at the expected share of
  out-of-scope traffic π (the tuning data's own mix says nothing about that):
      precision = (1 − π)·accepted_in / ((1 − π)·accepted_in + π·accepted_out).
  A threshold so tuned that turns away more than `max_in_scope_rejected` is refused (ScopeRefused), never served.

What the chosen point will do is estimated on data it was not chosen on: k-fold cross-validation over the
validation split and the out-of-scope examples (the threshold chosen on k−1 folds, measured on the k-th), each
share with a 95% Wilson interval. Chosen and measured on the same examples, the estimate flatters: the
precision target's threshold is pulled to wherever the few tuning examples happen to fall.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypedDict

import numpy as np
from scipy.stats import binomtest

from tuneloop.errors import TuneloopError
from tuneloop.evaluate.metrics import threshold_rejecting

# Chooses a threshold from in-scope and out-of-scope scores.
Policy = Callable[[np.ndarray, np.ndarray], float]
# The curve's points: these shares of in-scope messages turned away (finer where operating points live).
CURVE_REJECTED = np.unique(np.r_[np.arange(0, 0.1, 0.005), np.arange(0.1, 0.5, 0.02), np.arange(0.5, 1.0001, 0.05)])


class ScopeRefused(TuneloopError):
    """A tuned threshold that would turn away more in-scope messages than the policy allows."""


@dataclass(frozen=True)
class Share:
    """A share of messages, its 95% interval (Wilson) and how many messages it was measured on."""

    value: float
    low: float
    high: float
    messages: int

    @classmethod
    def of(cls, hits: int, messages: int) -> Share:
        if not messages:
            return cls(0.0, 0.0, 1.0, 0)
        interval = binomtest(int(hits), messages).proportion_ci(method="wilson")
        return cls(hits / messages, float(interval.low), float(interval.high), messages)

    def __str__(self) -> str:
        return f"{self.value:.1%} [{self.low:.1%}–{self.high:.1%}]"


@dataclass(frozen=True)
class CurvePoint:
    """What one threshold does to the tuning data."""

    threshold: float
    in_scope_rejected: float
    out_of_scope_caught: float


@dataclass(frozen=True)
class ScopeThreshold:
    """The operating point an intent-model version answers with, and what it is expected to do."""

    threshold: float
    policy: str  # how the point was chosen, in words
    in_scope_rejected: Share  # expected share of in-scope messages turned away (cross-validated)
    out_of_scope_caught: Share  # expected share of out-of-scope messages caught (cross-validated)
    in_scope_examples: int
    out_of_scope_examples: int
    curve: list[CurvePoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a person should know: a missed goal, examples left out
    chosen_by: str | None = None  # an admin who moved the point, and when
    chosen_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScopeThreshold:
        return cls(
            **{
                **data,
                "in_scope_rejected": Share(**data["in_scope_rejected"]),
                "out_of_scope_caught": Share(**data["out_of_scope_caught"]),
                "curve": [CurvePoint(**point) for point in data["curve"]],
            }
        )

    def summary(self) -> str:
        return (
            f"turns away {self.in_scope_rejected} of in-scope messages and catches {self.out_of_scope_caught} of "
            f"out-of-scope ones like its {self.out_of_scope_examples} examples (threshold {self.threshold:.3f}, "
            f"{self.policy})"
        )


def expected_precision(accepted_in: np.ndarray, accepted_out: np.ndarray, out_of_scope_share: float) -> np.ndarray:
    """In-scope precision from the acceptance rates of each kind, at a share of out-of-scope traffic."""
    kept_in, kept_out = (1 - out_of_scope_share) * accepted_in, out_of_scope_share * accepted_out
    total = kept_in + kept_out
    precision: np.ndarray = np.divide(kept_in, total, out=np.ones_like(total, dtype=float), where=total > 0)
    return precision


def rejecting_at_most(share: float) -> Policy:
    """The highest threshold that turns away at most `share` of the in-scope scores."""
    return lambda in_scope, _: threshold_rejecting(in_scope, share)


def reaching_precision(target: float, out_of_scope_share: float) -> Policy:
    """The lowest threshold above which in-scope precision, at the expected out-of-scope share, never falls
    below `target` (precision is not monotonic in the threshold: one that merely touches the target could fall
    short again just above it)."""

    def choose(in_scope: np.ndarray, out_of_scope: np.ndarray) -> float:
        candidates = np.unique(np.concatenate([in_scope, out_of_scope]))
        precision = expected_precision(
            accepted_share(in_scope, candidates), accepted_share(out_of_scope, candidates), out_of_scope_share
        )
        falling_short = np.flatnonzero(precision < target)
        start = falling_short[-1] + 1 if len(falling_short) else 0
        # Raising it to the next in-scope score keeps every in-scope message and rejects more off-topic ones.
        above = in_scope[in_scope >= candidates[start]] if start < len(candidates) else in_scope[:0]
        return float(above.min()) if len(above) else float(np.nextafter(out_of_scope.max(), np.inf))

    return choose


def accepted_share(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For every threshold at once: the share of `scores` at or above it."""
    return (len(scores) - np.searchsorted(np.sort(scores), thresholds, side="left")) / len(scores)


def scope_curve(in_scope: np.ndarray, out_of_scope: np.ndarray, *also: float) -> list[CurvePoint]:
    """The curve at CURVE_REJECTED's shares of in-scope messages turned away (thresholds from the in-scope
    scores, so every point is one a policy could pick), and at the thresholds `also`."""
    picks = [rejecting_at_most(share)(in_scope, out_of_scope) for share in CURVE_REJECTED]
    thresholds = np.unique([*picks, *also])
    rejected = 1 - accepted_share(in_scope, thresholds)
    caught = 1 - accepted_share(out_of_scope, thresholds) if len(out_of_scope) else np.zeros(len(thresholds))
    return [
        CurvePoint(float(t), round(float(r), 4), round(float(c), 4))
        for t, r, c in zip(thresholds, rejected, caught, strict=True)
    ]


def cross_validated(
    in_scope: np.ndarray, out_of_scope: np.ndarray, policy: Policy, folds: int = 10, seed: int = 0
) -> tuple[Share, Share]:
    """(in-scope turned away, out-of-scope caught) by the threshold `policy` chooses, each measured on the fold it
    was not chosen on and pooled over the folds."""
    rng = np.random.default_rng(seed)
    folds = max(2, min(folds, len(in_scope), max(len(out_of_scope), 2)))
    in_fold = rng.permutation(len(in_scope)) % folds
    out_fold = rng.permutation(len(out_of_scope)) % folds
    rejected = caught = 0
    for k in range(folds):
        threshold = policy(in_scope[in_fold != k], out_of_scope[out_fold != k])
        rejected += int((in_scope[in_fold == k] < threshold).sum())
        caught += int((out_of_scope[out_fold == k] < threshold).sum())
    return Share.of(rejected, len(in_scope)), Share.of(caught, len(out_of_scope))


def tune_scope(
    in_scope: np.ndarray,
    out_of_scope: np.ndarray,
    max_in_scope_rejected: float,
    target_precision: float | None = None,
    out_of_scope_share: float = 0.1,
    folds: int = 10,
) -> ScopeThreshold:
    """The threshold the policy picks on all the tuning data, with its cross-validated estimate and the curve.

    Raises ScopeRefused when a precision target's threshold would turn away more than `max_in_scope_rejected`.
    """
    in_scope, out_of_scope = np.asarray(in_scope, dtype=float), np.asarray(out_of_scope, dtype=float)
    if len(in_scope) < 2:
        raise TuneloopError("tuning the out-of-scope threshold needs in-scope validation messages (two or more)")
    if target_precision is not None and len(out_of_scope) < 2:
        raise TuneloopError("tuning to scope.target_precision needs out-of-scope examples (two or more)")
    if target_precision is None:
        policy, described = rejecting_at_most(max_in_scope_rejected), f"at most {max_in_scope_rejected:.0%} rejected"
    else:
        policy = reaching_precision(target_precision, out_of_scope_share)
        described = f"{target_precision:.0%} in-scope precision at {out_of_scope_share:.0%} out-of-scope traffic"
    threshold = policy(in_scope, out_of_scope)
    rejected_here = float((in_scope < threshold).mean())
    notes = []
    if rejected_here > max_in_scope_rejected + 1e-9 and target_precision is not None:
        raise ScopeRefused(
            f"the scope threshold for {described} would turn away {rejected_here:.1%} of in-scope messages, more "
            f"than scope.max_in_scope_rejected allows ({max_in_scope_rejected:.0%}): its out-of-scope examples score "
            "like in-scope messages"
        )
    if rejected_here > max_in_scope_rejected + 1e-9:  # the threshold turns away nothing: the label does it
        notes.append(
            f"the intent model itself answers scope.label for {rejected_here:.1%} of in-scope validation messages, "
            f"more than scope.max_in_scope_rejected ({max_in_scope_rejected:.0%}): its out-of-scope examples "
            "cover some of its intents"
        )
    rejected, caught = cross_validated(in_scope, out_of_scope, policy, folds)
    return ScopeThreshold(
        threshold=threshold,
        policy=described,
        in_scope_rejected=rejected,
        out_of_scope_caught=caught,
        in_scope_examples=len(in_scope),
        out_of_scope_examples=len(out_of_scope),
        curve=scope_curve(in_scope, out_of_scope, threshold),
        notes=notes,
    )


class ScopeMove(TypedDict):
    """An admin's move of a version's operating point, as kept in the home (threshold None: back to the policy)."""

    threshold: float | None
    by: str
    at: str  # ISO 8601, UTC


def moved_to(tuned: ScopeThreshold, threshold: float, by: str, at: str) -> ScopeThreshold:
    """The curve's point nearest `threshold`, which a person chose, with what the curve says it does (a fixed
    threshold, not fitted to these examples, so the curve's shares are its estimate)."""
    if not tuned.curve:
        raise TuneloopError("this scope threshold has no curve to move along; tune it again")
    point = min(tuned.curve, key=lambda p: abs(p.threshold - threshold))
    return replace(
        tuned,
        threshold=point.threshold,
        policy=f"moved by {by}",
        in_scope_rejected=Share.of(round(point.in_scope_rejected * tuned.in_scope_examples), tuned.in_scope_examples),
        out_of_scope_caught=Share.of(
            round(point.out_of_scope_caught * tuned.out_of_scope_examples), tuned.out_of_scope_examples
        ),
        chosen_by=by,
        chosen_at=at,
    )


def shortfalls(threshold: ScopeThreshold, max_in_scope_rejected: float, min_out_of_scope_caught: float) -> list[str]:
    """What a person should hear about an operating point that misses what the definition asks of it."""
    caught, rejected = threshold.out_of_scope_caught, threshold.in_scope_rejected
    notes = []
    if not caught.messages:
        notes.append(
            "no out-of-scope examples, so what it catches is not known: give out_of_scope_examples, or mark "
            "messages 'out of scope' on the chat or admin page"
        )
    elif caught.value < min_out_of_scope_caught:
        notes.append(
            f"expected to catch {caught} of out-of-scope messages, short of scope.min_out_of_scope_caught "
            f"({min_out_of_scope_caught:.0%}) at {rejected.value:.1%} of in-scope ones turned away: the intent "
            "model's confidence does not tell these apart from its intents. 'Out of scope' corrections teach it at "
            "the next retrain; `tuneloop assistant scope` shows the whole curve"
        )
    if threshold.chosen_by is not None and rejected.value > max_in_scope_rejected + 1e-9:
        notes.append(
            f"turns away {rejected} of in-scope messages, more than scope.max_in_scope_rejected "
            f"({max_in_scope_rejected:.0%})"
        )
    return notes
