"""Benchmark: few examples per label. tuneloop with its few-shot regime chosen automatically against the default
recipe (the classifier loop alone), a frozen encoder with logistic regression, and TF-IDF, in one run on the same rows.

    python bench/few_shot.py [--dataset banking77] [--per-label 5 10 20] [--seeds 0 1 2] [--set train.x=y ...]
    python bench/few_shot.py --dataset waimai_10k --per-label 10 50

For each number of examples per label and seed, that many training rows of each label are drawn (seeded) from the
dataset's training split; tuneloop carves its validation split from them (data.val_size), and every method is
scored on the whole official test split (waimai_10k: a seeded 20% held out, as bench/train_classifier.py does).
- tuneloop: train.few_shot.mode=auto, which takes the few-shot regime when the median label has few training texts;
- default_recipe: the standard loop, as it trains with more examples (train.few_shot.mode=off);
- frozen encoder + logistic regression: the packaged encoder's mean-pooled embeddings of all the drawn rows, C=20;
- TF-IDF: word 1-2 and character 2-5 grams of all the drawn rows, logistic regression (C=10).
Prints one JSON line: per setting and seed each method's test accuracy and macro-F1 (tuneloop's as it serves) and
training seconds, the regime tuneloop took, and per setting the mean over seeds; also written to
bench/results/few_shot-DATASET.json.
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
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline, make_union

from _common import add_result_options, publish
from train_classifier import load_dataset


def drawn(train: pd.DataFrame, per_label: int, seed: int) -> pd.DataFrame:
    """`per_label` rows of each label (all of a label's rows when it has fewer), seeded."""
    groups = [rows.sample(n=min(per_label, len(rows)), random_state=seed) for _, rows in train.groupby("label")]
    return pd.concat(groups, ignore_index=True)


def scored(truth: pd.Series, predicted: list[str], seconds: float) -> dict:
    return {
        "accuracy": round(float(accuracy_score(truth, predicted)), 4),
        "macro_f1": round(float(f1_score(truth, predicted, average="macro")), 4),
        "train_seconds": round(seconds, 1),
    }


def tfidf(rows: pd.DataFrame, test: pd.DataFrame) -> dict:
    started = time.perf_counter()
    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
    )
    model = make_pipeline(features, LogisticRegression(C=10, max_iter=2000)).fit(rows["text"], rows["label"])
    seconds = time.perf_counter() - started
    return scored(test["label"], list(model.predict(test["text"])), seconds)


def frozen_encoder(rows: pd.DataFrame, test: pd.DataFrame, encoder_name: str, home: Path) -> dict:
    """The packaged encoder as it ships, mean-pooled and normalised, under a logistic regression."""
    from tuneloop.config import RegistryConfig
    from tuneloop.models.embedder import SentenceEmbedder
    from tuneloop.models.encoders import resolve_encoder
    from tuneloop.registry import Registry

    embedder = SentenceEmbedder(resolve_encoder(encoder_name, Registry(RegistryConfig(home=home)), list(rows["text"])))
    started = time.perf_counter()
    model = LogisticRegression(C=20, max_iter=3000).fit(embedder.encode(rows["text"].tolist()), rows["label"])
    seconds = time.perf_counter() - started
    return scored(test["label"], list(model.predict(embedder.encode(test["text"].tolist()))), seconds)


def tuneloop_run(rows: pd.DataFrame, test: pd.DataFrame, work: Path, overrides: list[str]) -> dict:
    from tuneloop.config import load_config
    from tuneloop.training import classification

    work.mkdir(parents=True, exist_ok=True)
    rows.to_csv(work / "train.csv", index=False)
    test.to_csv(work / "test.csv", index=False)
    recipe = load_config(
        None,
        [
            f"data.path={work / 'train.csv'}",
            f"data.test_path={work / 'test.csv'}",
            f"registry.home={work.parent / 'home'}",
            "name=bench",
            "eval.explanations=0",
            *overrides,
        ],
    )
    outcome = classification.run(recipe, register=False, show_progress=False)
    report = outcome.report
    regime = report.regime
    return {
        "accuracy": round(report.test.accuracy, 4),
        "macro_f1": round(report.test.macro_f1, 4),
        "train_seconds": round(outcome.train.train_seconds, 1),
        "train_rows": report.data["split_sizes"]["train"],
        "val_rows": report.data["split_sizes"]["val"],
        "best_step": outcome.train.best_step,
        "encoder": report.base_model,
        "regime": regime.model_dump(exclude_none=True) if regime else None,
        "served_by": (report.serving or {}).get("runtime"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["banking77", "waimai_10k"], default="banking77")
    parser.add_argument("--per-label", type=int, nargs="+", default=[5, 10, 20], help="Training rows drawn per label.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="tuneloop config override.")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["tuneloop", "default_recipe", "frozen_encoder", "tfidf"],
        choices=["tuneloop", "default_recipe", "frozen_encoder", "tfidf"],
        help="Leave some out for a quicker look (the published files run them all).",
    )
    add_result_options(parser)
    args = parser.parse_args()
    train, test = load_dataset(args.dataset, 42)
    result: dict = {"dataset": args.dataset, "test_rows": len(test), "cores": os.cpu_count(), "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for per_label in args.per_label:
            runs = []
            for seed in args.seeds:
                rows = drawn(train, per_label, seed)
                run: dict = {"seed": seed, "rows": len(rows)}
                place = work / f"{per_label}-{seed}"
                if "tuneloop" in args.methods:
                    auto = [*args.overrides, "train.few_shot.mode=auto"]
                    run["tuneloop"] = tuneloop_run(rows, test, place / "tuneloop", auto)
                if "default_recipe" in args.methods:
                    standard = [*args.overrides, "train.few_shot.mode=off"]
                    run["default_recipe"] = tuneloop_run(rows, test, place / "default", standard)
                if "frozen_encoder" in args.methods:
                    name = (run.get("tuneloop") or run.get("default_recipe") or {}).get("encoder", "auto")
                    run["frozen_encoder"] = frozen_encoder(rows, test, name, work / "home")
                if "tfidf" in args.methods:
                    run["tfidf"] = tfidf(rows, test)
                print(json.dumps({"progress": {"per_label": per_label, **run}}), file=sys.stderr, flush=True)
                runs.append(run)
            means = {
                method: {
                    key: round(float(np.mean([r[method][key] for r in runs])), 4)
                    for key in ("accuracy", "macro_f1", "train_seconds")
                }
                for method in args.methods
            }
            result["settings"][str(per_label)] = {"runs": runs, "mean": means}
    publish(args, f"few_shot-{args.dataset}", result)


if __name__ == "__main__":
    main()
