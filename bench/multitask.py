"""Benchmark: one multi-task encoder (intent + sentiment heads) against two single-task models.

    python bench/multitask.py [--set train.epochs=4 ...] [--turns 200]

On the demo's own data (bilingual support intents and sentiment, multilingual-e5-small), with the shipped
configs: trains the intent and the sentiment model separately, then one model on both
(configs/demo_multitask.yaml, same splits), and prints one JSON line with each one's test accuracy and
macro-F1, training seconds, and the time one message takes to get its intent and sentiment (two encoder
passes against one; median over --turns messages, one at a time as the assistant sees them); also written
to bench/results/multitask.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import add_result_options, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run.")
    parser.add_argument("--turns", type=int, default=200)
    add_result_options(parser)
    args = parser.parse_args()

    import torch

    from tuneloop.config import load_config
    from tuneloop.data.prepare import load_prepared
    from tuneloop.demo import demo_config, packaged_file
    from tuneloop.models.predictor import load_model
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    torch.set_num_threads(os.cpu_count() or 1)
    result: dict = {"data": "demo (support_intents.csv + sentiment.csv)", "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"registry.home={Path(tmp) / 'home'}", *args.overrides]
        outcomes = {
            kind: classification.run(demo_config(None, common, kind=kind), show_progress=False)
            for kind in ("intents", "sentiment")
        }
        multi_recipe = load_config(
            packaged_file("configs", "demo_multitask.yaml"),
            [
                *common,
                f"tasks.intent.path={packaged_file('demo', 'data', 'support_intents.csv')}",
                f"tasks.sentiment.path={packaged_file('demo', 'data', 'sentiment.csv')}",
            ],
        )
        multi = classification.run(multi_recipe, show_progress=False)

        def scores(report, seconds: float | None = None) -> dict:
            test = report.test
            out = {
                "accuracy": round(test.accuracy, 4),
                "macro_f1": round(test.macro_f1, 4),
                "test_rows": test.n,
            }
            return out if seconds is None else {**out, "train_seconds": round(seconds, 1)}

        result["separate"] = {
            "intent": scores(outcomes["intents"].report, outcomes["intents"].train.train_seconds),
            "sentiment": scores(outcomes["sentiment"].report, outcomes["sentiment"].train.train_seconds),
        }
        result["multitask"] = {
            "intent": scores(multi.report, multi.train.train_seconds),
            "sentiment": scores(multi.report.tasks["sentiment"]),
        }

        registry = Registry(multi_recipe.registry)
        intent, mood, both = (
            load_model(o.version, registry) for o in (outcomes["intents"], outcomes["sentiment"], multi)
        )
        messages = load_prepared(multi.folder.data()).test["text"].tolist()[: args.turns]

        def per_turn(run) -> float:
            timings = []
            for text in messages:
                started = time.perf_counter()
                run(text)
                timings.append(time.perf_counter() - started)
            return 1000 * statistics.median(timings)

        two = per_turn(lambda t: (intent.logits([t]), mood.logits([t])))
        one = per_turn(lambda t: both.logits([t]))  # the multi-task model's heads share one encoder pass
        result["turn_ms_p50"] = {"two_models": round(two, 2), "multitask": round(one, 2), "ratio": round(one / two, 3)}
    for task in ("intent", "sentiment"):
        result[f"{task}_accuracy_delta_points"] = round(
            100 * (result["multitask"][task]["accuracy"] - result["separate"][task]["accuracy"]), 2
        )
    publish(args, "multitask", result)


if __name__ == "__main__":
    main()
