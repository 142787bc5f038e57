"""Benchmark: the assistant on Banking77 with 10 intents it has never seen (out of scope).

    python bench/assistant_eval.py [--held-out 10] [--target-precision 0.95] [--trained-oos] [--set ...]

1. 10 intents (seeded) are held out. The intent model (all-MiniLM-L6-v2) trains on the other 67; a small
   English sentiment model trains on the demo's sentiment data; the FAQ has one entry per known intent.
   The intent model trains with the default recipe, so with outlier exposure on tuneloop's shipped
   off-topic messages (train.outlier_exposure; --set train.outlier_exposure=0 measures without).
2. The scope threshold is tuned on the model's validation split plus the held-out intents' *training*
   texts (the assistant's own examples: the shipped off-topic messages are not mixed in); everything is then
   measured on the official *test* split (known and held-out intents), and on the shipped off-topic
   messages' held-out part (English), which nothing trains or tunes on. Without --trained-oos the
   scope is measured a second time as for a user who brings no out-of-scope examples: the threshold tuned
   on the shipped off-topic messages' tuning part alone ("…, no examples of its own").
   With --trained-oos those training texts are instead trained as one more intent, out_of_scope
   (scope.label), and the threshold is tuned on the validation split alone (its out_of_scope share).
3. Every test message goes through a whole turn (three forward passes, FAQ search, reply, escalation
   rules), timed one by one on this CPU.
Prints one JSON line: in-scope intent accuracy of the assistant and of the plain classifier (which
answers everything), the share of in-scope messages answered with the right intent, out-of-scope recall
and in-scope precision, escalation rate, p50/p95 latency per turn — for each scope score (probability,
cosine), the first one being what the assistant used. Also written to
bench/results/assistant_eval-threshold.json (assistant_eval-trained-oos.json with --trained-oos).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _common import add_result_options, banking77_held_out, publish

OOS_LABEL = "out_of_scope"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", type=int, default=10)
    parser.add_argument("--target-precision", type=float, default=0.95)
    parser.add_argument(
        "--out-share",
        type=float,
        default=None,
        help="Expected out-of-scope share of traffic (default: held-out intents / all intents).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="Score only this many test messages (smoke runs).")
    parser.add_argument("--train-limit", type=int, default=None, help="Train on this many rows (smoke runs).")
    parser.add_argument(
        "--trained-oos",
        action="store_true",
        help="Train the held-out intents' training texts as an out_of_scope intent.",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="tuneloop recipe override.")
    add_result_options(parser)
    args = parser.parse_args()

    import torch

    from tuneloop.assistant.definition import AssistantDefinition
    from tuneloop.assistant.runtime import AssistantRuntime
    from tuneloop.config import load_config
    from tuneloop.data.off_topic import off_topic_messages
    from tuneloop.demo import packaged_file
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    torch.set_num_threads(os.cpu_count() or 1)
    train, test, held_out = banking77_held_out(args.held_out, args.seed)
    out_share = args.out_share or args.held_out / train["label"].nunique()
    known_train = train[~train["label"].isin(held_out)]
    if args.train_limit:
        per_intent = max(2, args.train_limit // known_train["label"].nunique())
        known_train = known_train.groupby("label").head(per_intent)
    if args.limit:
        test = test.sample(n=args.limit, random_state=args.seed)
    known_test, unknown_test = test[~test["label"].isin(held_out)], test[test["label"].isin(held_out)]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = work / "home"
        off_topic = train[train["label"].isin(held_out)]
        if args.trained_oos:
            pd.concat([known_train, off_topic.assign(label=OOS_LABEL)]).to_csv(work / "intents.csv", index=False)
        else:
            known_train.to_csv(work / "intents.csv", index=False)
            off_topic[["text"]].to_csv(work / "out_of_scope.csv", index=False)
        sentiment = pd.read_csv(packaged_file("demo", "data", "sentiment.csv"))
        sentiment[sentiment["lang"] == "en"].to_csv(work / "sentiment.csv", index=False)
        common = [f"registry.home={home}", "model.name=all-MiniLM-L6-v2", *args.overrides]
        registry = Registry(load_config(None, common).registry)
        started = time.perf_counter()
        for name, data, label in (
            ("bank-intents", "intents.csv", "label"),
            ("bank-sentiment", "sentiment.csv", "sentiment"),
        ):
            recipe = load_config(
                None, [f"data.path={work / data}", f"data.label_column={label}", f"name={name}", *common]
            )
            registry.promote(classification.run(recipe, show_progress=False).version.ref)
        training_seconds = time.perf_counter() - started
        exposure = json.loads(registry.folder(registry.get("bank-intents@production")).report_json.read_text()).get(
            "outlier_exposure"
        )
        # One FAQ entry per known intent, its question a training message of that intent.
        faq = known_train.groupby("label").first().reset_index()
        pd.DataFrame(
            {
                "question": faq["text"],
                "answer": "About " + faq["label"].str.replace("_", " ") + ": ...",
                "intent": faq["label"],
            }
        ).to_csv(work / "faq.csv", index=False)

        # The shipped off-topic messages' held-out part: never trained on nor tuned on by tuneloop.
        generic = off_topic_messages("heldout", ["en"])
        results = {}
        # Scope thresholds tuned on the held-out intents' training texts (examples like the real off-topic
        # traffic), and, as for a user who brings none, on the shipped off-topic messages' tuning part.
        variants = [("probability", True), ("cosine", True)]
        if not args.trained_oos:
            variants += [("probability", False), ("cosine", False)]
        for score, own_examples in variants:
            key = score if own_examples else f"{score}, no examples of its own"
            definition = AssistantDefinition(
                name=f"bank-{score}-{'own' if own_examples else 'shipped'}",
                intent_model="bank-intents",
                sentiment_model="bank-sentiment",
                faq=work / "faq.csv",
                out_of_scope_examples=work / "out_of_scope.csv" if own_examples and not args.trained_oos else None,
                languages=["en"],
                scope={
                    "target_precision": args.target_precision,
                    "score": score,
                    "out_of_scope_share": out_share,
                    "label": OOS_LABEL if args.trained_oos else None,
                },
                escalation={"negative_turns": 0, "min_confidence": 0.0},
            )
            runtime = AssistantRuntime(definition, registry)
            intent, mood = runtime.load_models()
            threshold = runtime.calibrate(intent)
            messages = pd.concat([known_test.assign(known=True), unknown_test.assign(known=False)])
            latencies, outcomes = [], []
            for text in messages["text"]:
                turn_started = time.perf_counter()
                outcomes.append(runtime.respond(text, intent, mood))
                latencies.append(time.perf_counter() - turn_started)
            known = messages["known"].to_numpy()
            truth = messages["label"].to_numpy()
            predicted = np.array([o.predicted_intent for o in outcomes])
            accepted = np.array([o.intent is not None for o in outcomes])
            plain_logits = intent.own_logits(intent.logits(known_test["text"].tolist()))
            if args.trained_oos:  # the plain classifier answers every message with one of the real intents
                plain_logits[:, intent.labels.index(OOS_LABEL)] = -np.inf
            plain = plain_logits.argmax(1)
            plain_accuracy = float(np.mean(np.array(intent.labels)[plain] == known_test["label"].to_numpy()))
            scores = np.array([o.scope_score for o in outcomes])
            generic_accepted = np.array([runtime.respond(t, intent, mood).intent is not None for t in generic["text"]])
            by_domain = (
                pd.Series(~generic_accepted, index=generic["domain"].to_numpy()).groupby(level=0).mean().sort_values()
            )
            results[key] = {
                "threshold": round(threshold.threshold, 4),
                "tuning": {k: round(v, 4) if isinstance(v, float) else v for k, v in threshold.to_dict().items()},
                "in_scope_accuracy": round(float(np.mean(predicted[known] == truth[known])), 4),
                "plain_classifier_accuracy": round(plain_accuracy, 4),
                "in_scope_answered_correctly": round(
                    float(np.mean(accepted[known] & (predicted[known] == truth[known]))), 4
                ),
                "in_scope_rejected": round(float(np.mean(~accepted[known])), 4),
                "out_of_scope_recall": round(float(np.mean(~accepted[~known])), 4),
                "in_scope_precision": round(float(known[accepted].mean()) if accepted.any() else 1.0, 4),
                "escalation_rate": round(float(np.mean([o.escalate for o in outcomes])), 4),
                "latency_ms": {
                    "p50": round(1000 * float(np.percentile(latencies, 50)), 1),
                    "p95": round(1000 * float(np.percentile(latencies, 95)), 1),
                },
                "auroc_in_vs_out": round(float(_auroc(scores[known], scores[~known])), 4),
                "shipped_off_topic_heldout": {
                    "messages": len(generic),
                    "recall": round(float(np.mean(~generic_accepted)), 4),
                    "lowest_recall_domains": {d: round(float(r), 3) for d, r in by_domain.head(5).items()},
                },
            }
            print(json.dumps({"progress": {key: results[key]}}), file=sys.stderr, flush=True)

    result = {
        "scope_mode": "trained out_of_scope intent" if args.trained_oos else "threshold",
        "held_out_intents": held_out,
        "known_test": len(known_test),
        "unknown_test": len(unknown_test),
        "target_precision": args.target_precision,
        "out_of_scope_share": round(out_share, 4),
        "training_seconds": round(training_seconds, 1),
        "outlier_exposure": exposure and {k: v for k, v in exposure.items() if k != "examples_left_out"},
        "cores": os.cpu_count(),
        **results,
    }
    publish(args, "assistant_eval-trained-oos" if args.trained_oos else "assistant_eval-threshold", result)


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """How well the score separates in-scope (higher) from out-of-scope messages, threshold-free."""
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.ones(len(positive)), np.zeros(len(negative))], np.r_[positive, negative])


if __name__ == "__main__":
    main()
