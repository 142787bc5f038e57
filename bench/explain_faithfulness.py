"""Benchmark: are tuneloop's word attributions faithful? Deleting the words they rank first must lower the
predicted label's probability more than deleting random words, or the words attention looks at most.

    python bench/explain_faithfulness.py [--datasets banking77 waimai_10k] [--texts 200] [--epochs 1]

For each dataset a classifier is trained with tuneloop's recipe (--epochs, default 1 to keep the run short),
then on --texts test texts of at least 6 words (seeded sample) the predicted label's probability is measured
after deleting the k = 1..5 top words by each ranking: Integrated Gradients (tuneloop explain, 32 steps),
attention (the attention each word receives in the last layer, averaged over heads and positions) and
random (5 draws). AOPC (Samek et al.) is the mean drop over k = 1..5; higher is more faithful.
The result is written to bench/results/explain_faithfulness.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import add_result_options, publish
from train_classifier import load_dataset

MAX_K = 5
RANDOM_DRAWS = 5
STEPS = 32


def train(name: str, work: Path, epochs: int):
    from tuneloop.config import load_config
    from tuneloop.training import classification

    train_rows, test_rows = load_dataset(name, seed=42)
    train_rows.to_csv(work / "train.csv", index=False)
    test_rows.to_csv(work / "test.csv", index=False)
    recipe = load_config(
        None,
        [
            f"data.path={work / 'train.csv'}",
            f"data.test_path={work / 'test.csv'}",
            f"registry.home={work / 'home'}",
            f"train.epochs={epochs}",
            "eval.explanations=0",
            "serving.runtime=torch",
            "name=bench",
        ],
    )
    return classification.run(recipe, register=False, show_progress=False)


def attention_scores(model, tokenizer, text: str) -> np.ndarray:
    """Per token: the attention it receives in the last layer, averaged over heads and query positions."""
    encoded = tokenizer(
        model.spec.text_prefix + text, truncation=True, max_length=model.spec.max_length, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.encoder(**encoded, output_attentions=True)
    return out.attentions[-1][0].mean(dim=(0, 1)).numpy()


def word_ranking_by_attention(model, tokenizer, text: str) -> list[int]:
    from tuneloop.evaluate.explain import merge_into_words

    encoded = tokenizer(
        model.spec.text_prefix + text,
        truncation=True,
        max_length=model.spec.max_length,
        return_offsets_mapping=True,
    )
    prefix = len(model.spec.text_prefix)
    offsets = [(max(s - prefix, 0), max(e - prefix, 0)) for s, e in encoded["offset_mapping"]]
    words = merge_into_words(text, offsets, attention_scores(model, tokenizer, text))
    return sorted(range(len(words)), key=lambda i: -words[i].score)


def without(text: str, spans: list[tuple[int, int]]) -> str:
    """The text with the given character spans cut out."""
    out, cursor = [], 0
    for start, end in sorted(spans):
        out.append(text[cursor:start])
        cursor = end
    out.append(text[cursor:])
    return " ".join("".join(out).split()) if " " in text else "".join(out)


def measure(name: str, texts_wanted: int, epochs: int, work: Path) -> dict:
    from tuneloop.data.prepare import load_prepared
    from tuneloop.evaluate.explain import explain, words_of
    from tuneloop.models.classifier import TextClassifier, predict_proba

    started = time.perf_counter()
    outcome = train(name, work, epochs)
    train_seconds = time.perf_counter() - started
    model, tokenizer = TextClassifier.load(outcome.folder.model)
    model.encoder.set_attn_implementation("eager")  # attention weights are only returned by the eager kernel
    test = load_prepared(outcome.folder.data()).test
    rng = np.random.default_rng(0)
    candidates = [t for t in test["text"] if len(words_of(t)) >= MAX_K + 1]
    texts = [candidates[i] for i in rng.permutation(len(candidates))[:texts_wanted]]

    started = time.perf_counter()
    explained = explain(model, tokenizer, texts, steps=STEPS)
    explain_seconds = time.perf_counter() - started
    target = [model.spec.labels.index(e.label) for e in explained]
    rankings: dict[str, list[list[int]]] = {
        "integrated_gradients": [sorted(range(len(e.words)), key=lambda i: -e.words[i].score) for e in explained],
        "attention": [word_ranking_by_attention(model, tokenizer, t) for t in texts],
    }
    for draw in range(RANDOM_DRAWS):
        rankings[f"random_{draw}"] = [list(rng.permutation(len(e.words))) for e in explained]

    original = predict_proba(model, tokenizer, texts)[np.arange(len(texts)), target]
    drops: dict[str, list[float]] = {}
    for method, ranks in rankings.items():
        curve = []
        for k in range(1, MAX_K + 1):
            cut = [
                without(text, [(e.words[i].start, e.words[i].end) for i in ranking[:k]])
                for text, e, ranking in zip(texts, explained, ranks, strict=True)
            ]
            after = predict_proba(model, tokenizer, cut)[np.arange(len(texts)), target]
            curve.append(float((original - after).mean()))
        drops[method] = curve
    random_curve = np.mean([drops.pop(f"random_{d}") for d in range(RANDOM_DRAWS)], axis=0).tolist()
    drops["random"] = random_curve
    result = {
        "texts": len(texts),
        "epochs": epochs,
        "test_accuracy": round(outcome.report.test.accuracy, 4),
        "encoder": outcome.report.base_model,
        "probability_drop_at_k": {m: [round(v, 4) for v in curve] for m, curve in drops.items()},
        "aopc": {m: round(float(np.mean(curve)), 4) for m, curve in drops.items()},
        "mean_completeness_error": round(float(np.mean([abs(e.delta) for e in explained])), 4),
        "explain_seconds_per_text": round(explain_seconds / len(texts), 3),
        "train_seconds": round(train_seconds, 1),
    }
    print(f"{name}: {result}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["banking77", "waimai_10k"])
    parser.add_argument("--texts", type=int, default=200, help="Test texts scored per dataset.")
    parser.add_argument("--epochs", type=int, default=1, help="Training epochs of each dataset's classifier.")
    add_result_options(parser)
    args = parser.parse_args()
    results = {}
    for name in args.datasets:
        with tempfile.TemporaryDirectory() as folder:
            results[name] = measure(name, args.texts, args.epochs, Path(folder))
    publish(args, "explain_faithfulness", {"steps": STEPS, "datasets": results})


if __name__ == "__main__":
    main()
