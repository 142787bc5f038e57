"""Drift monitoring: each signal on synthetic data (quiet when production looks like training, loud when it does
not), the recommendation, the report files, and `watch` end to end on the tiny production model."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_extraction.text import HashingVectorizer

from helpers import toy_rows
from tuneloop.config import RegistryConfig
from tuneloop.db.schema import PredictionRecord
from tuneloop.errors import TuneloopError
from tuneloop.feedback.log import LoggedPrediction, PredictionLog
from tuneloop.feedback.monitor import (
    LABELS_FOR_RETRAIN,
    MIN_WINDOW,
    PSI_SIGNIFICANT,
    DriftReference,
    domain_auc,
    drift_reference,
    label_shift,
    monitor_folder,
    monitor_model,
    population_stability_index,
    psi_noise_floor,
    unfamiliar_share,
    watch,
    write_drift_report,
)
from tuneloop.registry import Registry

LABELS = ["refund", "delivery", "password", "invoice", "account"]
SHARES = [0.3, 0.25, 0.2, 0.15, 0.1]
SHOP = ["order", "refund", "parcel", "courier", "password", "login", "invoice", "account", "charge", "late", "my"]
WEATHER = ["rain", "sunny", "forecast", "storm", "cloud", "wind", "snow", "degrees", "humid", "tomorrow", "cold"]
START = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
ALL_FLAGS = ["label_shift", "confidence_shift", "unfamiliar_inputs", "embedding_shift"]


def hashed(texts: list[str]) -> np.ndarray:
    """A cheap stand-in for the sentence encoder: bag-of-words vectors."""
    return HashingVectorizer(n_features=256, alternate_sign=False).transform(texts).toarray()


def never_called(texts: list[str]) -> np.ndarray:
    raise AssertionError("the window is too small to embed")


def sentences(rng: np.random.Generator, n: int, words: list[str]) -> list[str]:
    return [" ".join(rng.choice(words, 5)) for _ in range(n)]


def confident(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.clip(rng.beta(8, 2, n), 0.25, 1.0)


def unsure(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.clip(rng.beta(2, 5, n), 0.25, 1.0)


@pytest.fixture()
def reference() -> DriftReference:
    rng = np.random.default_rng(1)
    train = pd.DataFrame({"text": sentences(rng, 2000, SHOP), "label": rng.choice(LABELS, 2000, p=SHARES)})
    return DriftReference("shop@3", LABELS, train, confident(rng, 1000), "validation split (1000 rows)")


def window(labels, confidences, texts) -> list[PredictionRecord]:
    """Logged predictions (oldest first here; the order does not matter), two versions of the model."""
    records = []
    for i, (label, top, text) in enumerate(zip(labels, confidences, texts, strict=True)):
        rest = (1 - top) / (len(LABELS) - 1)
        scores = {name: round(top if name == label else rest, 5) for name in LABELS}
        version = 2 if i < 10 else 3
        records.append(
            PredictionRecord(
                id=f"p{i}",
                created_at=START + timedelta(minutes=i),
                model_name="shop",
                model_version=version,
                text=text,
                label=label,
                scores=scores,
                source="api",
            )
        )
    return records


def quiet_window(n: int = 1000, seed: int = 2) -> list[PredictionRecord]:
    rng = np.random.default_rng(seed)
    return window(rng.choice(LABELS, n, p=SHARES), confident(rng, n), sentences(rng, n, SHOP))


def shifted_window(n: int = 600, seed: int = 3) -> list[PredictionRecord]:
    rng = np.random.default_rng(seed)
    return window(rng.choice(["invoice", "account"], n), unsure(rng, n), sentences(rng, n, WEATHER))


def test_psi_is_zero_for_identical_counts_and_large_for_a_shift():
    counts = np.array([120.0, 80.0, 50.0, 10.0])
    assert population_stability_index(counts, counts) == pytest.approx(0.0, abs=1e-12)
    assert population_stability_index(counts, counts * 7) < 0.01  # shares matter, not sample sizes
    assert population_stability_index(counts, counts[::-1]) > 1.0


def test_psi_stays_finite_with_empty_bins():
    psi = population_stability_index(np.array([50.0, 50.0, 0.0]), np.array([0.0, 0.0, 100.0]))
    assert np.isfinite(psi) and psi > 3.0


def test_the_noise_floor_predicts_the_psi_of_two_samples_of_one_distribution():
    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.ones(77) * 2)
    labels = [f"intent{i}" for i in range(77)]
    psis = [
        label_shift(labels, rng.choice(labels, 10_000, p=shares), rng.choice(labels, 1000, p=shares))[0]
        for _ in range(20)
    ]
    assert np.mean(psis) == pytest.approx(psi_noise_floor(77, 10_000, 1000), rel=0.3)


def test_label_shift_names_the_labels_that_moved_most():
    reference = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    psi, _, moved = label_shift(["a", "b", "c", "d"], reference, ["c"] * 80 + ["a"] * 20)
    assert psi > PSI_SIGNIFICANT
    assert [m["label"] for m in moved] == ["c", "a", "b", "d"]
    assert moved[0] == {"label": "c", "reference_share": 0.2, "window_share": 0.8}


def test_unfamiliar_share_is_about_five_percent_without_drift_and_significant_with_it():
    rng = np.random.default_rng(4)
    base = confident(rng, 5000)
    share, threshold, p_value = unfamiliar_share(base, confident(rng, 2000))
    assert 0.03 < share < 0.07 and p_value > 0.01
    assert threshold == pytest.approx(np.quantile(base, 0.05))
    share, _, p_value = unfamiliar_share(base, unsure(rng, 500))
    assert share > 0.5 and p_value < 1e-10


def test_domain_auc_is_chance_for_the_same_texts_and_near_one_for_another_vocabulary():
    rng = np.random.default_rng(5)
    training = sentences(rng, 1500, SHOP)
    assert abs(domain_auc(training, sentences(rng, 800, SHOP), hashed) - 0.5) < 0.08
    assert domain_auc(training, sentences(rng, 800, WEATHER), hashed) > 0.95


def test_a_window_like_the_training_data_is_quiet(reference):
    report = monitor_model(reference, quiet_window(), labelled_feedback=500, embed=hashed)
    assert report.flags == [] and report.recommendation == "nothing"
    assert report.label_psi < 0.05 and report.confidence_psi < 0.05
    assert abs(report.domain_auc - 0.5) < 0.1
    assert abs(report.window_confidence - report.reference_confidence) < 0.03
    assert report.window_size == 1000 and report.versions == {2: 10, 3: 990}
    assert report.window_start == START and report.window_end == START + timedelta(minutes=999)


def test_a_shifted_window_raises_every_flag_and_asks_for_labels_until_there_are_enough(reference):
    report = monitor_model(reference, shifted_window(), labelled_feedback=12, embed=hashed)
    assert report.flags == ALL_FLAGS
    assert report.label_psi > 1.0 and report.confidence_psi > 1.0 and report.domain_auc > 0.95
    assert report.unfamiliar_share > 0.5 and report.unfamiliar_p_value < 1e-10
    assert report.window_confidence < report.reference_confidence - 0.3
    assert {m["label"] for m in report.moved_labels[:2]} == {"invoice", "account"}
    assert report.recommendation == "collect labels"
    assert "tuneloop feedback suggest shop --budget 38" in report.reason
    assert "label shift" in report.reason and "embedding shift" in report.reason

    enough = monitor_model(reference, shifted_window(), labelled_feedback=LABELS_FOR_RETRAIN, embed=hashed)
    assert enough.recommendation == "retrain" and "tuneloop retrain shop" in enough.reason


def test_the_noise_floor_keeps_a_small_window_over_many_labels_from_crying_wolf():
    rng = np.random.default_rng(6)
    labels = [f"intent{i}" for i in range(77)]
    shares = rng.dirichlet(np.ones(77) * 2)
    train = pd.DataFrame({"text": sentences(rng, 3000, SHOP), "label": rng.choice(labels, 3000, p=shares)})
    many = DriftReference("intents@1", labels, train, confident(rng, 1000), "validation split")
    n = MIN_WINDOW
    records = window(["refund"] * n, confident(rng, n), sentences(rng, n, SHOP))
    for record, label in zip(records, rng.choice(labels, n, p=shares), strict=True):
        record.label = label
    report = monitor_model(many, records, labelled_feedback=0, embed=hashed)
    assert report.label_psi > PSI_SIGNIFICANT  # above the rule of thumb from sampling alone...
    assert report.label_psi < 2 * report.label_psi_noise_floor and "label_shift" not in report.flags  # ...not flagged


def test_a_tiny_window_recommends_nothing_and_never_embeds(reference):
    report = monitor_model(reference, shifted_window(n=MIN_WINDOW - 1), labelled_feedback=100, embed=never_called)
    assert report.flags == [] and report.recommendation == "nothing" and report.domain_auc is None
    assert "window too small" in report.reason and f"{MIN_WINDOW - 1} predictions" in report.reason
    assert report.label_psi > 1.0  # the figures are still there to look at


def test_an_empty_window_is_one_clear_error(reference):
    with pytest.raises(TuneloopError, match="no predictions of shop@3"):
        monitor_model(reference, [], labelled_feedback=0, embed=hashed)


class ScoringByLength:
    """A stand-in predictor whose confidence grows with a text's length."""

    ref, labels = "shop@3", LABELS

    def __init__(self) -> None:
        self.scored: list[list[str]] = []

    def predict_proba(self, texts: list[str], cleaned: bool = False) -> np.ndarray:
        assert cleaned  # prepared splits are cleaned already
        self.scored.append(texts)
        top = np.array([min(len(t) / 100, 0.99) for t in texts])
        return np.column_stack([top, 1 - top])


def test_the_reference_is_the_validation_split_or_else_a_seeded_training_sample():
    rng = np.random.default_rng(7)
    train = pd.DataFrame({"text": sentences(rng, 1500, SHOP), "label": rng.choice(LABELS, 1500)})
    val = pd.DataFrame({"text": ["x" * 40, "x" * 80], "label": ["refund", "invoice"]})
    predictor = ScoringByLength()
    with_val = drift_reference(predictor, {"train": train, "val": val})
    assert with_val.confidences.tolist() == [0.6, 0.8] and "validation split" in with_val.description
    assert with_val.model == "shop@3" and with_val.train is train

    without = drift_reference(predictor, {"train": train, "val": val.iloc[:0]}, seed=1)
    assert len(without.confidences) == 1000 and "no validation split" in without.description
    assert set(predictor.scored[-1]) <= set(train["text"])
    drift_reference(predictor, {"train": train, "val": val.iloc[:0]}, seed=1)
    assert predictor.scored[-1] == predictor.scored[-2]  # the sample is seeded


def test_the_report_is_written_as_json_and_html_with_the_recommendation_first(reference, tmp_path):
    report = monitor_model(reference, shifted_window(), labelled_feedback=3, embed=hashed)
    page = write_drift_report(report, monitor_folder(tmp_path, "shop"))
    saved = json.loads((page.parent / "drift.json").read_text())
    assert saved["recommendation"] == "collect labels" and saved["flags"] == ALL_FLAGS
    assert saved["window_start"] == START.isoformat() and saved["label_psi"] == pytest.approx(report.label_psi)
    assert saved["window_end_seconds"] == (START + timedelta(minutes=599)).timestamp()
    text = page.read_text()
    assert page.name == "drift.html"
    assert text.index("Recommendation: collect labels") < text.index("<table>")
    assert text.count("<img") == 2 and "domain classifier AUC" in text


def test_watch_compares_the_production_versions_log_with_its_training_data(served):
    _, home = served
    registry = Registry(RegistryConfig(home=home))
    version = registry.get("toy@production")
    prediction_log = PredictionLog(registry.database_url, home)
    try:
        with pytest.raises(TuneloopError, match="no predictions of 'toy'"):
            watch("toy", registry, prediction_log, last=500)
        labels = ["refund", "delivery", "password"]
        now = datetime.now(UTC)
        logged = [
            LoggedPrediction.of("toy", version.version, labels, row["text"], np.array([0.8, 0.1, 0.1]), "api", now)
            for row in toy_rows(per_label=80, seed=11)
        ]
        before = LoggedPrediction.of("toy", 0, labels, "old parcel", np.array([0.1, 0.8, 0.1]), "api", START)
        prediction_log.record([*logged, before])
        prediction_log.flush()
        for prediction in logged[:3]:
            prediction_log.add_feedback(prediction.id, corrected_label="delivery")
        prediction_log.add_feedback(logged[3].id, rating=1)
        prediction_log.add_feedback(logged[4].id, rating=-1)  # says wrong, proposes no label
        prediction_log.add_feedback(before.id, corrected_label="refund")  # made before the version existed
        report = watch("toy", registry, prediction_log, last=200)
        earlier = watch("toy", registry, prediction_log, last=200, until=now)
    finally:
        prediction_log.close()
    assert report.model == version.ref and report.window_size == 200
    assert report.labelled_feedback == 4
    assert "validation split" in report.reference and report.domain_auc is not None
    assert report.moved_labels[0]["label"] == "refund"  # every logged prediction said refund
    assert earlier.window_size == 1 and earlier.versions == {0: 1} and "window too small" in earlier.reason


def test_watch_without_a_production_version_is_one_clear_error(tmp_path):
    registry = Registry(RegistryConfig(home=tmp_path))
    prediction_log = PredictionLog(registry.database_url, tmp_path)
    try:
        with pytest.raises(TuneloopError, match="no model named 'shop'"):
            watch("shop", registry, prediction_log, last=500)
    finally:
        prediction_log.close()


def test_the_monitor_command_writes_the_report_and_the_server_exports_its_figures(served):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families
    from typer.testing import CliRunner

    from tuneloop.cli import app as cli
    from tuneloop.serve.app import create_app

    config, home = served
    runner = CliRunner()
    with TestClient(create_app(config)) as client:
        assert "tuneloop_drift_label_psi{" not in client.get("/metrics").text  # no report yet: no series
        texts = [row["text"] for row in toy_rows(per_label=80, seed=12)][: MIN_WINDOW + 20]
        for start in range(0, len(texts), 50):
            assert client.post("/v1/predict", json={"texts": texts[start : start + 50]}).status_code == 200
        client.app.state.tuneloop.prediction_log.flush()  # the server writes in the background
        shown = runner.invoke(cli, ["monitor", "toy", "--last", "1000", f"registry.home={home}"])
        assert shown.exit_code == 0, shown.output
        report = json.loads((monitor_folder(home, "toy") / "drift.json").read_text())
        assert report["window_size"] == len(texts) and f"{report['recommendation']}:" in shown.output
        assert (monitor_folder(home, "toy") / "drift.html").is_file()
        exported = client.get("/metrics").text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exported)
        for sample in family.samples
        if sample.name.startswith("tuneloop_drift_")
    }
    toy = (("model", "toy"),)
    assert samples[("tuneloop_drift_label_psi", toy)] == pytest.approx(report["label_psi"])
    assert samples[("tuneloop_drift_unfamiliar_share", toy)] == pytest.approx(report["unfamiliar_share"])
    assert samples[("tuneloop_drift_flags", toy)] == len(report["flags"])
    assert samples[("tuneloop_drift_recommendation", (("action", report["recommendation"]), *toy))] == 1
    bad = runner.invoke(cli, ["monitor", "toy", "--since", "yesterday", f"registry.home={home}"])
    assert bad.exit_code == 1 and "is not a time" in bad.output and "Traceback" not in bad.output
