"""Benchmark: near-duplicates across splits, and how fast they are found.

    python bench/leakage.py [--threshold 0.8] [--speed-rows 100000]

For banking77 and sst2 (their official splits) and waimai_10k (split 80/20 as bench/train_classifier.py
does), tuneloop's data stage counts the test rows with a near-duplicate in the training split, and a
TF-IDF + logistic regression model (word and character n-grams; trained in seconds) is scored on the leaked
and the other test rows apart, to show how much the paraphrases seen in training lift a score. A fine-tuned
model's figures on each part are in its test report (bench/train_classifier.py records them).

Speed: every text of the three datasets plus reworded copies of some of them (one word dropped, case and
punctuation changed), --speed-rows in all, through the same pair search; reports the seconds and how many
of the planted copies were found.
The result is written to bench/results/leakage.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline, make_union

from _common import add_result_options, load_banking77, load_sst2, load_waimai, publish
from train_classifier import load_dataset

DATASETS = ("banking77", "sst2", "waimai_10k")


def tfidf_model() -> object:
    return make_pipeline(
        make_union(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2),
        ),
        LogisticRegression(C=10, max_iter=2000),
    )


def measure_dataset(name: str, threshold: float, work: Path) -> dict:
    from tuneloop.config import DataConfig
    from tuneloop.data.prepare import leaked_positions, prepare_data

    train, test = load_dataset(name, seed=42)
    train.to_csv(work / f"{name}-train.csv", index=False)
    test.to_csv(work / f"{name}-test.csv", index=False)
    started = time.perf_counter()
    prepared = prepare_data(
        DataConfig(
            path=work / f"{name}-train.csv",
            test_path=work / f"{name}-test.csv",
            near_duplicate_threshold=threshold,
        )
    )
    prepare_seconds = time.perf_counter() - started
    leaked = leaked_positions(prepared.report) or []
    model = tfidf_model()
    fitted_on = pd.concat([prepared.train, prepared.val])
    model.fit(fitted_on["text"], fitted_on["label"])
    correct = pd.Series(model.predict(prepared.test["text"]) == prepared.test["label"].to_numpy())
    is_leaked = correct.index.isin(leaked)
    leakage = prepared.report["leakage"]
    near = prepared.report["near_duplicates"]
    result = {
        "train_rows": len(prepared.train) + len(prepared.val),
        "test_rows": len(prepared.test),
        "test_rows_leaked": leakage["test"]["rows"],
        "test_share_leaked": round(leakage["test"]["share"], 4),
        "clusters": near["clusters"],
        "rows_in_clusters": near["rows_in_clusters"],
        "clusters_with_different_labels": near["clusters_with_different_labels"],
        "tfidf_accuracy": round(float(correct.mean()), 4),
        "tfidf_accuracy_leaked": round(float(correct[is_leaked].mean()), 4) if is_leaked.any() else None,
        "tfidf_accuracy_not_leaked": round(float(correct[~is_leaked].mean()), 4),
        "data_stage_seconds": round(prepare_seconds, 1),
        "examples": [{k: e[k] for k in ("text", "train_text", "similarity")} for e in leakage["test"]["examples"][:3]],
    }
    print(f"{name}: {result}", file=sys.stderr, flush=True)
    return result


def reworded(text: str, rng: random.Random) -> str:
    words = text.split()
    if len(words) > 6:
        words.pop(rng.randrange(len(words)))
    return " ".join(words).upper() + "!"


def measure_speed(rows: int, threshold: float) -> dict:
    from tuneloop.data.clean import clean_text
    from tuneloop.data.near_duplicates import clusters, jaccard, near_duplicate_pairs, shingles

    banking_train, banking_test = load_banking77()
    sst2_train, sst2_dev = load_sst2()
    texts = pd.concat([banking_train, banking_test, sst2_train, sst2_dev, load_waimai()])["text"].astype(str)
    texts = list(dict.fromkeys(clean_text(t) for t in texts))[:rows]
    rng = random.Random(0)
    originals = len(texts)
    planted = {}  # copy's position → its source's
    while len(texts) < rows:
        source = rng.randrange(originals)
        planted[len(texts)] = source
        texts.append(reworded(texts[source], rng))
    started = time.perf_counter()
    pairs = near_duplicate_pairs(texts, threshold)
    groups = clusters(len(texts), pairs)
    seconds = time.perf_counter() - started
    found = {(p.first, p.second) for p in pairs}
    # Dropping a word from a short text can take it below the threshold: those copies are not near-duplicates.
    close = [
        (source, copy)
        for copy, source in planted.items()
        if jaccard(shingles(texts[source]), shingles(texts[copy])) >= threshold
    ]
    result = {
        "texts": len(texts),
        "mean_words": round(sum(len(t.split()) for t in texts) / len(texts), 1),
        "seconds": round(seconds, 1),
        "pairs": len(pairs),
        "clusters": len(groups),
        "planted_copies": len(planted),
        "planted_at_threshold": len(close),
        "planted_found": sum(pair in found for pair in close),
    }
    print(f"speed: {result}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of a near-duplicate.")
    parser.add_argument("--speed-rows", type=int, default=100_000, help="Texts in the speed measurement.")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    add_result_options(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = {
            "threshold": args.threshold,
            "datasets": {name: measure_dataset(name, args.threshold, Path(folder)) for name in args.datasets},
            "speed": measure_speed(args.speed_rows, args.threshold),
        }
    publish(args, "leakage", result)


if __name__ == "__main__":
    main()
