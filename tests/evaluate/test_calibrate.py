"""Temperature scaling: fitted on validation, stored with the version, applied wherever it is loaded."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers import tiny_config, toy_rows
from tuneloop.data.prepare import load_prepared
from tuneloop.evaluate.calibrate import MIN_ROWS, calibrate_head, fit_temperature
from tuneloop.evaluate.metrics import calibration
from tuneloop.models.classifier import TextClassifier, predict_logits, softmax
from tuneloop.models.predictor import load_model
from tuneloop.registry import Registry
from tuneloop.training import classification


def synthetic(rng: np.random.Generator, rows: int, sharpness: float) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 5-class model that is right about 70% of the time, multiplied by `sharpness`."""
    truth = rng.integers(0, 5, rows)
    logits = rng.normal(size=(rows, 5))
    logits[np.arange(rows), truth] += 1.5
    return logits * sharpness, truth


def ece(logits: np.ndarray, truth: np.ndarray) -> float:
    probs = softmax(logits)
    return calibration(probs.max(1), probs.argmax(1) == truth, 15).ece


def test_an_over_confident_model_is_cooled_and_an_under_confident_one_sharpened():
    rng = np.random.default_rng(0)
    hot, truth = synthetic(rng, 4000, sharpness=8.0)
    temperature = fit_temperature(hot, truth)
    assert temperature == pytest.approx(8 * fit_temperature(hot / 8, truth), rel=1e-3)  # it undoes the sharpening
    assert ece(hot / temperature, truth) < ece(hot, truth) / 5
    cold, truth = synthetic(rng, 4000, sharpness=0.2)
    assert fit_temperature(cold, truth) < 0.3
    assert ((hot / temperature).argmax(1) == hot.argmax(1)).all()


@pytest.fixture(scope="module")
def calibrated_run(tiny_encoder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrated")
    data = folder / "toy.csv"
    rows = toy_rows(per_label=120, seed=4)
    for row in rows[::5]:  # a fifth of the labels wrong, so that the model cannot be right on every row
        row["label"] = {"refund": "delivery", "delivery": "password", "password": "refund"}[row["label"]]
    pd.DataFrame(rows).to_csv(data, index=False)
    config = tiny_config(tiny_encoder, data, folder / "home", "train.epochs=3")
    return config, classification.run(config, show_progress=False)


def test_training_fits_a_temperature_that_the_loaded_version_applies(calibrated_run):
    config, outcome = calibrated_run
    fitted = outcome.report.calibration
    assert fitted.fitted and fitted.rows >= MIN_ROWS and fitted.temperature != 1.0
    assert fitted.val_ece_after < fitted.val_ece_before
    stored = json.loads((outcome.folder.model / "classifier.json").read_text())
    assert stored["temperature"] == fitted.temperature

    test = outcome.report.test
    assert test.temperature == fitted.temperature and test.calibration_before is not None
    assert "Temperature scaling" in outcome.report_html.read_text()

    predictor = load_model(outcome.version.ref, Registry(config.registry))
    texts = load_prepared(outcome.folder.data()).test["text"].tolist()
    raw, tokenizer = TextClassifier.load(outcome.folder.model)
    raw.spec.temperature = 1.0
    trained = predict_logits(raw, tokenizer, texts)
    served = predictor.predict_proba(texts, cleaned=True)
    np.testing.assert_allclose(served, softmax(trained / fitted.temperature), atol=1e-5)
    assert (served.argmax(1) == trained.argmax(1)).all()


def test_a_deliberately_over_confident_model_gets_a_lower_ece(calibrated_run):
    _, outcome = calibrated_run
    predictor = load_model(outcome.folder.root, runtime="torch")
    predictor.model.head.scale *= 8  # far sharper than it was trained: near 100% sure of every answer
    frozen = load_prepared(outcome.folder.data())
    rows = pd.concat([frozen.val, frozen.test])  # more rows than validation alone: a steadier ECE
    fitted = calibrate_head(predictor, rows, bins=15)
    assert fitted.temperature > 5
    # At least a quarter lower. On a tiny model's few dozen rows the exact cut moves with the installed
    # packages' numerics (a fresh install measured a third lower, where an earlier one passed 40%).
    assert fitted.val_ece_after < 0.75 * fitted.val_ece_before


def test_a_model_right_on_every_validation_row_is_left_as_trained(calibrated_run):
    """Without an error the likelihood keeps rising as the temperature falls: the fit would only sharpen."""
    _, outcome = calibrated_run
    predictor = load_model(outcome.folder.root, runtime="torch")
    val = load_prepared(outcome.folder.data()).val
    agreeing = val.assign(label=predictor.predict(val["text"].tolist(), cleaned=True))
    fitted = calibrate_head(predictor, agreeing, bins=15)
    assert not fitted.fitted and fitted.temperature == 1.0 and "every validation row" in fitted.reason


def test_too_few_validation_rows_keep_the_trained_probabilities(calibrated_run):
    _, outcome = calibrated_run
    predictor = load_model(outcome.folder.root, runtime="torch")
    val = load_prepared(outcome.folder.data()).val.head(MIN_ROWS - 1)
    fitted = calibrate_head(predictor, val, bins=15)
    assert not fitted.fitted and fitted.temperature == 1.0 and "fewer than" in fitted.reason
    assert predictor.temperature == 1.0
