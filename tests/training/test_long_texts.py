"""Reading texts longer than model.max_length: windows in training and serving, and the automatic choice."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from helpers import FILLER, TOPICS, tiny_config
from tuneloop.config import load_config
from tuneloop.errors import TuneloopError
from tuneloop.models.predictor import load_model
from tuneloop.registry import Registry
from tuneloop.training import classification
from tuneloop.training.long_texts import LONG_SHARE, choose_truncation


@pytest.fixture(scope="module")
def point_at_the_end(tmp_path_factory):
    """Texts of 8 filler words and then the 2 words that say their label: past the 6 tokens a max_length of 8
    leaves for the text."""
    rng = random.Random(0)
    rows = [
        {"text": " ".join(rng.sample(FILLER, 8) + rng.sample(words, 2)), "label": label}
        for label, words in TOPICS.items()
        for _ in range(30)
    ]
    path = tmp_path_factory.mktemp("long") / "long.csv"
    pd.DataFrame(rows).sample(frac=1, random_state=0).to_csv(path, index=False)
    return path


def test_windows_read_what_head_truncation_cuts_off_in_training_and_serving(tiny_encoder, point_at_the_end, tmp_path):
    settings = ("model.max_length=8", "train.baseline=off", "data.near_duplicates=keep", "model.truncation=auto")
    windows = classification.run(
        tiny_config(tiny_encoder, point_at_the_end, tmp_path / "home", *settings), show_progress=False
    )
    read = windows.report.long_texts
    assert read.truncation == "windows" and read.longer_share == 1.0 and "model.truncation=auto" in read.reason
    assert read.training_rows_per_text == read.passes_per_test_text == 2.0  # 10 words: two windows of 6
    head = classification.run(
        tiny_config(tiny_encoder, point_at_the_end, tmp_path / "home", *settings, "model.truncation=head"),
        show_progress=False,
    )
    assert head.report.long_texts.passes_per_test_text == 1.0
    assert head.report.test.accuracy < 0.6 < windows.report.test.accuracy  # head sees only the filler words
    served = load_model(
        windows.version.ref, Registry(load_config(None, [f"registry.home={tmp_path / 'home'}"]).registry)
    )
    assert served.spec.truncation == "windows"
    assert "are read whole, in windows of 8 tokens" in windows.report_html.read_text()


def test_auto_reads_in_windows_only_when_enough_texts_are_long(tiny_overrides):
    recipe = load_config(None, [*tiny_overrides, "model.truncation=auto"])
    assert choose_truncation(recipe, LONG_SHARE)[0] == "windows"
    assert choose_truncation(recipe, LONG_SHARE / 2)[0] == "head"
    assert choose_truncation(load_config(None, [*tiny_overrides, "model.truncation=head_tail"]), 1.0)[0] == "head_tail"
    private = load_config(None, [*tiny_overrides, "model.truncation=auto", "train.dp.epsilon=8"])
    assert choose_truncation(private, 1.0)[0] == "head"
    with pytest.raises(TuneloopError, match="model.truncation=windows with train.dp"):
        load_config(None, [*tiny_overrides, "train.dp.epsilon=8", "model.truncation=windows"])
