"""Drift monitoring: has production traffic moved away from what the live version was trained on, and what to do.

A window of the prediction log is compared with the version's training data on four signals, each simple to
explain: the predicted labels' shares, the model's confidence, the share of inputs it is unusually unsure about
(a proxy for out-of-scope messages), and whether a classifier can tell production texts from training texts at
all. A signal is flagged only when its effect is large and beyond sampling noise; what to do then depends on how
much labelled feedback there is to retrain on.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from tuneloop.atomic import write_text_atomically
from tuneloop.data.clean import clean_text
from tuneloop.data.prepare import load_prepared
from tuneloop.db.schema import PredictionRecord
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.plots import _png, _styled
from tuneloop.evaluate.report import html_image, html_page, html_table
from tuneloop.feedback.export import proposed_label
from tuneloop.feedback.log import PredictionLog
from tuneloop.models.embedder import SentenceEmbedder
from tuneloop.models.encoders import resolve_encoder
from tuneloop.models.predictor import Predictor, load_model
from tuneloop.registry import Home, Registry, VersionFolder

Embed = Callable[[list[str]], np.ndarray]

# The usual credit-scoring rule of thumb for the population stability index (e.g. Siddiqi, "Credit Risk
# Scorecards"): below 0.1 stable, 0.1 to 0.25 a moderate shift, 0.25 and above a significant one.
PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25
# PSI between two samples of one distribution is not 0: over K bins, sampling alone gives about
# (K-1)/n_window + (K-1)/n_reference (PSI is a chi-square statistic divided by the sample sizes). A 77-intent model
# watched over 300 predictions has a floor near 0.27, above the rule of thumb from chance alone; so that it does not
# cry wolf, a PSI is flagged only when it also exceeds this multiple of its floor.
NOISE_FLOOR_MARGIN = 2.0
# Half a count is added to every bin on both sides (Jeffreys' prior), so that an empty bin gives a finite log ratio.
PSI_PSEUDO_COUNT = 0.5
CONFIDENCE_BINS = 10  # confidences are binned at the reference's deciles
UNFAMILIAR_QUANTILE = 0.05  # below the reference's 5th percentile of confidence: ~5% of inputs when nothing changed
UNFAMILIAR_RATIO = 2.0  # flagged at twice that share or more...
UNFAMILIAR_P_VALUE = 0.01  # ...when a one-sided binomial test also rules out chance
# A domain classifier's ROC AUC: 0.5 when production texts cannot be told from training texts. 0.7 is where
# Hosmer and Lemeshow's scale ("Applied Logistic Regression") starts calling discrimination acceptable.
DOMAIN_AUC = 0.7
DOMAIN_SAMPLE = 2000  # texts per side at most: bounds the embedding time
DOMAIN_FOLDS = 5
REFERENCE_SAMPLE = 1000  # training rows scored for the reference confidences when there is no validation split
MIN_WINDOW = 200  # with fewer predictions, every figure says more about chance than about production
LABELS_FOR_RETRAIN = 50  # labelled feedback rows, since the version was registered, worth a retrain
TOP_MOVED = 10
HISTOGRAM_EDGES = np.linspace(0.0, 1.0, 21)


@dataclass(frozen=True)
class DriftReference:
    """What a version's production window is compared with."""

    model: str  # NAME@VERSION
    labels: list[str]
    train: pd.DataFrame  # the training split: text, label
    confidences: np.ndarray  # the model's top probability on the reference texts
    description: str


@dataclass(frozen=True)
class DriftReport:
    """Every figure of one monitoring run, the flags they raise and what to do about them."""

    model: str
    reference: str
    window_size: int
    window_start: datetime
    window_end: datetime
    versions: dict[int, int]  # version -> predictions of it in the window
    label_psi: float
    label_psi_noise_floor: float
    moved_labels: list[dict[str, str | float]]  # label, reference_share, window_share; the largest moves first
    reference_confidence: float  # means
    window_confidence: float
    confidence_psi: float
    confidence_psi_noise_floor: float
    confidence_histogram: dict[str, list[float]]  # edges, and the reference's and window's shares between them
    unfamiliar_threshold: float
    unfamiliar_share: float
    unfamiliar_p_value: float
    domain_auc: float | None  # None when the window was too small to judge
    labelled_feedback: int
    flags: list[str]
    recommendation: str  # retrain | collect labels | nothing
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "window_end_seconds": self.window_end.timestamp(),  # for the server's gauge of the report's age
        }


def population_stability_index(reference: np.ndarray, window: np.ndarray) -> float:
    """PSI of two histograms given as counts over the same bins: Σ (w − r)·ln(w / r) over their shares."""
    r = (reference + PSI_PSEUDO_COUNT) / (reference.sum() + PSI_PSEUDO_COUNT * len(reference))
    w = (window + PSI_PSEUDO_COUNT) / (window.sum() + PSI_PSEUDO_COUNT * len(window))
    return float(np.sum((w - r) * np.log(w / r)))


def psi_noise_floor(bins: int, n_reference: int, n_window: int) -> float:
    """The PSI that sampling alone gives, on average, between two samples of one distribution."""
    return (bins - 1) / n_window + (bins - 1) / n_reference


def label_shift(
    labels: list[str], reference: Sequence[str], window: Sequence[str]
) -> tuple[float, float, list[dict[str, str | float]]]:
    """PSI of the window's label shares against the reference's, its noise floor, and the labels that moved most."""
    # Labels an older version in the window gave and this one lacks get bins of their own rather than vanishing.
    bins = list(dict.fromkeys([*labels, *reference, *window]))
    seen_before, seen_now = Counter(reference), Counter(window)
    r = np.array([seen_before[b] for b in bins], dtype=float)
    w = np.array([seen_now[b] for b in bins], dtype=float)
    r_share, w_share = r / r.sum(), w / w.sum()
    order = np.argsort(-np.abs(w_share - r_share), kind="stable")[:TOP_MOVED]
    moved: list[dict[str, str | float]] = [
        {"label": bins[i], "reference_share": float(r_share[i]), "window_share": float(w_share[i])} for i in order
    ]
    return population_stability_index(r, w), psi_noise_floor(len(bins), len(reference), len(window)), moved


def confidence_shift(reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    """PSI of the window's confidences over bins cut at the reference's deciles, and its noise floor."""
    # A model sure of most texts has tied deciles; they merge, and the floor counts the bins that remain.
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, CONFIDENCE_BINS + 1)[1:-1]))
    bins = len(edges) + 1
    r = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=bins).astype(float)
    w = np.bincount(np.searchsorted(edges, window, side="right"), minlength=bins).astype(float)
    return population_stability_index(r, w), psi_noise_floor(bins, len(reference), len(window))


def unfamiliar_share(reference: np.ndarray, window: np.ndarray) -> tuple[float, float, float]:
    """The share of window confidences below the reference's 5th percentile, that percentile, and the one-sided
    binomial p-value of the share against the 5% expected."""
    threshold = float(np.quantile(reference, UNFAMILIAR_QUANTILE))
    below = int((window < threshold).sum())
    p_value = binomtest(below, len(window), UNFAMILIAR_QUANTILE, alternative="greater").pvalue
    return below / len(window), threshold, float(p_value)


def domain_auc(reference_texts: list[str], window_texts: list[str], embed: Embed, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling window texts from reference texts (0.5: it cannot),
    on seeded samples of the same size from each side."""
    rng = np.random.default_rng(seed)
    n = min(DOMAIN_SAMPLE, len(reference_texts), len(window_texts))
    texts = [side[i] for side in (reference_texts, window_texts) for i in rng.choice(len(side), n, replace=False)]
    origin = np.repeat([0, 1], n)
    folds = StratifiedKFold(DOMAIN_FOLDS, shuffle=True, random_state=seed)
    scores = cross_val_score(LogisticRegression(max_iter=1000), embed(texts), origin, cv=folds, scoring="roc_auc")
    return float(np.mean(scores))


def _histogram(values: np.ndarray) -> list[float]:
    counts = np.histogram(np.clip(values, 0, 1), HISTOGRAM_EDGES)[0]
    return [float(count) / len(values) for count in counts]


def monitor_model(
    reference: DriftReference, window: list[PredictionRecord], labelled_feedback: int, embed: Embed, seed: int = 0
) -> DriftReport:
    """Compare a window of logged predictions with the reference; `embed` turns texts into sentence vectors and
    is called once, and only for a window of at least MIN_WINDOW predictions."""
    if not window:
        raise TuneloopError(f"no predictions of {reference.model} to monitor: serve it and let it answer some first")
    confidences = np.array([max(p.scores.values()) for p in window])
    label_psi, label_floor, moved = label_shift(
        reference.labels, reference.train["label"].tolist(), [p.label for p in window]
    )
    confidence_psi, confidence_floor = confidence_shift(reference.confidences, confidences)
    unfamiliar, threshold, p_value = unfamiliar_share(reference.confidences, confidences)
    auc, flags = None, []
    if len(window) >= MIN_WINDOW:
        # Cleaned as the training texts were, so that the classifier cannot tell them apart by formatting alone.
        window_texts = [clean_text(p.text) for p in window]
        auc = domain_auc(reference.train["text"].tolist(), window_texts, embed, seed)
        raised = {
            "label_shift": label_psi >= PSI_SIGNIFICANT and label_psi >= NOISE_FLOOR_MARGIN * label_floor,
            "confidence_shift": confidence_psi >= PSI_SIGNIFICANT
            and confidence_psi >= NOISE_FLOOR_MARGIN * confidence_floor,
            "unfamiliar_inputs": unfamiliar >= UNFAMILIAR_RATIO * UNFAMILIAR_QUANTILE and p_value < UNFAMILIAR_P_VALUE,
            "embedding_shift": auc >= DOMAIN_AUC,
        }
        flags = [flag for flag, up in raised.items() if up]
    recommendation, reason = recommend(reference.model, len(window), flags, labelled_feedback)
    times = [p.created_at for p in window]
    return DriftReport(
        model=reference.model,
        reference=reference.description,
        window_size=len(window),
        window_start=min(times),
        window_end=max(times),
        versions=dict(sorted(Counter(p.model_version for p in window).items())),
        label_psi=label_psi,
        label_psi_noise_floor=label_floor,
        moved_labels=moved,
        reference_confidence=float(reference.confidences.mean()),
        window_confidence=float(confidences.mean()),
        confidence_psi=confidence_psi,
        confidence_psi_noise_floor=confidence_floor,
        confidence_histogram={
            "edges": HISTOGRAM_EDGES.tolist(),
            "reference": _histogram(reference.confidences),
            "window": _histogram(confidences),
        },
        unfamiliar_threshold=threshold,
        unfamiliar_share=unfamiliar,
        unfamiliar_p_value=p_value,
        domain_auc=auc,
        labelled_feedback=labelled_feedback,
        flags=flags,
        recommendation=recommendation,
        reason=reason,
    )


def recommend(model: str, window_size: int, flags: list[str], labelled_feedback: int) -> tuple[str, str]:
    """What to do (retrain, collect labels or nothing) and one sentence saying why."""
    if window_size < MIN_WINDOW:
        return "nothing", f"window too small: {window_size} predictions, {MIN_WINDOW} are needed to judge drift"
    if not flags:
        return "nothing", "no drift flagged: production looks like the training data"
    flagged = ", ".join(flag.replace("_", " ") for flag in flags)
    since = f"{labelled_feedback} labelled feedback rows on predictions made since {model} was registered"
    name = model.split("@")[0]
    if labelled_feedback >= LABELS_FOR_RETRAIN:
        return "retrain", f"flagged: {flagged}; {since}: retrain on them with tuneloop retrain {name}"
    return "collect labels", (
        f"flagged: {flagged}; only {since}, {LABELS_FOR_RETRAIN} are needed to retrain: label more with "
        f"tuneloop feedback suggest {name} --budget {LABELS_FOR_RETRAIN - labelled_feedback}"
    )


def drift_reference(predictor: Predictor, splits: dict[str, pd.DataFrame], seed: int = 0) -> DriftReference:
    """The training split, and the model's confidences on the validation split (without one, on a seeded sample of
    training rows: texts the model has seen, so the reference runs more confident than production can be)."""
    train, val = splits["train"], splits.get("val")
    if val is not None and len(val):
        texts, description = val["text"].tolist(), f"validation split ({len(val)} rows)"
    else:
        texts = train["text"].sample(min(REFERENCE_SAMPLE, len(train)), random_state=seed).tolist()
        description = (
            f"no validation split: {len(texts)} training rows, which the model has seen (confidence runs high)"
        )
    confidences = predictor.predict_proba(texts, cleaned=True).max(axis=1)
    return DriftReference(predictor.ref, predictor.labels, train, confidences, description)


def version_embedder(folder: VersionFolder, registry: Registry) -> Embed:
    """Sentence vectors from the encoder the version was trained from, loaded at the first call."""
    started_from = json.loads(folder.encoder.read_text())["name"]

    def embed(texts: list[str]) -> np.ndarray:
        return SentenceEmbedder(resolve_encoder(started_from, registry)).encode(texts)

    return embed


def watch(
    name: str,
    registry: Registry,
    prediction_log: PredictionLog,
    last: int,
    since: datetime | None = None,
    until: datetime | None = None,
    seed: int = 0,
) -> DriftReport:
    """Monitor NAME's production version over the latest `last` predictions of NAME (every version; only those
    made at or after `since` and before `until` when given; both time-zone aware)."""
    record = registry.get(f"{name}@production")
    window = prediction_log.recent_predictions(name, last, since, until)
    if not window:
        between = (f" since {since.isoformat()}" if since else "") + (f" before {until.isoformat()}" if until else "")
        raise TuneloopError(f"no predictions of '{name}' in the log{between}: serve it and let it answer some first")
    folder = registry.folder(record)
    reference = drift_reference(load_model(record, registry), load_prepared(folder.data()).splits, seed)
    labelled = sum(
        1
        for feedback, prediction in prediction_log.feedback_for(name)
        if prediction.created_at >= record.created_at and proposed_label(feedback, prediction) is not None
    )
    return monitor_model(reference, window, labelled, version_embedder(folder, registry), seed)


def monitor_folder(home: Path, name: str) -> Path:
    """Where `tuneloop monitor NAME` writes its latest report (drift.json, drift.html), which the server exports."""
    return Home(home).monitoring(name)


@_styled
def moved_labels_png(moved: list[dict[str, str | float]]) -> bytes:
    figure = Figure(figsize=(7, 1.5 + 0.4 * len(moved)))
    axis = figure.subplots()
    positions = np.arange(len(moved))
    axis.barh(positions - 0.2, [m["reference_share"] for m in moved], height=0.4, color="#4c72b0", label="training")
    axis.barh(positions + 0.2, [m["window_share"] for m in moved], height=0.4, color="#dd8452", label="window")
    axis.set_yticks(positions, [str(m["label"]) for m in moved])
    axis.invert_yaxis()
    axis.set_xlabel("share of predictions")
    axis.set_title("Labels whose share moved most")
    axis.legend(loc="lower right")
    return _png(figure)


@_styled
def confidence_png(histogram: dict[str, list[float]]) -> bytes:
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    for side, colour in (("reference", "#4c72b0"), ("window", "#dd8452")):
        axis.stairs(histogram[side], histogram["edges"], fill=True, alpha=0.45, color=colour, label=side)
    axis.set_xlabel("confidence (top probability)")
    axis.set_ylabel("share")
    axis.set_title("Confidence")
    axis.legend(loc="upper left")
    return _png(figure)


def write_drift_report(report: DriftReport, folder: Path) -> Path:
    """drift.json and drift.html into `folder`; returns the HTML path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / "drift.json", json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    psi_bar = f"≥ {PSI_SIGNIFICANT} (moderate: {PSI_MODERATE}) and ≥ {NOISE_FLOOR_MARGIN:g}× the noise floor"
    label_floor = f"noise floor {report.label_psi_noise_floor:.3f}"
    confidence_floor = f"noise floor {report.confidence_psi_noise_floor:.3f}"
    confidence = f"{report.reference_confidence:.3f} / {report.window_confidence:.3f}"
    unfamiliar_detail = f"below {report.unfamiliar_threshold:.3f}; p = {report.unfamiliar_p_value:.2g}"
    unfamiliar_bar = f"≥ {UNFAMILIAR_RATIO * UNFAMILIAR_QUANTILE:.0%} and p < {UNFAMILIAR_P_VALUE}"
    auc = "not computed" if report.domain_auc is None else report.domain_auc
    retrain_bar = f"≥ {LABELS_FOR_RETRAIN} to retrain"
    figures = [  # flag, figure, value, detail, where it is flagged
        ("label_shift", "label PSI", report.label_psi, label_floor, psi_bar),
        ("confidence_shift", "confidence PSI", report.confidence_psi, confidence_floor, psi_bar),
        ("", "mean confidence (reference / window)", confidence, "", ""),
        ("unfamiliar_inputs", "unfamiliar share", report.unfamiliar_share, unfamiliar_detail, unfamiliar_bar),
        ("embedding_shift", "domain classifier AUC", auc, "0.5: no shift", f"≥ {DOMAIN_AUC}"),
        ("", "labelled feedback since registration", report.labelled_feedback, "", retrain_bar),
    ]
    columns = ["figure", "value", "detail", "flagged at", "flagged"]
    rows = [
        dict(zip(columns, [*figure, "yes" if flag in report.flags else ""], strict=True)) for flag, *figure in figures
    ]
    versions = ", ".join(f"v{version} ({count})" for version, count in report.versions.items())
    sections = [
        f"<h1>Drift of {html.escape(report.model)}</h1>",
        f"<h2>Recommendation: {html.escape(report.recommendation)}</h2><p>{html.escape(report.reason)}</p>",
        f"<p>{report.window_size} predictions from {report.window_start:%Y-%m-%d %H:%M} to "
        f"{report.window_end:%Y-%m-%d %H:%M} UTC, by versions {html.escape(versions)}; reference: "
        f"{html.escape(report.reference)}.</p>",
        html_table(rows, columns),
        html_image(moved_labels_png(report.moved_labels), "labels whose share moved most"),
        html_image(confidence_png(report.confidence_histogram), "confidence histograms"),
    ]
    page = folder / "drift.html"
    write_text_atomically(page, html_page(f"Drift of {report.model}", sections))
    return page


def latest_reports(home: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The latest drift report of each model name that has one (what the server's drift gauges show)."""
    reports = {}
    for name in names:
        path = monitor_folder(home, name) / "drift.json"
        if path.is_file():  # written atomically: a whole report or the previous one
            reports[name] = json.loads(path.read_text(encoding="utf-8"))
    return reports
