"""Benchmark: which out-of-scope score separates unseen intents best, on Banking77 with 10 intents held out.

    python bench/oos_scores.py [--set train.outlier_exposure=0 --results-name oos_scores-no-outlier-exposure]

The same split as bench/assistant_eval.py (10 seeded intents held out, the other 67 trained with the default
recipe). Every score is computed from one trained model and compared threshold-free (AUROC, in-scope vs the
held-out intents' test messages) and at the assistant's operating point: the threshold tuned, as
`assistant.scope` does, for 95% in-scope precision at the expected out-of-scope share, on the validation split
plus the held-out intents' training texts (examples like the real off-topic traffic); then measured on the
test split. Scores:
- probability: top softmax probability (what the assistant uses);
- cosine: cosine to the closest class vector;
- energy: log-sum-exp of the logits (Liu et al. 2020);
- knn-K: cosine to the K-th nearest training text, on the fine-tuned embeddings (Sun et al. 2022);
- mahalanobis: distance to the closest class mean under one shared covariance (Lee et al. 2018), and its
  relative form minus the distance to one Gaussian of all training texts (Ren et al. 2021);
- probability + relative mahalanobis: the two standardised on the validation split and summed.
Prints one JSON line; written to bench/results/oos_scores.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from _common import add_result_options, banking77_held_out, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", type=int, default=10)
    parser.add_argument("--target-precision", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None, help="Train on this many rows (smoke runs).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="tuneloop recipe override.")
    add_result_options(parser)
    args = parser.parse_args()

    import torch
    from sklearn.metrics import roc_auc_score

    from tuneloop.assistant.scope import expected_precision, tune_threshold
    from tuneloop.config import load_config
    from tuneloop.data.prepare import load_prepared
    from tuneloop.models.classifier import TextClassifier, softmax, tokenize
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    torch.set_num_threads(os.cpu_count() or 1)
    train, test, held_out = banking77_held_out(args.held_out, args.seed)
    intents = train["label"].nunique()
    share = args.held_out / intents
    unseen = train["label"].isin(held_out)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        known_train = train[~unseen]
        if args.train_limit:
            known_train = known_train.groupby("label").head(max(2, args.train_limit // (intents - args.held_out)))
        known_train.to_csv(work / "intents.csv", index=False)
        common = [f"registry.home={work / 'home'}", "model.name=all-MiniLM-L6-v2", *args.overrides]
        recipe = load_config(None, [f"data.path={work / 'intents.csv'}", "data.label_column=label", *common])
        version = classification.run(recipe, show_progress=False).version
        folder = Registry(recipe.registry).folder(version)
        model, tokenizer = TextClassifier.load(folder.model)
        prepared = load_prepared(folder.data())

        def embedded(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            ids = tokenize(tokenizer, texts, model.spec)
            pooled = classification.embed_all(model, ids, tokenizer.pad_token_id or 0)
            with torch.no_grad():
                return pooled.numpy(), model.logits_from_embeddings(pooled).numpy()

        labels = model.spec.labels
        bank, _ = embedded(prepared.train["text"].tolist())
        bank_labels = np.array([labels.index(label) for label in prepared.train["label"]])
        parts = {
            "validation": prepared.val["text"].tolist(),
            "unseen_examples": train.loc[unseen, "text"].tolist(),
            "test_known": test.loc[~test["label"].isin(held_out), "text"].tolist(),
            "test_unseen": test.loc[test["label"].isin(held_out), "text"].tolist(),
        }
        outputs = {name: embedded(texts) for name, texts in parts.items()}

    unit_bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    means = np.stack([bank[bank_labels == c].mean(0) for c in range(len(labels))])
    precision_matrix = _inverse_covariance(bank - means[bank_labels])
    overall_mean = bank.mean(0)
    overall_precision = _inverse_covariance(bank - overall_mean)

    def scores(pooled: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        similarities = np.sort((pooled / np.linalg.norm(pooled, axis=1, keepdims=True)) @ unit_bank.T, axis=1)[:, ::-1]
        to_classes = _squared_distances(pooled, means, precision_matrix)
        to_all = _squared_distances(pooled, overall_mean[None], overall_precision)
        top = logits.max(1)
        return {
            "probability": softmax(logits).max(1),
            "cosine": top / model.spec.cosine_scale * model.spec.temperature,
            "energy": top + np.log(np.exp(logits - top[:, None]).sum(1)),
            "knn-1": similarities[:, 0],
            "knn-10": similarities[:, 9],
            "mahalanobis": -to_classes.min(1),
            "relative mahalanobis": -(to_classes - to_all).min(1),
        }

    by_part = {name: scores(*output) for name, output in outputs.items()}
    reference = by_part["validation"]
    for part in by_part.values():
        part["probability + relative mahalanobis"] = sum(
            (part[s] - reference[s].mean()) / reference[s].std() for s in ("probability", "relative mahalanobis")
        )

    known_correct = outputs["test_known"][1].argmax(1) == np.array(
        [labels.index(label) for label in test.loc[~test["label"].isin(held_out), "label"]]
    )
    results = {}
    for score in by_part["validation"]:
        known, unknown = by_part["test_known"][score], by_part["test_unseen"][score]
        tuned = tune_threshold(
            by_part["validation"][score], by_part["unseen_examples"][score], args.target_precision, share
        )
        accepted_known, accepted_unknown = (known >= tuned.threshold).mean(), (unknown >= tuned.threshold).mean()
        truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
        results[score] = {
            "auroc": round(float(roc_auc_score(truth, np.r_[known, unknown])), 4),
            "out_of_scope_recall": round(float(1 - accepted_unknown), 4),
            "in_scope_precision": round(
                float(expected_precision(np.array([accepted_known]), np.array([accepted_unknown]), share)[0]), 4
            ),
            "in_scope_rejected": round(float(1 - accepted_known), 4),
            # The curve's point where a tenth of in-scope messages is turned away, whatever the tuning picks.
            "out_of_scope_recall_at_10_percent_rejected": round(float((unknown < np.quantile(known, 0.1)).mean()), 4),
        }
    publish(
        args,
        "oos_scores",
        {
            "held_out_intents": held_out,
            "known_test": len(parts["test_known"]),
            "unknown_test": len(parts["test_unseen"]),
            "in_scope_accuracy": round(float(known_correct.mean()), 4),
            "target_precision": args.target_precision,
            "out_of_scope_share": round(share, 4),
            "overrides": args.overrides,
            "scores": results,
            "best_at_10_percent_rejected": max(
                results, key=lambda s: results[s]["out_of_scope_recall_at_10_percent_rejected"]
            ),
            "best_by_auroc": max(results, key=lambda s: results[s]["auroc"]),
        },
    )


def _inverse_covariance(centred: np.ndarray) -> np.ndarray:
    """The precision matrix of centred embeddings, with a small ridge (384 dimensions, a few thousand texts)."""
    covariance = centred.T @ centred / len(centred)
    return np.linalg.inv(covariance + 1e-3 * np.trace(covariance) / len(covariance) * np.eye(len(covariance)))


def _squared_distances(points: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(points, means) squared Mahalanobis distances."""
    difference = points[:, None, :] - means[None]
    return np.einsum("ncd,de,nce->nc", difference, precision, difference)


if __name__ == "__main__":
    main()
