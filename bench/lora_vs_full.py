"""Benchmark: LoRA against full fine-tuning on Banking77 (all-MiniLM-L6-v2), one run.

    python bench/lora_vs_full.py [--lora-set train.lora_rank=16 ...] [--set train.epochs=3 ...]

Prints one JSON line per method: test accuracy, macro-F1, trainable parameters (and their share of full
fine-tuning's), training seconds and the size of the saved classifier folder, then the differences;
also written to bench/results/lora_vs_full.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _common import add_result_options, load_banking77, publish

# LoRA trains few weights from a frozen start, so it takes a larger step (as in the LoRA paper's GLUE runs).
LORA_DEFAULTS = [
    "train.method=lora",
    "train.lr=1e-3",
    "train.lora_rank=16",
    "train.lora_alpha=32",
    "train.lora_targets=[query,key,value,dense]",
]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for both methods.")
    parser.add_argument("--lora-set", dest="lora", action="append", default=[], help="override for LoRA only.")
    parser.add_argument("--train-limit", type=int, default=None, help="Subsample training rows (smoke runs).")
    add_result_options(parser)
    args = parser.parse_args()

    from tuneloop.config import load_config
    from tuneloop.models.encoders import resolve_encoder
    from tuneloop.registry import Registry
    from tuneloop.training import classification
    from tuneloop.training.classification import build_classifier

    train, test = load_banking77()
    if args.train_limit:
        train = train.sample(n=args.train_limit, random_state=0)
    result: dict = {"dataset": "banking77", "train_rows": len(train), "test_rows": len(test), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train.to_csv(work / "train.csv", index=False)
        test.to_csv(work / "test.csv", index=False)
        common = [
            f"data.path={work / 'train.csv'}",
            f"data.test_path={work / 'test.csv'}",
            f"registry.home={work / 'home'}",
            "model.name=all-MiniLM-L6-v2",
            *args.overrides,
        ]
        for method, extra in (("full", []), ("lora", [*LORA_DEFAULTS, *args.lora])):
            recipe = load_config(None, [*common, f"name={method}", *extra])
            encoder = resolve_encoder(recipe.model.name, Registry(recipe.registry))
            model, _ = build_classifier(recipe, encoder, sorted(train["label"].unique()))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            del model
            outcome = classification.run(recipe, show_progress=False, register=False)
            metrics = outcome.report.test
            result[method] = {
                "accuracy": round(metrics.accuracy, 4),
                "macro_f1": round(metrics.macro_f1, 4),
                "trainable_parameters": trainable,
                "train_seconds": round(outcome.train.train_seconds, 1),
                "artifact_bytes": folder_bytes(outcome.folder.model),
                "settings": extra,
            }
            print(json.dumps({"progress": {method: result[method]}}), flush=True, file=sys.stderr)
    full, lora = result["full"], result["lora"]
    result["lora_minus_full_points"] = round(100 * (lora["accuracy"] - full["accuracy"]), 2)
    result["lora_trainable_share"] = round(lora["trainable_parameters"] / full["trainable_parameters"], 4)
    result["lora_artifact_share"] = round(lora["artifact_bytes"] / full["artifact_bytes"], 4)
    result["lora_time_ratio"] = round(lora["train_seconds"] / full["train_seconds"], 3)
    publish(args, "lora_vs_full", result)


if __name__ == "__main__":
    main()
