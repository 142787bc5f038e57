"""Token attributions: Integrated Gradients' completeness, words merged back from pieces, and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import tiny_config, toy_rows
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.explain import explain, merge_into_words, words_of
from tuneloop.evaluate.report import add_explanations
from tuneloop.models.classifier import TextClassifier
from tuneloop.models.predictor import load_model
from tuneloop.registry import Registry
from tuneloop.training import classification


@pytest.fixture(scope="module")
def trained(tiny_encoder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("explained")
    data = folder / "toy.csv"
    rows = toy_rows(per_label=40, seed=5)
    for row in rows[::8]:  # some labels wrong: the report then has confusions and possible label errors to explain
        row["label"] = {"refund": "delivery", "delivery": "password", "password": "refund"}[row["label"]]
    pd.DataFrame(rows).to_csv(data, index=False)
    config = tiny_config(tiny_encoder, data, folder / "home")
    outcome = classification.run(config, show_progress=False)
    model, tokenizer = TextClassifier.load(outcome.folder.model)
    return config, outcome, model, tokenizer


def test_attributions_add_up_to_the_change_in_probability_from_the_baseline(trained):
    _, _, model, tokenizer = trained
    text = "please refund my money back"
    (explained,) = explain(model, tokenizer, [text], steps=300)
    total = sum(w.score for w in explained.words)
    assert total == pytest.approx(explained.probability - explained.baseline_probability, abs=0.01)
    assert abs(explained.delta) < 0.01
    assert [w.word for w in explained.words] == text.split()
    assert explained.label == "refund"
    # The topic words carry the decision, not the filler.
    by_word = {w.word: w.score for w in explained.words}
    assert max(by_word["refund"], by_word["money"]) > max(by_word["please"], by_word["my"])


def test_sub_word_pieces_are_merged_into_their_word(trained):
    _, _, model, tokenizer = trained
    pieces = tokenizer.tokenize("refundable")
    assert len(pieces) > 1  # the tiny vocabulary splits it
    (explained,) = explain(model, tokenizer, ["refundable parcel"], labels=["delivery"])
    assert [w.word for w in explained.words] == ["refundable", "parcel"]
    assert explained.label == "delivery"


def test_merging_sums_pieces_and_shares_a_token_spanning_chinese_words():
    scores = merge_into_words(
        "unbelievable refunds",
        [(0, 0), (0, 2), (2, 12), (13, 19), (19, 20), (0, 0)],
        np.array([9.0, 0.1, 0.2, 0.5, 0.25, 9.0]),
    )
    assert [(w.word, round(w.score, 3)) for w in scores] == [("unbelievable", 0.3), ("refunds", 0.75)]
    # One multilingual token covering "退款" and "快递" (jieba's words) is split by the characters covered.
    text = "退款快递"
    assert [w for w, _, _ in words_of(text)] == ["退款", "快递"]
    shared = merge_into_words(text, [(0, 4)], np.array([1.0]))
    assert [round(w.score, 3) for w in shared] == [0.5, 0.5]
    # Per-character tokens (BERT's Chinese) add up into the word.
    per_character = merge_into_words(text, [(0, 1), (1, 2), (2, 3), (3, 4)], np.array([0.1, 0.2, 0.3, 0.4]))
    assert [round(w.score, 3) for w in per_character] == [0.3, 0.7]
    assert [w for w, _, _ in words_of("refund!! 🙂 ok")] == ["refund", "!", "!", "🙂", "ok"]
    assert [w for w, _, _ in words_of("it's late, 'really'")] == ["it's", "late", ",", "'", "really", "'"]


def test_bad_input_is_one_clear_error(trained):
    config, outcome, model, tokenizer = trained
    (nothing,) = explain(model, tokenizer, [""])  # no words: the input is the baseline
    assert nothing.words == [] and nothing.probability == pytest.approx(nothing.baseline_probability)
    with pytest.raises(TuneloopError, match="'nope' is not one of this model's labels"):
        explain(model, tokenizer, ["refund please"], labels=["nope"])
    on_onnx = load_model(outcome.version.ref, Registry(config.registry), runtime="onnx")
    with pytest.raises(TuneloopError, match="ONNX Runtime, which gives no gradients"):
        explain(on_onnx.model, on_onnx.tokenizer, ["refund please"])


def test_the_report_explains_confusions_and_possible_label_errors(trained):
    _, outcome, model, tokenizer = trained
    explained = outcome.report.explanations
    kinds = {e["kind"] for e in explained}
    assert kinds <= {"confusion", "possible label error"} and explained
    test = outcome.report.test.model_dump()
    confused = {c["examples"][0] for c in test["top_confusions"]}
    assert {e["text"] for e in explained if e["kind"] == "confusion"} <= confused
    for entry in explained:
        assert entry["label"] != entry["true"]  # the predicted label is explained, not the given one
    page = outcome.report_html.read_text()
    assert "Why: word attributions" in page and 'style="background:rgba(' in page
    report = outcome.report.model_copy(update={"explanations": None})
    add_explanations(report, model, tokenizer, limit=0)
    assert report.explanations is None


def test_a_long_text_is_explained_over_the_tokens_the_model_sees(trained):
    from dataclasses import replace

    _, _, model, tokenizer = trained
    text = " ".join(["please"] * 40 + ["refund", "money"])
    model.spec = replace(model.spec, truncation="head_tail")
    try:
        (explained,) = explain(model, tokenizer, [text])
    finally:
        model.spec = replace(model.spec, truncation="head")
    # 30 places for the text: its first 7 words and last 23 are explained (the tail ends with refund money),
    # the middle 12 were cut and score nothing.
    scored = [w.score != 0 for w in explained.words]
    assert scored == [True] * 7 + [False] * 12 + [True] * 23
    assert [w.word for w in explained.words][-2:] == ["refund", "money"]
    total = sum(w.score for w in explained.words)
    assert total == pytest.approx(explained.probability - explained.baseline_probability, abs=0.02)
