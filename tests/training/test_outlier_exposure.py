"""train.outlier_exposure: the shipped off-topic messages teach a model to be unsure of what its labels do
not cover; messages close to the user's own training texts are left out."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from helpers import MOODS, toy_rows
from tuneloop.cli import app
from tuneloop.config import DataConfig, load_config
from tuneloop.data.off_topic import PARTS, languages_of, off_topic_messages, part_of
from tuneloop.data.prepare import prepare_data
from tuneloop.errors import TuneloopError
from tuneloop.models.classifier import TextClassifier, predict_proba
from tuneloop.models.encoders import EncoderSource
from tuneloop.registry import VersionFolder
from tuneloop.training import losses
from tuneloop.training.classification import fine_tune
from tuneloop.training.losses import uniform_target_loss


def test_the_shipped_set_is_bilingual_large_and_split_into_fixed_disjoint_parts():
    parts = {name: off_topic_messages(name) for name in PARTS}
    every = pd.concat(parts.values())
    assert len(every) > 5000 and not every["text"].duplicated().any()
    assert (every["lang"].value_counts() > 2500).all() and every["domain"].nunique() >= 30
    assert abs(len(parts["train"]) / len(every) - 0.7) < 0.03  # by hash, close to the planned shares
    assert all(part_of(text) == name for name, frame in parts.items() for text in frame["text"][:50])
    chinese = off_topic_messages("tune", ["zh"])["text"]
    assert chinese.map(lambda t: any("\u4e00" <= ch <= "\u9fff" for ch in t)).mean() > 0.95
    with pytest.raises(TuneloopError, match="not fr"):
        off_topic_messages("train", ["fr"])


@pytest.mark.parametrize(
    ("texts", "expected"),
    [(["hello there"] * 20, ("en",)), (["你好"] * 20, ("zh",)), (["hello"] * 10 + ["你好"] * 10, ("en", "zh"))],
)
def test_the_data_languages_choose_the_messages_shown(texts, expected):
    assert languages_of(texts) == expected


def test_uniform_target_loss_is_smallest_when_every_label_is_as_likely():
    uniform, peaked = torch.zeros(4, 5), torch.tensor([[9.0, 0, 0, 0, 0]] * 4)
    assert uniform_target_loss(uniform).item() == pytest.approx(math.log(5))
    assert uniform_target_loss(peaked).item() > math.log(5) + 1


@pytest.fixture()
def setup(tiny_overrides, toy_csv, tiny_encoder):
    return tiny_overrides, prepare_data(DataConfig(path=toy_csv)), EncoderSource("tiny", tiny_encoder)


def mood_texts(seed: int, count: int) -> list[str]:
    """Texts of words the tiny tokenizer knows but the toy intents never use: off topic for the toy model
    (the shipped messages would be nearly all [UNK] to its vocabulary)."""
    rows = toy_rows(per_label=count, seed=seed, topics={"mood": [w for ws in MOODS.values() for w in ws]})
    return [row["text"] for row in rows]


def test_outlier_exposure_lowers_confidence_on_unseen_off_topic_messages(setup, tmp_path, monkeypatch):
    overrides, data, encoder = setup
    shown = pd.DataFrame({"text": mood_texts(seed=1, count=200), "lang": "en", "domain": "mood", "part": "train"})
    monkeypatch.setattr(losses, "off_topic_messages", lambda part, languages: shown)
    unseen = [t for t in mood_texts(seed=2, count=200) if t not in set(shown["text"])]
    confidence = {}
    for weight in (0, 1):
        config = load_config(
            None,
            [
                *overrides,
                f"train.outlier_exposure={weight}",
                "train.epochs=4",
                "train.outlier_exposure_max_similarity=1",
            ],
        )
        result = fine_tune(config, data, encoder, VersionFolder(tmp_path / f"oe{weight}"), show_progress=False)
        model, tokenizer = TextClassifier.load(tmp_path / f"oe{weight}" / "model")
        confidence[weight] = float(predict_proba(model, tokenizer, unseen).max(1).mean())
        assert (result.outlier_exposure is None) == (weight == 0)
    assert confidence[1] < confidence[0] - 0.1, confidence
    assert confidence[1] < 0.5  # three labels: 1/3 is as unsure as it gets
    assert result.outlier_exposure.messages == len(shown) and result.outlier_exposure.languages == ["en"]


def test_off_topic_messages_close_to_the_training_texts_are_left_out(setup, tmp_path, monkeypatch):
    """A business whose own intents cover some of the off-topic messages: those are not shown to the model as
    off-topic (here the closest possible: the training texts themselves)."""
    overrides, data, encoder = setup
    planted = data.train["text"].tolist()[:7]
    moods = mood_texts(seed=1, count=50)
    shown = pd.DataFrame({"text": moods + planted, "lang": "en", "domain": "x", "part": "train"})
    monkeypatch.setattr(losses, "off_topic_messages", lambda part, languages: shown)
    config = load_config(None, [*overrides, "train.epochs=1", "train.outlier_exposure_max_similarity=0.999"])
    exposure = fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False).outlier_exposure
    assert exposure.left_out_as_too_close == len(planted) and exposure.messages == len(moods)
    assert exposure.examples_left_out == planted


def test_the_report_says_what_outlier_exposure_showed(tiny_overrides, home):
    result = CliRunner().invoke(app, ["train", *tiny_overrides])
    assert result.exit_code == 0, result.output
    report = json.loads((home / "models" / "toy" / "v1" / "report.json").read_text())
    assert report["outlier_exposure"]["messages"] > 0 and report["outlier_exposure"]["weight"] == 0.5
    assert np.isfinite(report["test"]["accuracy"])
