"""Benchmark: where the assistant says no, with 10 intents of a dataset it has never seen (out of scope).

    python bench/assistant_eval.py [--dataset banking77|hwu64] [--own-examples 100] [--home DIR] [--set ...]

1. 10 intents (seeded) are held out. The intent model (all-MiniLM-L6-v2) trains on the others with the default
   recipe (outlier exposure on tuneloop's shipped off-topic messages); a small English sentiment model trains on
   the demo's sentiment data; the FAQ has one entry per known intent. --home keeps both models for later runs
   (bench/oos_scores.py trains the same intent model).
2. Two settings, each with the default scope policy (at most scope.max_in_scope_rejected of in-scope messages
   turned away): no out-of-scope examples of its own (the start-up estimate then comes from the shipped
   off-topic messages), and --own-examples of them drawn from the held-out intents' *training* texts. For each,
   what the assistant says at start: the expected shares turned away and caught, with their intervals.
   In the same run, the old default (95% in-scope precision at the expected out-of-scope share) as the baseline.
3. Every official *test* message (known and held-out intents) goes through a whole turn (two forward passes, FAQ
   search, reply, escalation), timed one by one; each setting's decision is its threshold on the turn's score
   (the same comparison the turn makes). Also the shipped off-topic messages' held-out part, which nothing trains
   or tunes on. Measured: in-scope turned away, out-of-scope caught, accuracy of the in-scope messages it accepts
   against the plain classifier's on all of them, the estimate's distance from the test, and the whole curve.
Prints one JSON line; written to bench/results/assistant_eval-DATASET.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _common import HeldOutSplit, add_result_options, held_out_options, publish, trained_once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    held_out_options(parser)
    parser.add_argument("--own-examples", type=int, default=100, help="Out-of-scope examples of its own.")
    parser.add_argument(
        "--draws", type=int, default=5, help="Draws of those examples whose start-up estimates are checked."
    )
    parser.add_argument("--limit", type=int, default=None, help="Score only this many test messages (smoke runs).")
    add_result_options(parser)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    split = HeldOutSplit.of(args)
    train, test, held_out, known_train = split.train, split.test, split.held_out, split.known_train
    if args.limit:
        test = test.sample(n=args.limit, random_state=args.seed)
    unseen = split.unseen_train
    draws = [
        unseen.sample(n=min(args.own_examples, len(unseen)), random_state=args.seed + draw)["text"]
        for draw in range(args.draws)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work, home = Path(tmp), args.home or Path(tmp) / "home"
        started = time.perf_counter()
        reused = models(home, known_train, args.overrides)
        training_seconds = time.perf_counter() - started
        write_faq(work, known_train)
        for draw, texts in enumerate(draws):
            texts.to_frame("text").to_csv(work / f"out_of_scope-{draw}.csv", index=False)
        result = evaluate(args, home, work, test, held_out, share=args.held_out / train["label"].nunique())
    publish(
        args,
        f"assistant_eval-{args.dataset}",
        {
            "dataset": args.dataset,
            "held_out_intents": held_out,
            "known_test": int((~test["label"].isin(held_out)).sum()),
            "unknown_test": int(test["label"].isin(held_out).sum()),
            "own_examples": len(draws[0]),
            "training_seconds": round(training_seconds, 1),
            "models_reused": reused,
            "cores": os.cpu_count(),
            **result,
        },
    )


def models(home: Path, known_train: pd.DataFrame, overrides: list[str]) -> bool:
    """The intent and sentiment models in production in `home` (trained unless an earlier run left them)."""
    from tuneloop.demo import packaged_file

    sentiment = pd.read_csv(packaged_file("demo", "data", "sentiment.csv"))
    common = ["model.name=all-MiniLM-L6-v2", *overrides]
    _, intents_reused = trained_once(home, "intents", known_train, "label", common)
    _, mood_reused = trained_once(home, "sentiment", sentiment[sentiment["lang"] == "en"], "sentiment", common)
    return intents_reused and mood_reused


def write_faq(work: Path, known_train: pd.DataFrame) -> None:
    """One FAQ entry per known intent, its question a training message of that intent."""
    faq = known_train.groupby("label").first().reset_index()
    pd.DataFrame(
        {
            "question": faq["text"],
            "answer": "About " + faq["label"].str.replace("_", " ") + ": ...",
            "intent": faq["label"],
        }
    ).to_csv(work / "faq.csv", index=False)


def definition(work: Path, name: str, examples: Path | None, scope: dict):
    """The benchmark's assistant, with these out-of-scope examples of its own (or none)."""
    from tuneloop.assistant.definition import AssistantDefinition

    return AssistantDefinition(
        name=name,
        intent_model="intents",
        sentiment_model="sentiment",
        faq=work / "faq.csv",
        out_of_scope_examples=examples,
        languages=["en"],
        scope=scope,
        escalation={"negative_turns": 0, "min_confidence": 0.0},
    )


def evaluate(args, home: Path, work: Path, test: pd.DataFrame, held_out: list[str], share: float) -> dict:
    """The settings' start-up estimates, then every test message through a whole turn, then what each setting
    does to them."""
    from tuneloop.assistant.runtime import AssistantRuntime
    from tuneloop.assistant.scope import ScopeRefused
    from tuneloop.config import load_config
    from tuneloop.data.off_topic import off_topic_messages
    from tuneloop.registry import Registry

    registry = Registry(load_config(None, [f"registry.home={home}"]).registry)
    old_default = {"target_precision": 0.95, "out_of_scope_share": share}
    own = work / "out_of_scope-0.csv"
    settings = {
        "no examples of its own": (None, {}),
        f"{args.own_examples} examples of its own": (own, {}),
        f"old default (95% precision), {args.own_examples} examples of its own": (own, old_default),
        "old default (95% precision), no examples of its own": (None, old_default),
    }
    runtime = AssistantRuntime(definition(work, "bench-0", None, {}), registry)
    intent, mood = runtime.load_models()
    thresholds = {}
    for index, (key, (examples, scope)) in enumerate(settings.items()):
        try:
            thresholds[key] = AssistantRuntime(definition(work, f"bench-{index}", examples, scope), registry).calibrate(
                intent
            )
        except ScopeRefused as refused:
            thresholds[key] = str(refused)
        said = thresholds[key]
        print(f"{key}: {said if isinstance(said, str) else said.summary()}", file=sys.stderr, flush=True)
    # The first draw's estimate and the other draws': how far from the test a start-up estimate from that many
    # examples lands.
    draws = [
        AssistantRuntime(
            definition(work, f"bench-draw-{draw}", work / f"out_of_scope-{draw}.csv", {}), registry
        ).calibrate(intent)
        for draw in range(args.draws)
    ]
    generic = off_topic_messages("heldout", ["en"])  # nothing trains or tunes on this part
    messages = pd.concat(
        [
            test.assign(kind=np.where(test["label"].isin(held_out), "out", "in")),
            pd.DataFrame({"text": generic["text"], "label": "", "kind": "shipped"}),
        ],
        ignore_index=True,
    )
    turns = whole_turns(runtime, intent, mood, messages["text"].tolist())
    messages = messages.assign(score=turns["score"], predicted=turns["predicted"])
    known = messages[messages["kind"] == "in"]
    return {
        # The plain classifier answers every message with its best intent: the turn's predicted intent.
        "plain_classifier_accuracy": round(float((known["predicted"] == known["label"]).mean()), 4),
        "latency_ms": turns["latency_ms"],
        "auroc": round(auroc(known["score"], messages.loc[messages["kind"] == "out", "score"]), 4),
        "settings": {
            key: threshold if isinstance(threshold, str) else measured(threshold, messages)
            for key, threshold in thresholds.items()
        },
        "curve": curve(thresholds[f"{args.own_examples} examples of its own"], messages),
        "estimates_of_draws": [
            measured(threshold, messages)["estimate_minus_test_points"]["out_of_scope_caught"] for threshold in draws
        ],
    }


def whole_turns(runtime, intent, mood, texts: list[str]) -> dict:
    """Every message through a whole turn, timed; its scope score and predicted intent."""
    latencies, scores, predicted = [], [], []
    for text in texts:
        started = time.perf_counter()
        outcome = runtime.respond(text, intent, mood)
        latencies.append(time.perf_counter() - started)
        scores.append(outcome.scope_score if outcome.predicted_intent != runtime.definition.scope.label else -2.0)
        predicted.append(outcome.predicted_intent)
    return {
        "score": scores,
        "predicted": predicted,
        "latency_ms": {
            "p50": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p95": round(1000 * float(np.percentile(latencies, 95)), 1),
        },
    }


def measured(threshold, messages: pd.DataFrame) -> dict:
    """What a threshold does to the test messages, beside what the assistant expected at start."""
    share = {kind: float((part["score"] < threshold.threshold).mean()) for kind, part in messages.groupby("kind")}
    known = messages[messages["kind"] == "in"]
    kept = known["score"] >= threshold.threshold
    right = known["predicted"] == known["label"]
    estimate = threshold.to_dict()
    return {
        "threshold": round(threshold.threshold, 4),
        "policy": threshold.policy,
        "estimate": {
            "in_scope_rejected": estimate["in_scope_rejected"],
            "out_of_scope_caught": estimate["out_of_scope_caught"],
            "out_of_scope_examples": threshold.out_of_scope_examples,
            "notes": threshold.notes,
        },
        "test": {
            "in_scope_rejected": round(share["in"], 4),
            "out_of_scope_caught": round(share["out"], 4),
            "accepted_in_scope_accuracy": round(float(right[kept].mean()), 4),
            "in_scope_answered_correctly": round(float((kept & right).mean()), 4),
            "shipped_heldout_caught": round(share["shipped"], 4),
        },
        "estimate_minus_test_points": {
            "in_scope_rejected": round(100 * (threshold.in_scope_rejected.value - share["in"]), 2),
            "out_of_scope_caught": round(100 * (threshold.out_of_scope_caught.value - share["out"]), 2),
            "out_of_scope_caught_vs_shipped_heldout": round(
                100 * (threshold.out_of_scope_caught.value - share["shipped"]), 2
            ),
        },
    }


def curve(threshold, messages: pd.DataFrame) -> list[dict]:
    """The whole curve: each point's shares on the tuning data (what the assistant knows) and on the test."""
    known, unknown = messages[messages["kind"] == "in"], messages[messages["kind"] == "out"]
    return [
        {
            "threshold": round(point.threshold, 5),
            "tuning_in_scope_rejected": point.in_scope_rejected,
            "tuning_out_of_scope_caught": point.out_of_scope_caught,
            "test_in_scope_rejected": round(float((known["score"] < point.threshold).mean()), 4),
            "test_out_of_scope_caught": round(float((unknown["score"] < point.threshold).mean()), 4),
        }
        for point in threshold.curve
    ]


def auroc(positive: pd.Series, negative: pd.Series) -> float:
    """How well the score separates in-scope (higher) from out-of-scope messages, threshold-free."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(positive)), np.zeros(len(negative))], np.r_[positive, negative]))


if __name__ == "__main__":
    main()
