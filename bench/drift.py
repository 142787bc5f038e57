"""Benchmark: in the drift scenario of bench/feedback_loop.py, does monitoring see the drift, and do the labels
`tuneloop feedback suggest` asks for fix it better than as many chosen at random?

    python bench/drift.py [--budget 200] [--quiet-window 1000] [--set train.epochs=2 ...]

1. Production is trained as in bench/feedback_loop.py (10 Banking77 intents cut to 5 training rows each,
   10% of the other intents' rows held back) and promoted.
2. `tuneloop serve` runs on 127.0.0.1 and answers, without any feedback, first a quiet window: test texts
   drawn in the production's own training mix of intents; then the stream of held-back texts (the cut
   intents' rows and the other held-back rows), as users would send them.
3. The monitor looks at each window: it should stay quiet on the first and flag the second.
4. A person labels `--budget` of the stream's predictions (the script knows the truth), in each of these
   labellings (--labellings):
   - suggested: the ones `feedback suggest` picks, and of each suggestion's similar messages those that share its
     label (the person confirms the list in one click, after unticking the others);
   - suggested_alone: the same suggestions without their similar messages;
   - random: as many at random from the same predictions;
   - all_corrections: every wrong answer of the stream corrected (what bench/feedback_loop.py's users do): the
     reference for how much of the drift a retrain can recover at all.
   Each set is recorded as trusted feedback in its own copy of the home, and each copy retrains once.
Prints one JSON line: both monitor reports' figures, and for each labelling: how many labels were given (and, for
the similar messages, listed, confirmed and unticked), how many of the chosen texts were of the cut intents or
answered wrongly, macro-F1 on the cut intents and overall (test set) after the retrain, and the share of the drift
gap it recovered ((after − before) / (all corrections − before), on the cut intents' macro-F1); also written to
bench/results/drift.json.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from _common import free_port, publish, stop, wait_ready
from feedback_loop import drift_scenario, loop_arguments, promoted_production, scores


def send(url: str, texts: list[str], request_size: int) -> list[dict]:
    """Every text predicted by the server, in small requests; the answers in order."""
    answers = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for start in range(0, len(texts), request_size):
            response = http.post("/v1/predict", json={"texts": texts[start : start + request_size]})
            response.raise_for_status()
            answers += response.json()["predictions"]
    return answers


def monitored(report) -> dict:
    figures = report.to_dict()
    return {key: value for key, value in figures.items() if key != "confidence_histogram"}


def quiet_window(test: pd.DataFrame, production_rows: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """`size` test rows drawn with the production's training share of each intent."""
    shares = production_rows["label"].value_counts(normalize=True)
    weights = test["label"].map(shares / test["label"].value_counts()).fillna(0)
    return test.sample(n=size, weights=weights, replace=False, random_state=seed)


LABELLINGS = ("suggested", "suggested_alone", "random", "all_corrections")


def person_labels(
    chosen: list, truth: dict[str, str], said: dict[str, str], budget: int, seed: int
) -> dict[str, tuple[dict[str, str], dict]]:
    """Per labelling, the labels a person gives (prediction id → the true label) and what it took."""
    suggested = {s.prediction_id: truth[s.prediction_id] for s in chosen}
    listed = [(near.prediction_id, s.prediction_id) for s in chosen for near in s.similar]
    confirmed = {near: truth[near] for near, of in listed if truth[near] == truth[of]}
    at_random = np.random.default_rng(seed).choice(list(truth), size=budget, replace=False).tolist()
    wrong = {p: label for p, label in truth.items() if label != said[p]}
    return {
        "suggested": (
            {**confirmed, **suggested},
            {
                "labels": len(suggested),
                "similar_listed": len(listed),
                "similar_confirmed": len(confirmed),
                "similar_unticked": len(listed) - len(confirmed),
            },
        ),
        "suggested_alone": (suggested, {"labels": len(suggested)}),
        "random": ({p: truth[p] for p in at_random}, {"labels": len(at_random)}),
        "all_corrections": (wrong, {"labels": len(wrong)}),
    }


def main() -> None:
    parser = loop_arguments(__doc__)
    parser.add_argument("--budget", type=int, default=200, help="Labels a person gives.")
    parser.add_argument("--quiet-window", type=int, default=1000, help="Test texts in the quiet window.")
    parser.add_argument(
        "--labellings",
        nargs="+",
        choices=LABELLINGS,
        default=list(LABELLINGS),
        help="Which labellings retrain (each costs one retrain); all_corrections is the gap's reference.",
    )
    args = parser.parse_args()

    from tuneloop.config import load_config
    from tuneloop.feedback.log import PredictionLog
    from tuneloop.feedback.monitor import watch
    from tuneloop.feedback.retrain import retrain
    from tuneloop.feedback.suggest import record_labels, registered_labels, suggestions_for
    from tuneloop.registry import Registry

    production_rows, stream, test, drifted = drift_scenario(args)
    quiet = quiet_window(test, production_rows, args.quiet_window, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = work / "home"
        production_rows.to_csv(work / "train.csv", index=False)
        test.to_csv(work / "test.csv", index=False)
        common = ["name=banking77", *args.overrides]
        data = [f"data.path={work / 'train.csv'}", f"data.test_path={work / 'test.csv'}"]
        recipe = load_config(None, [*data, f"registry.home={home}", *common])
        production, registry, production_seconds = promoted_production(recipe)
        before = scores(registry, production.ref, test, drifted)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "tuneloop", "serve", "--port", str(port), f"registry.home={home}"],
            stdout=sys.stderr,  # stdout carries only the result line
        )
        try:
            wait_ready(url, server)
            send(url, quiet["text"].tolist(), args.request_size)
            answers = send(url, stream["text"].tolist(), args.request_size)
        finally:
            stop(server)
        truth = {a["prediction_id"]: label for a, label in zip(answers, stream["label"], strict=True)}
        said = {a["prediction_id"]: a["label"] for a in answers}

        prediction_log = PredictionLog(recipe.registry.resolved_database_url(), home)
        try:
            started = time.perf_counter()
            drift_report = watch("banking77", registry, prediction_log, last=len(stream))
            monitor_seconds = time.perf_counter() - started
            # The quiet window: the predictions made before the stream.
            first_of_stream = min(p.created_at for p in prediction_log.recent_predictions("banking77", len(stream)))
            quiet_report = watch("banking77", registry, prediction_log, last=len(quiet), until=first_of_stream)
            started = time.perf_counter()
            chosen = suggestions_for("banking77", registry, prediction_log, args.budget, len(stream))
            suggest_seconds = time.perf_counter() - started
        finally:
            prediction_log.close()
        labellings = person_labels(chosen, truth, said, args.budget, args.seed)
        labelled = {}
        for name in args.labellings:
            given, counts = labellings[name]
            copy = work / f"home-{name}"
            shutil.copytree(home, copy)
            copied = Registry(load_config(None, [f"registry.home={copy}"]).registry)
            log = PredictionLog(copied.database_url, copy)
            try:
                record_labels(log, "banking77", given, "bench:person", registered_labels(copied))
            finally:
                log.close()
            started = time.perf_counter()
            outcome = retrain("banking77", overrides=[f"registry.home={copy}", *common], show_progress=False)
            labelled[name] = {
                **counts,
                "texts_labelled": len(given),
                "of_cut_intents": sum(truth[p] in drifted for p in given),
                "answered_wrongly": sum(truth[p] != said[p] for p in given),
                "after": scores(copied, outcome.run.version.ref, test, drifted),
                "retrain_seconds": round(time.perf_counter() - started, 1),
            }
        if "all_corrections" in labelled:
            gap = labelled["all_corrections"]["after"]["drifted_macro_f1"] - before["drifted_macro_f1"]
            for figures in labelled.values():
                recovered = figures["after"]["drifted_macro_f1"] - before["drifted_macro_f1"]
                figures["drift_gap_recovered"] = round(recovered / gap, 4) if gap > 0 else None

    result = {
        "drifted_intents": drifted,
        "stream_texts": len(stream),
        "quiet_window_texts": len(quiet),
        "before": before,
        "monitor": {"quiet_window": monitored(quiet_report), "drift_window": monitored(drift_report)},
        "labelling": labelled,
        "suggested_minus_random_points": {
            key: round(100 * (labelled["suggested"]["after"][key] - labelled["random"]["after"][key]), 2)
            for key in before
        }
        if {"suggested", "random"} <= set(labelled)
        else None,
        "seconds": {
            "production_training": round(production_seconds, 1),
            "monitor": round(monitor_seconds, 1),
            "suggest": round(suggest_seconds, 2),
        },
        "cores": os.cpu_count(),
    }
    publish(args, "drift", result)


if __name__ == "__main__":
    main()
