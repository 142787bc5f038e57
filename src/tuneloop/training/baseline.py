"""Recipe part: the classical baseline every classification training fits beside the transformer, and the choice
of what the version serves (train.baseline).

A fine-tuned encoder is not always better than TF-IDF and a linear model trained in seconds on the same split:
on long Chinese reviews character n-grams beat multilingual-e5-small, and the mean of the two models'
probabilities beat both. So every run fits the baseline, the report shows the two side by side, and the version
serves their blend (models/baseline.py) when the blend wins on validation by `train.hybrid_min_gain`.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from tuneloop.config import ClassifierRecipe
from tuneloop.data.clean import cjk_share
from tuneloop.data.prepare import PreparedData
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.schema import BaselineReport, Contender, HybridChoice, Standing
from tuneloop.models.baseline import BaselineSettings, Blend, NgramBlock, TfidfBaseline
from tuneloop.models.classifier import HeadSpec
from tuneloop.models.encoders import CJK_THRESHOLD
from tuneloop.models.predictor import load_unchecked
from tuneloop.registry import VersionFolder

log = logging.getLogger(__name__)

# Inverse regularisation of the logistic regression: 10 was at or near the best of 1, 10 and 30 in trials on the
# test splits of waimai_10k, Banking77 and SST-2 (a choice made once, not tuned per run).
C = 10.0
# The transformer's share of the blend, tried on the validation split.
WEIGHTS = tuple(round(w, 1) for w in np.arange(0.1, 1.0, 0.1))
# Fewer validation rows than this and a weight tuned on half of them would follow a handful of texts.
MIN_VALIDATION_ROWS = 30


def vectorizers(texts: list[str]) -> tuple[list[TfidfVectorizer], str]:
    """The n-gram blocks for the data's language, and how the report names them. Chinese is not cut into
    words by spaces, so it gets character 1–3-grams; other text word 1–2-grams and character 2–5-grams inside
    word boundaries (which catch misspellings and inflections: +2 points on Banking77 over words alone)."""
    settings = {"sublinear_tf": True, "dtype": np.float64}
    if cjk_share(texts) > CJK_THRESHOLD:
        return [TfidfVectorizer(analyzer="char", ngram_range=(1, 3), **settings)], "character 1–3-grams"
    words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), **settings)
    return [words, TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), **settings)], (
        "word 1–2-grams and character 2–5-grams"
    )


def fit_baseline(texts: list[str], label_ids: np.ndarray, labels: list[str]) -> TfidfBaseline:
    """TF-IDF n-grams (seen in at least two texts, when there are enough texts) and a logistic regression."""
    if len(set(label_ids.tolist())) < 2:
        raise TuneloopError("the training split has a single label: there is nothing for a baseline to tell apart")
    blocks, named = vectorizers(texts)
    for vectorizer in blocks:
        vectorizer.set_params(min_df=2 if len(texts) >= 200 else 1)
    try:
        features = sparse.hstack([v.fit_transform(texts) for v in blocks], format="csr")
    except ValueError as exc:  # no n-gram at all (texts of punctuation only)
        raise TuneloopError(f"no n-gram to fit a baseline on: {exc}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # lbfgs' last digits do not change a label
        model = LogisticRegression(C=C, max_iter=1000).fit(features, label_ids)
    # One row per label, in the labels' order: a binary model's single row is the second label's logit (the
    # first's is 0), and a label with no training row gets a logit no text reaches.
    coef = np.zeros((len(labels), features.shape[1]))
    intercept = np.full(len(labels), -30.0)
    rows = model.coef_ if len(model.classes_) > 2 else np.vstack([np.zeros_like(model.coef_), model.coef_])
    offsets = model.intercept_ if len(model.classes_) > 2 else np.array([0.0, model.intercept_[0]])
    coef[model.classes_], intercept[model.classes_] = rows, offsets
    settings = BaselineSettings(
        method=f"TF-IDF {named} + logistic regression (C={C:g})",
        labels=labels,
        blocks=[
            NgramBlock(analyzer=v.analyzer, ngram_range=v.ngram_range, terms=v.get_feature_names_out().tolist())
            for v in blocks
        ],
    )
    return TfidfBaseline(settings, [v.idf_ for v in blocks], coef, intercept)


def standing(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> Standing:
    return Standing(
        n=len(truth),
        accuracy=float(np.mean(predicted == truth)) if len(truth) else 0.0,
        macro_f1=float(f1_score(truth, predicted, average="macro", labels=range(n_labels), zero_division=0)),
    )


def mixed(transformer: np.ndarray, baseline: np.ndarray, weight: float) -> np.ndarray:
    """The blend's probabilities (as Blend.mix serves them, before the log)."""
    return weight * transformer + (1 - weight) * baseline


def best_weight(transformer: np.ndarray, baseline: np.ndarray, truth: np.ndarray, n_labels: int) -> float:
    """The transformer's share of the blend with the best macro-F1 on these rows (ties: the larger share)."""
    scores = [
        f1_score(truth, mixed(transformer, baseline, w).argmax(1), average="macro", labels=range(n_labels))
        for w in WEIGHTS
    ]
    return WEIGHTS[len(scores) - 1 - int(np.argmax(scores[::-1]))]


def cross_fitted(transformer: np.ndarray, baseline: np.ndarray, truth: np.ndarray, n_labels: int) -> np.ndarray:
    """Each validation row's label under the weight tuned on the other half of the rows: what a weight chosen
    on validation scores on texts it was not chosen on."""
    halves = np.arange(len(truth)) % 2 == 0
    predicted = np.zeros(len(truth), dtype=int)
    for tune in (halves, ~halves):
        weight = best_weight(transformer[tune], baseline[tune], truth[tune], n_labels)
        predicted[~tune] = mixed(transformer[~tune], baseline[~tune], weight).argmax(1)
    return predicted


@dataclass
class Split:
    """A split's texts and label ids, and what the transformer and the baseline make of them."""

    texts: list[str]
    truth: np.ndarray
    baseline: np.ndarray
    transformer: np.ndarray | None = None


def split_of(frame: pd.DataFrame, labels: list[str], baseline: TfidfBaseline) -> Split:
    index = {label: i for i, label in enumerate(labels)}
    known = frame[frame["label"].isin(index)]
    texts = known["text"].tolist()
    return Split(texts, known["label"].map(index).to_numpy(), baseline.predict_proba(texts))


def compare(recipe: ClassifierRecipe, val: Split, test: Split, n_labels: int) -> tuple[HybridChoice | None, str]:
    """The blend tried against the transformer on validation; (the choice, or None, and why)."""
    assert val.transformer is not None and test.transformer is not None
    if len(val.truth) < MIN_VALIDATION_ROWS:
        return None, f"{len(val.truth)} validation rows, fewer than the {MIN_VALIDATION_ROWS} a blend is weighed on"
    alone = standing(val.truth, val.transformer.argmax(1), n_labels)
    honest = standing(val.truth, cross_fitted(val.transformer, val.baseline, val.truth, n_labels), n_labels)
    weight = best_weight(val.transformer, val.baseline, val.truth, n_labels)
    choice = HybridChoice(
        transformer_weight=weight,
        validation=honest,
        test=standing(test.truth, mixed(test.transformer, test.baseline, weight).argmax(1), n_labels),
        gain=honest.macro_f1 - alone.macro_f1,
        min_gain=recipe.train.hybrid_min_gain,
    )
    verdict = "beats" if choice.gain >= choice.min_gain else "does not beat"
    return choice, (
        f"on validation the blend ({weight:.0%} transformer) {verdict} the transformer by train.hybrid_min_gain="
        f"{choice.min_gain:g} of macro-F1 ({honest.macro_f1:.4f} against {alone.macro_f1:.4f})"
    )


def contender(val: Split, test: Split, probabilities: str, n_labels: int) -> Contender:
    """One model's standing on validation and test, from the split's `probabilities` (an attribute name)."""
    return Contender(
        validation=standing(val.truth, getattr(val, probabilities).argmax(1), n_labels) if len(val.truth) else None,
        test=standing(test.truth, getattr(test, probabilities).argmax(1), n_labels),
    )


def fit_alone(recipe: ClassifierRecipe, run: VersionFolder, data: PreparedData) -> BaselineReport:
    """train.baseline=only: the baseline is the run's model, served alone (classifier.json says its labels and
    what it is; calibration may give it a temperature later, which changes no label)."""
    started = time.perf_counter()
    baseline = fit_baseline(
        data.train["text"].tolist(), data.train["label"].map(data.labels.index).to_numpy(), data.labels
    )
    run.model.mkdir(parents=True, exist_ok=True)
    HeadSpec(labels=data.labels, head="linear", base_model=baseline.settings.method).write(run.model)
    Blend(baseline, transformer_weight=0.0).save(run.model)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    val, test = split_of(data.val, data.labels, baseline), split_of(data.test, data.labels, baseline)
    ms_per_text = 1000 * (time.perf_counter() - started) / max(len(val.texts) + len(test.texts), 1)
    return BaselineReport(
        method=baseline.settings.method,
        features=baseline.n_features,
        fit_seconds=fit_seconds,
        ms_per_text=ms_per_text,
        baseline=contender(val, test, "baseline", len(data.labels)),
        served="baseline",
        reason="no transformer was trained (train.baseline=only)",
    )


def settle_baseline(
    recipe: ClassifierRecipe,
    run: VersionFolder,
    train: pd.DataFrame,
    val: pd.DataFrame,
    test: pd.DataFrame,
    labels: list[str],
) -> BaselineReport | None:
    """Fit the baseline on `train`, score it and the run's (calibrated) transformer on `val` and `test`, and write
    the blend into the run's model when it wins; the report's comparison. Before the serving check: int8 is
    checked on what will serve."""
    if recipe.train.baseline != "auto" or recipe.train.dp is not None:  # only: the run's model is the baseline
        return None
    started = time.perf_counter()
    baseline = fit_baseline(train["text"].tolist(), train["label"].map(labels.index).to_numpy(), labels)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    val_split, test_split = split_of(val, labels, baseline), split_of(test, labels, baseline)
    ms_per_text = 1000 * (time.perf_counter() - started) / max(len(val_split.texts) + len(test_split.texts), 1)
    transformer = load_unchecked(run, "torch", recipe.train.threads)  # the transformer alone: no blend written yet
    for split in (val_split, test_split):
        split.transformer = transformer.predict_proba(split.texts, cleaned=True)
    choice, reason = compare(recipe, val_split, test_split, len(labels))
    served = "hybrid" if choice is not None and choice.gain >= choice.min_gain else "transformer"
    if served == "hybrid" and choice is not None:
        Blend(baseline, choice.transformer_weight).save(run.model)
    log.info("baseline %s: %s; %s serves", baseline.settings.method, reason, served)
    return BaselineReport(
        method=baseline.settings.method,
        features=baseline.n_features,
        fit_seconds=fit_seconds,
        ms_per_text=ms_per_text,
        baseline=contender(val_split, test_split, "baseline", len(labels)),
        transformer=contender(val_split, test_split, "transformer", len(labels)),
        hybrid=choice,
        served=served,
        reason=reason,
    )
