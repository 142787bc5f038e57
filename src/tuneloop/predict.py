"""Predict with a registered classifier: label, probability and top-k per text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneloop.data.clean import clean_text
from tuneloop.models.classifier import MODEL_DIR, TextClassifier, predict_proba
from tuneloop.registry.store import ModelVersion, Registry


@dataclass
class Prediction:
    text: str
    label: str
    probability: float
    top_k: list[tuple[str, float]]


class Predictor:
    """A loaded classifier; texts are cleaned exactly as training data was."""

    def __init__(self, folder: Path, version: ModelVersion | None = None) -> None:
        self.model, self.tokenizer = TextClassifier.load(folder)
        self.version = version

    @classmethod
    def from_registry(cls, registry: Registry, ref: str) -> Predictor:
        version = registry.get(ref)
        return cls(registry.artifacts(version) / MODEL_DIR, version)

    @property
    def labels(self) -> list[str]:
        return self.model.spec.labels

    def predict(self, texts: list[str], top_k: int = 3) -> list[Prediction]:
        probs = predict_proba(self.model, self.tokenizer, [clean_text(t) for t in texts])
        results = []
        for text, row in zip(texts, probs, strict=True):
            ranked = row.argsort()[::-1][:top_k]
            top = [(self.labels[i], float(row[i])) for i in ranked]
            results.append(Prediction(text=text, label=top[0][0], probability=top[0][1], top_k=top))
        return results
