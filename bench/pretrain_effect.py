"""Benchmark: does pretraining on the company's own unlabelled text help when labels are few?

    python bench/pretrain_effect.py [--labels 200] [--mlm-epochs 2] [--scratch-epochs 8]

waimai_10k (Chinese food-delivery reviews, positive/negative), a seeded stratified 80/20 split, and only
--labels labelled reviews from the 80% (the rest used without labels). Fine-tunes, with the same recipe:
  (a) the packaged multilingual encoder (multilingual-e5-small) directly;
  (b) the same encoder after continued MLM on all ~12k reviews, without their labels;
  (c) a small BERT pretrained from scratch (character tokenizer) on the same text.
Prints one JSON line with each one's test accuracy and macro-F1 on the fixed 20% split, the pretraining
perplexities and times; also written to bench/results/pretrain_effect.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from sklearn.model_selection import train_test_split

from _common import add_result_options, load_waimai, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=200)
    parser.add_argument("--mlm-epochs", type=int, default=2)
    parser.add_argument("--scratch-epochs", type=int, default=8)
    parser.add_argument("--scratch-size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--corpus-limit", type=int, default=None, help="Use fewer unlabelled texts (smoke runs).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="fine-tuning override.")
    add_result_options(parser)
    args = parser.parse_args()

    from tuneloop.config import PretrainRecipe, load_config
    from tuneloop.training import classification, mlm

    frame = load_waimai()
    pool, test = train_test_split(frame, test_size=0.2, stratify=frame["label"], random_state=args.seed)
    labelled, _ = train_test_split(pool, train_size=args.labels, stratify=pool["label"], random_state=args.seed)
    corpus = (
        frame["text"] if args.corpus_limit is None else frame["text"].sample(args.corpus_limit, random_state=args.seed)
    )
    result: dict = {
        "labels": args.labels,
        "test_rows": len(test),
        "unlabelled_texts": len(corpus),
        "cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = work / "home"
        labelled.to_csv(work / "labelled.csv", index=False)
        test.to_csv(work / "test.csv", index=False)
        (work / "corpus.txt").write_text("\n".join(t.replace("\n", " ") for t in corpus), encoding="utf-8")
        where = f"registry.home={home}"

        def fine_tune(encoder: str, name: str) -> dict:
            recipe = load_config(
                None,
                [
                    where,
                    f"data.path={work / 'labelled.csv'}",
                    f"data.test_path={work / 'test.csv'}",
                    f"model.name={encoder}",
                    f"name={name}",
                    "train.epochs=5",
                    "train.patience=5",
                    "model.max_length=96",
                    *args.overrides,
                ],
            )
            outcome = classification.run(recipe, show_progress=False, register=False)
            test_metrics = outcome.report.test
            return {
                "accuracy": round(test_metrics.accuracy, 4),
                "macro_f1": round(test_metrics.macro_f1, 4),
                "fine_tune_seconds": round(outcome.train.train_seconds, 1),
            }

        def pretrained(name: str, settings: list[str]) -> tuple[str, dict]:
            recipe = load_config(
                None, [where, f"pretrain.paths=[{work / 'corpus.txt'}]", f"name={name}", *settings], PretrainRecipe
            )
            started = time.perf_counter()
            outcome = mlm.run(recipe, show_progress=False)
            return outcome.version.ref, {
                "pretrain_seconds": round(time.perf_counter() - started, 1),
                "heldout_perplexity": [round(h["heldout_perplexity"], 2) for h in outcome.history],
                **outcome.corpus,
            }

        result["a_packaged_encoder"] = fine_tune("multilingual-e5-small", "direct")
        print(json.dumps({"progress": result}), flush=True, file=sys.stderr)
        ref, info = pretrained(
            "waimai-mlm",
            [
                "model.name=multilingual-e5-small",
                f"pretrain.epochs={args.mlm_epochs}",
                "pretrain.lr=5e-5",
                "pretrain.whole_word=true",
            ],
        )
        result["b_continued_mlm"] = {**fine_tune(ref, "after-mlm"), "pretraining": info}
        print(json.dumps({"progress": result}), flush=True, file=sys.stderr)
        ref, info = pretrained(
            "waimai-scratch",
            [
                "pretrain.from_scratch=true",
                f"pretrain.size={args.scratch_size}",
                "pretrain.tokenizer=char",
                "pretrain.vocab_size=8000",
                f"pretrain.epochs={args.scratch_epochs}",
                "pretrain.lr=5e-4",
            ],
        )
        result["c_from_scratch"] = {**fine_tune(ref, "scratch"), "pretraining": info}
    result["b_minus_a_points"] = round(
        100 * (result["b_continued_mlm"]["accuracy"] - result["a_packaged_encoder"]["accuracy"]), 2
    )
    publish(args, "pretrain_effect", result)


if __name__ == "__main__":
    main()
