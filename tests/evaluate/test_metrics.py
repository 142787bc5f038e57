from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from tuneloop.evaluate.metrics import calibration, classification_metrics
from tuneloop.evaluate.report import render_html
from tuneloop.evaluate.schema import ClassifierReport, Overfitting


def test_perfectly_calibrated_bins_have_zero_ece():
    confidence = np.array([0.95] * 20)
    correct = np.array([True] * 19 + [False])
    assert calibration(confidence, correct, 10).ece == pytest.approx(0.0, abs=1e-9)


def test_overconfident_model_has_ece_equal_to_the_gap():
    confidence = np.array([0.9] * 10)
    correct = np.array([True] * 5 + [False] * 5)
    assert calibration(confidence, correct, 10).ece == pytest.approx(0.4)


def sample_metrics():
    labels = ["a", "b", "c"]
    true = np.array([0, 0, 1, 1, 2, 2, 2])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
            [0.1, 0.6, 0.3],
            [0.1, 0.1, 0.8],
            [0.6, 0.2, 0.2],
            [0.2, 0.2, 0.6],
        ]
    )
    texts = [f"t{i}" for i in range(7)]
    return classification_metrics(true, probs, labels, texts, bins=5), labels


def test_classification_metrics():
    metrics, _ = sample_metrics()
    assert metrics.accuracy == pytest.approx(5 / 7)
    assert metrics.confusion_matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    per_class = {row.label: row.model_dump() for row in metrics.per_class}
    assert per_class["b"]["precision"] == pytest.approx(2 / 3)
    assert per_class["c"]["recall"] == pytest.approx(2 / 3)
    assert metrics.macro_f1 == pytest.approx(np.mean([row.f1 for row in metrics.per_class]))
    assert {(c.true, c.predicted) for c in metrics.top_confusions} == {("a", "b"), ("c", "a")}
    assert metrics.top_confusions[0].examples


def test_confident_errors_are_listed_as_possible_label_errors():
    labels = ["neg", "pos"]
    true = np.array([0, 0, 1, 1, 1])
    probs = np.array([[0.97, 0.03], [0.05, 0.95], [0.4, 0.6], [0.6, 0.4], [0.92, 0.08]])
    metrics = classification_metrics(
        true, probs, labels, ["ok", "great food", "fine", "meh", "awful"], suspect_confidence=0.9, suspects_listed=5
    )
    suspects = metrics.label_suspects.model_dump()
    assert (suspects["count"], suspects["share"]) == (2, pytest.approx(0.4))
    assert [(r["text"], r["label"], r["predicted"]) for r in suspects["rows"]] == [
        ("great food", "neg", "pos"),
        ("awful", "pos", "neg"),
    ]
    page = render_html(ClassifierReport(title="t", labels=labels, base_model="m", test=metrics))
    assert "Possible label errors" in page and "great food" in page
    capped = classification_metrics(true, probs, labels, ["a"] * 5, suspects_listed=1).label_suspects.model_dump()
    assert (capped["count"], len(capped["rows"])) == (2, 1)


def test_html_report_embeds_png_plots():
    metrics, labels = sample_metrics()
    page = render_html(
        ClassifierReport(
            title="t",
            labels=labels,
            base_model="m",
            test=metrics,
            overfitting=Overfitting(
                train_accuracy=1.0,
                test_accuracy=0.7,
                train_macro_f1=1.0,
                test_macro_f1=0.6,
                accuracy_gap=0.3,
                train_rows_scored=7,
                likely_overfitting=True,
            ),
            training_history=[{"epoch": 1, "step": 10, "train_loss": 1.0, "val_macro_f1": 0.5}],
        )
    )
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert "likely overfitting" in page
    assert "http" not in page.split("<body>")[1]


def test_the_report_is_written_with_numpy_scalars_as_plain_json():
    import json

    metrics, labels = sample_metrics()
    report = ClassifierReport(
        title="t", labels=labels, test=metrics, data={"support": np.int64(3), "f1": np.float32(0.5)}
    )
    assert json.loads(report.to_json())["data"] == {"support": 3, "f1": 0.5}
