"""Benchmark: the training-label audit on waimai_10k, checked by hand, and what excluding its finds does.

    python bench/label_audit.py                 # audit, the hand-checked sample's verdicts, three trainings
    python bench/label_audit.py --sample-only   # audit and print the sample to check (no training)

waimai_10k is split 80/20 as bench/train_classifier.py does. `tuneloop data audit`'s method ranks the
training rows whose label looks wrong; a seeded sample of 50 flagged rows was read by a person and judged
(bench/data/waimai_audit_checked.csv, each review by the first 16 hex digits of its text's SHA-256 so that
no dataset text is copied here: wrong = the label is plainly wrong, right = the label is right, mixed = a
review either label could fit). Then three classifiers train with the default recipe: on all
training rows, without the rows confirmed wrong in the sample, and without every flagged row (trusting the
audit blindly); each is scored on the same, untouched test split.
The result is written to bench/results/label_audit.json.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from _common import BENCH, add_result_options, publish
from train_classifier import load_dataset

CHECKED = BENCH / "data" / "waimai_audit_checked.csv"
SAMPLE = 50


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_accuracy(work: Path, name: str, exclude: Path | None) -> dict:
    from tuneloop.config import load_config
    from tuneloop.training import classification

    recipe = load_config(
        None,
        [
            f"data.path={work / 'train.csv'}",
            f"data.test_path={work / 'test.csv'}",
            f"registry.home={work / name}",
            "eval.explanations=0",
            "name=bench",
            *([f"data.exclude={exclude}"] if exclude else []),
        ],
    )
    started = time.perf_counter()
    outcome = classification.run(recipe, register=False, show_progress=False)
    result = {
        "excluded": outcome.report.data["dropped"].get("excluded", 0),
        "test_accuracy": round(outcome.report.test.accuracy, 4),
        "test_macro_f1": round(outcome.report.test.macro_f1, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"{name}: {result}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-only", action="store_true", help="Audit and print the sample to check; no training.")
    add_result_options(parser)
    args = parser.parse_args()
    from tuneloop.config import DataConfig, RegistryConfig
    from tuneloop.data.prepare import prepare_data
    from tuneloop.evaluate.audit import audit_training_labels
    from tuneloop.models.encoders import resolve_encoder
    from tuneloop.registry import Registry

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        train, test = load_dataset("waimai_10k", seed=42)
        train.to_csv(work / "train.csv", index=False)
        test.to_csv(work / "test.csv", index=False)
        data = prepare_data(DataConfig(path=work / "train.csv", test_path=work / "test.csv"))
        encoder = resolve_encoder("auto", Registry(RegistryConfig(home=work / "home")), data.train["text"].tolist())
        started = time.perf_counter()
        audit = audit_training_labels(data, encoder, None, seed=42)
        audit_seconds = time.perf_counter() - started
        flagged = audit.issues
        sample = flagged.sample(n=min(SAMPLE, len(flagged)), random_state=0)
        sample = sample.assign(text_sha256=sample["text"].map(digest))
        if args.sample_only:
            sample[["text_sha256", "text", "label", "suggested"]].assign(verdict="").to_csv(sys.stdout, index=False)
            return
        checked = pd.read_csv(CHECKED, dtype=str)
        if sorted(checked["text_sha256"]) != sorted(sample["text_sha256"]):
            raise SystemExit(f"{CHECKED} does not hold this run's sample: re-check it (--sample-only prints it)")
        verdicts = checked["verdict"].value_counts().to_dict()
        wrong = set(checked.loc[checked["verdict"] == "wrong", "text_sha256"])
        confirmed = flagged.assign(confirmed=flagged["text"].map(lambda t: "yes" if digest(t) in wrong else ""))
        confirmed.to_csv(work / "confirmed.csv", index=False)
        everything = flagged.assign(confirmed="yes")
        everything.to_csv(work / "all_flagged.csv", index=False)
        result = {
            "rows_audited": audit.summary["rows_audited"],
            "flagged": audit.summary["flagged"],
            "flagged_share": round(audit.summary["share"], 4),
            "flagged_per_label": audit.summary["flagged_per_label"],
            "audit_seconds": round(audit_seconds, 1),
            "method": audit.summary["method"],
            "hand_checked": len(checked),
            "verdicts": {k: int(verdicts.get(k, 0)) for k in ("wrong", "mixed", "right")},
            "trained": {
                "all_rows": train_accuracy(work, "all", None),
                "without_confirmed": train_accuracy(work, "confirmed", work / "confirmed.csv"),
                "without_all_flagged": train_accuracy(work, "flagged", work / "all_flagged.csv"),
            },
        }
    publish(args, "label_audit", result)


if __name__ == "__main__":
    main()
