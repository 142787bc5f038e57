"""Benchmark: which out-of-scope score separates unseen intents best, with 10 intents of a dataset held out.

    python bench/oos_scores.py [--dataset banking77|hwu64] [--home DIR] [--set train.outlier_exposure=0 ...]

The same split as bench/assistant_eval.py (10 seeded intents held out, the others trained with the default
recipe; --home reuses a model an earlier run trained on the same split). Every score is computed from one
trained model and compared threshold-free (AUROC, in-scope vs the held-out intents' test messages) and at the
assistant's default operating point: the threshold that turns away --max-rejected (5%) of the validation
split, measured on the test split. Scores:
- probability: top softmax probability (what the assistant uses);
- cosine: cosine to the closest class vector;
- energy: log-sum-exp of the logits (Liu et al. 2020);
- knn-1, knn-10: cosine to the K-th nearest training text, on the fine-tuned embeddings (Sun et al. 2022);
- knn-intent: cosine to the nearest training text of the predicted intent;
- mahalanobis: distance to the closest class mean under one shared covariance (Lee et al. 2018), and its
  relative form minus the distance to one Gaussian of all training texts (Ren et al. 2021);
- probability + relative mahalanobis, probability + knn-intent: each standardised on the validation split, summed;
- mixup: a logistic regression on (probability, knn-intent) that tells the validation split from open-set mixup
  pseudo-outliers (embeddings of two training texts of different intents mixed, then scored by the head;
  Zhou et al. 2021), so the business's own data says how to weigh the two.
It also measures what the assistant could know at start about the unseen intents' share caught at that
threshold, from each kind of stand-in: the held-out intents' training texts (out-of-scope examples of one's
own), the shipped off-topic set's tuning part, the mixup pseudo-outliers, and the validation split scored with
its own intent's column left out (each intent played as unseen).
Prints one JSON line; written to bench/results/oos_scores[-DATASET].json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from _common import HeldOutSplit, add_result_options, held_out_options, publish, trained_once

MIXUP_PAIRS = 4000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    held_out_options(parser)
    parser.add_argument("--max-rejected", type=float, default=0.05, help="In-scope share the threshold turns away.")
    add_result_options(parser)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    split = HeldOutSplit.of(args)
    train, test, held_out = split.train, split.test, split.held_out
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp) / "home"
        ref, reused = trained_once(
            home, "intents", split.known_train, "label", ["model.name=all-MiniLM-L6-v2", *args.overrides]
        )
        outputs, bank, labels, spec = embedded_parts(home, ref, train, test, held_out)
    scores = Scores(outputs, bank, labels, spec)
    results = {name: scores.at_point(name, args.max_rejected) for name in scores.by_part["validation"]}
    known_correct = outputs["test_known"][1].argmax(1) == np.array(
        [labels.index(label) for label in test.loc[~test["label"].isin(held_out), "label"]]
    )
    publish(
        args,
        "oos_scores" if args.dataset == "banking77" else f"oos_scores-{args.dataset}",
        {
            "dataset": args.dataset,
            "held_out_intents": held_out,
            "known_test": len(outputs["test_known"][0]),
            "unknown_test": len(outputs["test_unseen"][0]),
            "in_scope_accuracy": round(float(known_correct.mean()), 4),
            "max_in_scope_rejected": args.max_rejected,
            "overrides": args.overrides,
            "model_reused": reused,
            "scores": results,
            "caught_estimated_from": scores.stand_ins(args.max_rejected),
            "best_at_point": max(results, key=lambda s: results[s]["out_of_scope_caught"]),
            "best_by_auroc": max(results, key=lambda s: results[s]["auroc"]),
        },
    )


def embedded_parts(home: Path, ref: str, train, test, held_out: list[str]):
    """Fine-tuned embeddings and logits of each part the scores are compared on, and of the training texts."""
    import torch

    from tuneloop.config import load_config
    from tuneloop.data.clean import clean_text
    from tuneloop.data.off_topic import off_topic_messages
    from tuneloop.data.prepare import load_prepared
    from tuneloop.models.classifier import TextClassifier, tokenize
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    registry = Registry(load_config(None, [f"registry.home={home}"]).registry)
    folder = registry.folder(registry.get(ref))
    model, tokenizer = TextClassifier.load(folder.model)
    prepared = load_prepared(folder.data())

    def embedded(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = tokenize(tokenizer, [clean_text(t) for t in texts], model.spec)
        pooled = classification.embed_all(model, ids, tokenizer.pad_token_id or 0)
        with torch.no_grad():
            return pooled.numpy(), model.logits_from_embeddings(pooled).numpy()

    labels = model.spec.labels
    unseen_test = test["label"].isin(held_out)
    parts = {
        "validation": prepared.val["text"].tolist(),
        "unseen_examples": train.loc[train["label"].isin(held_out), "text"].tolist(),
        "shipped": off_topic_messages("tune", ["en"])["text"].tolist(),
        "test_known": test.loc[~unseen_test, "text"].tolist(),
        "test_unseen": test.loc[unseen_test, "text"].tolist(),
    }
    outputs = {name: embedded(texts) for name, texts in parts.items()}
    outputs["validation_labels"] = np.array([labels.index(label) for label in prepared.val["label"]])
    bank = (embedded(prepared.train["text"].tolist())[0], np.array([labels.index(x) for x in prepared.train["label"]]))
    outputs["head"] = model  # the mixup pseudo-outliers are scored by the same head
    return outputs, bank, labels, model.spec


class Scores:
    """Every score of every part, from the embeddings and logits."""

    def __init__(self, outputs: dict, bank: tuple[np.ndarray, np.ndarray], labels: list[str], spec) -> None:
        self.spec, self.labels = spec, labels
        vectors, self.bank_labels = bank
        self.bank = vectors
        self.unit_bank = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self.means = np.stack([vectors[self.bank_labels == c].mean(0) for c in range(len(labels))])
        self.precision = _inverse_covariance(vectors - self.means[self.bank_labels])
        self.overall_mean = vectors.mean(0)
        self.overall_precision = _inverse_covariance(vectors - self.overall_mean)
        self.validation_labels = outputs["validation_labels"]
        self.mixup = self._mixup(outputs["head"])
        parts = {
            name: outputs[name] for name in ("validation", "unseen_examples", "shipped", "test_known", "test_unseen")
        }
        self.logits = {name: logits for name, (_, logits) in parts.items()} | {"mixup": self.mixup[1]}
        self.by_part = {name: self._scores(*output) for name, output in {**parts, "mixup": self.mixup}.items()}
        reference = self.by_part["validation"]
        for combined in (("probability", "relative mahalanobis"), ("probability", "knn-intent")):
            for part in self.by_part.values():
                part[" + ".join(combined)] = sum((part[s] - reference[s].mean()) / reference[s].std() for s in combined)
        self._fit_mixup_score()

    def _mixup(self, head) -> tuple[np.ndarray, np.ndarray]:
        """Pseudo-outliers: two training texts of different intents, their embeddings mixed half and half (give or
        take 0.2), then through the head."""
        import torch

        rng = np.random.default_rng(0)
        first, second = rng.integers(0, len(self.bank), (2, MIXUP_PAIRS))
        different = self.bank_labels[first] != self.bank_labels[second]
        first, second = first[different], second[different]
        weight = rng.uniform(0.3, 0.7, len(first))[:, None]
        mixed = weight * self.bank[first] + (1 - weight) * self.bank[second]
        with torch.no_grad():
            return mixed, head.logits_from_embeddings(torch.from_numpy(mixed).float()).numpy()

    def _scores(self, pooled: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        from tuneloop.models.classifier import softmax

        unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        similarities = unit @ self.unit_bank.T
        predicted = logits.argmax(1)
        same_intent = self.bank_labels[None, :] == predicted[:, None]
        nearest = np.sort(similarities, axis=1)[:, ::-1]
        to_classes = _squared_distances(pooled, self.means, self.precision)
        to_all = _squared_distances(pooled, self.overall_mean[None], self.overall_precision)
        top = logits.max(1)
        return {
            "probability": softmax(logits).max(1),
            "cosine": top / self.spec.cosine_scale * self.spec.temperature,
            "energy": top + np.log(np.exp(logits - top[:, None]).sum(1)),
            "knn-1": nearest[:, 0],
            "knn-10": nearest[:, 9],
            "knn-intent": np.where(same_intent, similarities, -1.0).max(1),
            "mahalanobis": -to_classes.min(1),
            "relative mahalanobis": -(to_classes - to_all).min(1),
        }

    def _fit_mixup_score(self) -> None:
        from sklearn.linear_model import LogisticRegression

        features = ("probability", "knn-intent")

        def stacked(part: dict[str, np.ndarray]) -> np.ndarray:
            return np.stack([part[f] for f in features], axis=1)

        inside, pseudo = stacked(self.by_part["validation"]), stacked(self.by_part["mixup"])
        fitted = LogisticRegression().fit(np.r_[inside, pseudo], np.r_[np.ones(len(inside)), np.zeros(len(pseudo))])
        for part in self.by_part.values():
            part["mixup"] = fitted.decision_function(stacked(part))

    def at_point(self, score: str, max_rejected: float) -> dict[str, float]:
        """Threshold-free separation, and the test's rates at the threshold that turns away `max_rejected` of the
        validation split."""
        from sklearn.metrics import roc_auc_score

        known, unknown = self.by_part["test_known"][score], self.by_part["test_unseen"][score]
        threshold = np.quantile(self.by_part["validation"][score], max_rejected)
        truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
        return {
            "auroc": round(float(roc_auc_score(truth, np.r_[known, unknown])), 4),
            "in_scope_rejected": round(float((known < threshold).mean()), 4),
            "out_of_scope_caught": round(float((unknown < threshold).mean()), 4),
            # The test curve's own point at that share rejected, whatever the validation split says.
            f"caught_at_{max_rejected:.0%}_test_rejected": round(
                float((unknown < np.quantile(known, max_rejected)).mean()), 4
            ),
        }

    def stand_ins(self, max_rejected: float) -> dict[str, dict[str, float]]:
        """For probability and the best combination: the unseen intents' share caught at the policy's threshold,
        as each stand-in would estimate it, beside what the test measures."""
        from tuneloop.models.classifier import softmax

        rows = {}
        for score in ("probability", "probability + knn-intent", "mixup"):
            parts = self.by_part
            threshold = np.quantile(parts["validation"][score], max_rejected)
            caught = {
                name: round(float((parts[part][score] < threshold).mean()), 4)
                for name, part in (
                    ("test (what happens)", "test_unseen"),
                    ("own examples (held-out intents' training texts)", "unseen_examples"),
                    ("shipped off-topic tuning part", "shipped"),
                    ("mixup pseudo-outliers", "mixup"),
                )
            }
            if score == "probability":  # each validation message scored as if its intent were not one
                logits = self.logits["validation"].copy()
                logits[np.arange(len(logits)), self.validation_labels] = -np.inf
                caught["validation, own intent left out"] = round(float((softmax(logits).max(1) < threshold).mean()), 4)
            rows[score] = caught
        return rows


def _inverse_covariance(centred: np.ndarray) -> np.ndarray:
    """The precision matrix of centred embeddings, with a small ridge (384 dimensions, a few thousand texts)."""
    covariance = centred.T @ centred / len(centred)
    return np.linalg.inv(covariance + 1e-3 * np.trace(covariance) / len(covariance) * np.eye(len(covariance)))


def _squared_distances(points: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(points, means) squared Mahalanobis distances, a few hundred points at a time (memory)."""
    rows = []
    for chunk in np.array_split(points, max(1, len(points) // 256)):
        difference = chunk[:, None, :] - means[None]
        rows.append(np.einsum("ncd,de,nce->nc", difference, precision, difference))
    return np.concatenate(rows)


if __name__ == "__main__":
    main()
