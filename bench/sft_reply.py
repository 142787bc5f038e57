"""Benchmark: fine-tune the packaged SmolLM2-135M-Instruct on the demo's (question, answer) pairs.

    python bench/sft_reply.py [--set sft.epochs=3 ...] [--examples 5]

Uses src/tuneloop/demo/data/support_replies.jsonl (written for the project), holds out a seeded 15% of
the pairs, LoRA-tunes the model on the rest with tuneloop's SFT recipe, and prints one JSON line:
held-out loss and perplexity before and after, training time, and a few held-out questions with the
reply before and after fine-tuning (greedy) next to the reference; also written to
bench/results/sft_reply.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import add_result_options, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="SFT recipe override (sft.*).")
    parser.add_argument("--examples", type=int, default=5, help="Held-out questions to show generations for.")
    parser.add_argument("--seed", type=int, default=7)
    add_result_options(parser)
    args = parser.parse_args()

    from tuneloop.config import SftRecipe, load_config
    from tuneloop.demo import packaged_file
    from tuneloop.models.lm import GenerationSettings, ReplyModel, ensure_smollm2
    from tuneloop.registry import Registry
    from tuneloop.training import sft

    source = packaged_file("demo", "data", "support_replies.jsonl")
    pairs = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    # The recipe holds out the first round(val_size * n) of this permutation; the same draw here names
    # exactly the questions it never trained on.
    val_size = 0.15
    held = [pairs[i] for i in np.random.default_rng(args.seed).permutation(len(pairs))[: round(val_size * len(pairs))]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = work / "home"
        recipe = load_config(
            None,
            [
                f"registry.home={home}",
                f"sft.paths=[{source}]",
                "name=replies",
                f"sft.val_size={val_size}",
                f"sft.seed={args.seed}",
                "sft.system_prompt=You are the shop's customer-service assistant.",
                *args.overrides,
            ],
            SftRecipe,
        )
        base = ensure_smollm2(home)
        started = time.perf_counter()
        outcome = sft.run(recipe, show_progress=False)
        seconds = time.perf_counter() - started
        settings = GenerationSettings(max_new_tokens=60)
        system = {"role": "system", "content": recipe.sft.system_prompt}
        after = Registry(recipe.registry).folder(outcome.version).model
        before_model, after_model = ReplyModel(base), ReplyModel(after)
        shown = []
        for pair in held[: args.examples]:
            messages = [system, {"role": "user", "content": pair["prompt"]}]
            shown.append(
                {
                    "question": pair["prompt"],
                    "reference": pair["reply"],
                    "before": before_model.generate(messages, settings),
                    "after": after_model.generate(messages, settings),
                }
            )
    last = outcome.history[-1]
    result = {
        "pairs": len(pairs),
        "train": outcome.examples["train"],
        "heldout": outcome.examples["heldout"],
        "heldout_loss_before": round(outcome.heldout_loss_before, 4),
        "heldout_perplexity_before": round(math.exp(outcome.heldout_loss_before), 2),
        "heldout_loss_after": round(last["heldout_loss"], 4),
        "heldout_perplexity_after": round(last["heldout_perplexity"], 2),
        "train_seconds": round(outcome.train_seconds, 1),
        "wall_seconds": round(seconds, 1),
        "method": recipe.sft.method,
        "epochs": recipe.sft.epochs,
        "cores": os.cpu_count(),
        "examples": shown,
    }
    publish(args, "sft_reply", result)


if __name__ == "__main__":
    main()
