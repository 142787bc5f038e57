"""Retrain a candidate from the production version's frozen data plus the users' corrections."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tuneloop.config import FeedbackConfig, load_config
from tuneloop.data.clean import dedup_key
from tuneloop.data.prepare import PreparedData, fingerprint_of, length_percentiles, load_prepared, split_summary
from tuneloop.errors import TuneloopError
from tuneloop.feedback.export import FeedbackExamples, feedback_examples
from tuneloop.feedback.log import PredictionLog
from tuneloop.models.encoders import resolve_encoder
from tuneloop.registry.store import Registry
from tuneloop.train.run import RunOutcome, run_training, token_counter

log = logging.getLogger(__name__)

# Feedback rows carry no source row number; this marks them in the splits.
FEEDBACK_ROW = -1
# Sections that describe where things run, not how the model was trained: taken from the caller. The
# feedback section is part of the recipe: a holdout share that changed between retrains would move
# examples from one side to the other.
ENVIRONMENT_SECTIONS = ("registry", "serve", "gate")


@dataclass
class RetrainOutcome:
    run: RunOutcome
    parent: str
    feedback: dict


def in_holdout(text: str, fraction: float) -> bool:
    """Whether a feedback text is kept out of training for the gate.

    Decided by a hash of the text, not a random draw, so an example stays on the same side in every
    retrain: no later candidate trains on what an earlier gate scored.
    """
    digest = hashlib.sha256(dedup_key(text).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def retraining_data(
    frozen: PreparedData, feedback: FeedbackExamples, config: FeedbackConfig, source: str
) -> PreparedData:
    """Production's splits plus feedback: corrections replace training rows with the same text, the
    test split stays exactly as it was, and a hash-chosen share of the feedback is held out."""
    examples = feedback.examples
    keys = examples["text"].map(dedup_key)
    in_test = keys.isin(set(frozen.test["text"].map(dedup_key)))
    usable = examples[~in_test]
    held = usable["text"].map(lambda t: in_holdout(t, config.holdout)).astype(bool)
    learn, holdout = usable[~held], usable[held]
    superseded = set(keys[~in_test])

    def without_feedback_texts(split: pd.DataFrame) -> pd.DataFrame:
        return split[~split["text"].map(dedup_key).isin(superseded)]

    train, val = without_feedback_texts(frozen.train), without_feedback_texts(frozen.val)
    added = pd.DataFrame({"row": FEEDBACK_ROW, "text": learn["text"], "label": learn["label"]})
    splits = {
        "train": pd.concat([train, *[added] * config.repeat], ignore_index=True),
        "val": val.reset_index(drop=True),
        "test": frozen.test.reset_index(drop=True),
    }
    labels = sorted(set(frozen.labels) | set(learn["label"]))
    report = {
        "source": source,
        "rows_read": len(frozen.train) + len(frozen.val) + len(frozen.test) + len(examples),
        "rows_kept": sum(len(s) for s in splits.values()),
        "dropped": {
            "superseded_by_feedback": len(frozen.train) + len(frozen.val) - len(train) - len(val),
            "feedback_in_test_split": int(in_test.sum()),
        },
        "conflicts": feedback.conflicts[:50],
        "conflict_policy": "latest feedback wins",
        **split_summary(splits, labels),
        "text_length": frozen.report.get("text_length", {}),
        "kfold": None,
        "feedback": {**feedback.counts, "train": len(learn), "holdout": len(holdout), "repeat": config.repeat},
    }
    report["fingerprint"] = fingerprint_of(splits)
    holdout_frame = holdout[["text", "label", "source", "prediction_id"]].reset_index(drop=True)
    return PreparedData(
        splits=splits, labels=labels, report=report, fingerprint=report["fingerprint"], holdout=holdout_frame
    )


def retrain(
    name: str, config_file: Path | None = None, overrides: list[str] | None = None, show_progress: bool = True
) -> RetrainOutcome:
    """Train a candidate of `name` on its production data plus feedback; registered with the parent."""
    settings = load_config(config_file, overrides)
    registry = Registry(settings.registry)
    production = registry.get(f"{name}@production")
    recipe = {k: v for k, v in production.config.items() if k not in ENVIRONMENT_SECTIONS}
    if recipe.get("tasks"):
        raise TuneloopError(
            f"{production.ref} is a multi-task model ({', '.join(recipe['tasks'])}); retraining from "
            f"feedback works on single-task models only: add the corrections to the task's file "
            f"and run tuneloop train again"
        )
    config = load_config(config_file, overrides, base=recipe)
    config.name = name  # a name in the caller's config file must not send the candidate elsewhere
    config.data.kfold = None  # the splits are given; folds of production's own data do not apply
    feedback_log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    try:
        examples = feedback_examples(feedback_log.feedback_for(name), config.feedback.include_confirmed)
    finally:
        feedback_log.close()
    if examples.examples.empty:
        raise TuneloopError(f"no feedback with a label for '{name}' yet: send corrections to /v1/feedback first")
    frozen = load_prepared(registry.artifacts(production) / "data")
    data = retraining_data(
        frozen,
        examples,
        config.feedback,
        source=f"{production.ref} frozen splits + {len(examples.examples)} feedback examples",
    )
    encoder = resolve_encoder(production.base_model, config.registry.home)
    data.report["text_length"] = length_percentiles(
        pd.concat([s["text"] for s in data.splits.values()]).tolist(), token_counter(encoder)
    )
    log.info("retraining %s with %s", production.ref, data.report["feedback"])
    outcome = run_training(config, prepared=(data, encoder), parent=production.ref, show_progress=show_progress)
    return RetrainOutcome(run=outcome, parent=production.ref, feedback=data.report["feedback"])
