"""The classical baseline beside every fine-tuned classifier, and the blend of the two that a version may serve.

The baseline is TF-IDF over n-grams (one block of features per analyzer, each normalised on its own, as
scikit-learn's FeatureUnion of TfidfVectorizers does) and a linear model, fitted by training/baseline.py. A
version keeps it as data, never as a pickle: `baseline.json` holds the settings, the labels and each block's
vocabulary in column order, `baseline.safetensors` the idf weights, coefficients and intercepts. Loading it
builds scikit-learn's own CountVectorizer over the stored vocabulary, so n-grams are cut exactly as at fit
time, and the rest is arithmetic.

A `Blend` mixes the transformer's probabilities with the baseline's, `transformer_weight` of the first; a
weight of 0 is a version the baseline serves alone (train.baseline=only). The served logits of a blend are
the log of the mixed probabilities: softmax gives the mixture back, the argmax is the mixture's, and the gap
between the two best is a log-odds, so everything downstream of `Predictor.logits` reads them as it reads a
model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load_file, save_file
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.preprocessing import normalize

from tuneloop.errors import TuneloopError, first_line
from tuneloop.models.classifier import BASELINE_FOLDER, BLEND_FILE, softmax

SETTINGS_FILE = "baseline.json"  # in the model folder's BASELINE_FOLDER
WEIGHTS_FILE = "baseline.safetensors"


class _Stored(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NgramBlock(_Stored):
    """One block of TF-IDF features: how texts are cut into n-grams, and the n-grams kept (in column order)."""

    analyzer: Literal["word", "char", "char_wb"]
    ngram_range: tuple[int, int]
    terms: list[str]


class BaselineSettings(_Stored):
    """What baseline.json holds besides the arrays."""

    format: Literal[1] = 1
    method: str  # one line for the report, e.g. "TF-IDF character 1–3-grams + logistic regression (C=10)"
    labels: list[str]
    blocks: list[NgramBlock]


class BlendSettings(_Stored):
    """What blend.json holds: the transformer's share of the served probability (0: the baseline alone)."""

    transformer_weight: float = Field(ge=0.0, lt=1.0)


class TfidfBaseline:
    """TF-IDF n-gram blocks and a linear model, predicting from plain arrays."""

    def __init__(
        self, settings: BaselineSettings, idf: list[np.ndarray], coef: np.ndarray, intercept: np.ndarray
    ) -> None:
        self.settings = settings
        self.idf = idf
        self.coef = coef  # one row per label (a binary model's first row is zeros: its logit is the second's)
        self.intercept = intercept
        self.vectorizers = [
            CountVectorizer(analyzer=b.analyzer, ngram_range=b.ngram_range, vocabulary=b.terms, dtype=np.float64)
            for b in settings.blocks
        ]

    @property
    def labels(self) -> list[str]:
        return self.settings.labels

    @property
    def n_features(self) -> int:
        return int(self.coef.shape[1])

    def features(self, texts: list[str]) -> sparse.csr_matrix:
        """Each block's sublinear TF-IDF, l2-normalised per block (TfidfVectorizer's sublinear_tf=True), side by
        side."""
        blocks = []
        for vectorizer, idf in zip(self.vectorizers, self.idf, strict=True):
            counts = vectorizer.transform(texts).tocsr()
            np.log(counts.data, out=counts.data)
            counts.data += 1.0
            blocks.append(normalize(counts @ sparse.diags(idf), norm="l2"))
        return sparse.hstack(blocks, format="csr")

    def logits(self, texts: list[str]) -> np.ndarray:
        """The linear model's scores: softmax of a row is the baseline's probabilities."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        scores = self.features(texts) @ self.coef.T + self.intercept
        return np.asarray(scores, dtype=np.float32)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return softmax(self.logits(texts))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SETTINGS_FILE).write_text(self.settings.model_dump_json(indent=1), encoding="utf-8")
        arrays = {f"idf.{i}": idf.astype(np.float32) for i, idf in enumerate(self.idf)}
        arrays |= {"coef": self.coef.astype(np.float32), "intercept": self.intercept.astype(np.float32)}
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: Path) -> TfidfBaseline:
        """A stored baseline; one clear error for files tuneloop did not write (or that do not fit together)."""
        try:
            settings = BaselineSettings.model_validate_json((folder / SETTINGS_FILE).read_bytes())
            arrays = load_file(str(folder / WEIGHTS_FILE))
            idf = [arrays[f"idf.{i}"].astype(np.float64) for i in range(len(settings.blocks))]
            coef, intercept = arrays["coef"].astype(np.float64), arrays["intercept"].astype(np.float64)
            expected = (len(settings.labels), sum(len(b.terms) for b in settings.blocks))
            if coef.shape != expected or intercept.shape != expected[:1]:
                raise ValueError(f"weights of shape {coef.shape}, and the settings call for {expected}")
            if any(len(w) != len(b.terms) for w, b in zip(idf, settings.blocks, strict=True)):
                raise ValueError("an idf vector does not match its vocabulary")
            if not all(np.isfinite(a).all() for a in (*idf, coef, intercept)):
                raise ValueError("weights that are not finite numbers")
        except (OSError, ValueError, KeyError, ValidationError) as exc:
            raise TuneloopError(
                f"{folder} is not a baseline tuneloop wrote ({first_line(exc)}); retrain the version"
            ) from exc
        return cls(settings, idf, coef, intercept)


@dataclass(frozen=True)
class Blend:
    """What a version serves besides (or instead of) its transformer: `transformer_weight` of the transformer's
    probabilities plus the rest of the baseline's; 0 serves the baseline alone."""

    baseline: TfidfBaseline
    transformer_weight: float

    @property
    def baseline_only(self) -> bool:
        return self.transformer_weight == 0.0

    def mix(self, texts: list[str], transformer_logits: np.ndarray | None) -> np.ndarray:
        """The served logits of `texts`: the log of the mixed probabilities (the baseline's own scores when it
        serves alone, so that a temperature can divide them)."""
        if self.baseline_only or transformer_logits is None:
            return self.baseline.logits(texts)
        mixed = self.transformer_weight * softmax(transformer_logits)
        mixed += (1 - self.transformer_weight) * self.baseline.predict_proba(texts)
        # The floor keeps a label both models rule out finite (log 0 would be -inf, and softmax of a row of
        # -infs is not a number).
        return np.log(np.maximum(mixed, np.finfo(np.float32).tiny)).astype(np.float32)

    def save(self, model_dir: Path) -> None:
        self.baseline.save(model_dir / BASELINE_FOLDER)
        settings = BlendSettings(transformer_weight=self.transformer_weight)
        (model_dir / BLEND_FILE).write_text(settings.model_dump_json())

    @staticmethod
    def read(model_dir: Path) -> Blend | None:
        """The blend a model folder serves, or None when its transformer serves alone."""
        if not (model_dir / BLEND_FILE).is_file():
            return None
        try:
            settings = BlendSettings.model_validate_json((model_dir / BLEND_FILE).read_bytes())
        except (OSError, ValidationError) as exc:
            raise TuneloopError(f"{model_dir / BLEND_FILE} is not one tuneloop wrote ({first_line(exc)})") from exc
        return Blend(TfidfBaseline.load(model_dir / BASELINE_FOLDER), settings.transformer_weight)
