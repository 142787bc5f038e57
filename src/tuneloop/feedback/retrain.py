"""Retrain a candidate from the production version's frozen data plus the users' corrections."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tuneloop.config import FeedbackConfig, load_config, stored_recipe
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.data.near_duplicates import best_matches
from tuneloop.data.prepare import (
    PreparedData,
    fingerprint_of,
    load_prepared,
    measure_lengths,
    split_leakage,
    split_summary,
)
from tuneloop.db.lease import model_job_lease
from tuneloop.errors import TuneloopError
from tuneloop.feedback.export import FeedbackExamples, load_feedback
from tuneloop.models.encoders import resolve_encoder, token_counter
from tuneloop.privacy.keyed import home_secret
from tuneloop.privacy.mask import Masker, masked_for_keeping, masker
from tuneloop.registry import Registry
from tuneloop.training import classification
from tuneloop.training.classification import ClassifierOutcome

log = logging.getLogger(__name__)

# Feedback rows carry no source row number; this marks them in the splits.
FEEDBACK_ROW = -1


@dataclass
class RetrainOutcome:
    run: ClassifierOutcome
    parent: str
    feedback: dict[str, Any]


HOLDOUT_SECRET_FILE = "holdout.secret"


def holdout_secret(home: Path) -> bytes:
    """The home's secret for choosing the gate's holdout, made on first use (owner-readable only), the same for
    every process of the home."""
    return home_secret(home, HOLDOUT_SECRET_FILE)


def in_holdout(text: str, fraction: float, secret: bytes) -> bool:
    """Whether a feedback text is kept out of training for the gate.

    Decided by a keyed hash (HMAC) of the text, not a random draw, so an example stays on the same side in every
    retrain (no later candidate trains on what an earlier gate scored); keyed with the home's secret, so whoever
    writes the feedback cannot choose texts the gate will never see.
    """
    digest = hmac.new(secret, dedup_key(text).encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def retraining_data(
    frozen: PreparedData,
    feedback: FeedbackExamples,
    config: FeedbackConfig,
    source: str,
    secret: bytes,
    near_duplicate_threshold: float,
    mask: Masker | None = None,
) -> PreparedData:
    """Production's splits plus feedback: corrections replace training rows with the same text, the
    test split stays exactly as it was, and a share of the feedback chosen by `secret` is held out.

    Feedback that is a test text, or a near-duplicate of one, is not trained on: the gate scores the
    candidate on the test split, and a paraphrase seen in training would lift that score. With `mask`
    (privacy.mask), feedback texts are masked again as they are cleaned for training: a text stored before
    stored texts were cleaned, or escaped more than once, holds personal data only cleaning reveals."""
    examples = feedback.examples
    if mask is not None:
        examples = examples.assign(text=examples["text"].map(lambda text: masked_for_keeping(text, mask, clean_text)))
    keys = examples["text"].map(dedup_key)
    in_test = keys.isin(set(frozen.test["text"].map(dedup_key)))
    near = best_matches(frozen.test["text"].tolist(), examples["text"].tolist(), near_duplicate_threshold)
    near_test = pd.Series(range(len(examples)), index=examples.index).isin(list(near)) & ~in_test
    usable = examples[~in_test & ~near_test]
    held = usable["text"].map(lambda t: in_holdout(t, config.holdout, secret)).astype(bool)
    learn, holdout = usable[~held], usable[held]
    superseded = set(keys[~in_test & ~near_test])

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
            "feedback_near_duplicate_of_test": int(near_test.sum()),
        },
        "conflicts": feedback.conflicts[:50],
        "conflict_policy": "latest feedback wins",
        **split_summary(splits, labels),
        "text_length": frozen.report.get("text_length", {}),
        "kfold": None,
        "feedback": {**feedback.counts, "train": len(learn), "holdout": len(holdout), "repeat": config.repeat},
    }
    report["leakage"] = {**split_leakage(splits, near_duplicate_threshold), "policy": "report"}
    report["fingerprint"] = fingerprint_of(splits)
    holdout_frame = holdout[["text", "label", "source", "prediction_id"]].reset_index(drop=True)
    return PreparedData(
        splits=splits, labels=labels, report=report, fingerprint=report["fingerprint"], holdout=holdout_frame
    )


def retrain(
    name: str, config_file: Path | None = None, overrides: list[str] | None = None, show_progress: bool = True
) -> RetrainOutcome:
    """Train a candidate of `name` on its production data plus feedback; registered with the parent.

    The recipe is the one stored with the production version; `config_file` and `overrides` are laid over
    it (a new learning rate, say) and say where the registry is.
    """
    registry = Registry(load_config(config_file, overrides).registry)
    # One retrain or gate of a model at a time, wherever it is started (server job, cron, a shell).
    with model_job_lease(registry.engine, name, f"retrain {name}"):
        return _retrain(registry, name, config_file, overrides, show_progress)


def _retrain(
    registry: Registry, name: str, config_file: Path | None, overrides: list[str] | None, show_progress: bool
) -> RetrainOutcome:
    production = registry.get(f"{name}@production")
    stored = stored_recipe(production.config)
    if stored.get("tasks"):
        raise TuneloopError(
            f"{production.ref} is a multi-task model ({', '.join(stored['tasks'])}); retraining from "
            f"feedback works on single-task models only: add the corrections to the task's file "
            f"and run tuneloop train again"
        )
    recipe = load_config(config_file, overrides, base=stored)
    recipe.name = name  # a name in the caller's config file must not send the candidate elsewhere
    recipe.data.kfold = None  # the splits are given; folds of production's own data do not apply
    # The teachers answer the corrected texts as they did before the corrections: their soft labels would pull
    # the candidate back towards the mistakes the feedback fixes. The candidate keeps production's shape
    # (model.layers) and learns from the labels alone.
    recipe.train.teachers = []
    examples = load_feedback(recipe.registry, name, recipe.feedback)
    if examples.examples.empty:
        waiting = examples.counts.get("awaiting_review", 0)
        raise TuneloopError(
            f"no feedback with a label for '{name}' may train yet"
            + (
                f": {waiting} feedback rows await review (tuneloop feedback review {name})"
                if waiting
                else ": send corrections to /v1/feedback first"
            )
        )
    frozen = load_prepared(registry.folder(production).data())
    data = retraining_data(
        frozen,
        examples,
        recipe.feedback,
        source=f"{production.ref} frozen splits + {len(examples.examples)} feedback examples",
        secret=holdout_secret(recipe.registry.home),
        near_duplicate_threshold=recipe.data.near_duplicate_threshold,
        mask=masker(recipe.privacy),
    )
    encoder = resolve_encoder(production.base_model, registry)
    measure_lengths(data, token_counter(encoder))
    log.info("retraining %s with %s", production.ref, data.report["feedback"])
    outcome = classification.run(recipe, prepared=(data, encoder), parent=production.ref, show_progress=show_progress)
    return RetrainOutcome(run=outcome, parent=production.ref, feedback=data.report["feedback"])
