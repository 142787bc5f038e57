"""Inference batching: texts grouped by length give the same logits as one padded batch; the serving
default groups them under ONNX Runtime only."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import tiny_config
from tuneloop.config import ServeConfig
from tuneloop.models.classifier import length_groups, predict_logits
from tuneloop.models.predictor import load_model
from tuneloop.registry import Registry
from tuneloop.serve.slots import AUTO_MAX_PADDING, batch_padding


def test_groups_cover_every_text_once_within_the_batch_size_and_padding_bound():
    lengths = [3, 30, 4, 28, 5, 100, 29, 3, 6]
    groups = length_groups(lengths, batch_size=3, max_padding=0.25)
    flat = [int(i) for group in groups for i in group]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # shortest first, so neighbours are alike
    for group in groups:
        sizes = [lengths[i] for i in group]
        assert len(group) <= 3
        assert len(group) == 1 or max(sizes) * len(sizes) <= 1.25 * sum(sizes)
    assert [len(g) for g in groups] == [3, 2, 3, 1]  # 3,3,4 | 5,6 | 28,29,30 | 100


def test_without_a_padding_bound_groups_are_batch_size_slices_of_the_length_order():
    groups = length_groups([5, 1, 4, 2, 3], batch_size=2)
    assert [g.tolist() for g in groups] == [[1, 3], [4, 2], [0]]


@pytest.mark.parametrize("max_padding", [0.0, 0.25])
def test_grouping_by_length_does_not_change_the_logits(production_home, tiny_encoder, max_padding):
    registry = Registry(tiny_config(tiny_encoder, production_home / "toy.csv", production_home / "home").registry)
    loaded = load_model("toy@production", registry)
    texts = [
        "reset",
        "where is my parcel it has been two weeks now and nobody answers",
        "refund please",
        "my login password is locked",
        "hi",
        "cancel the order I placed yesterday evening",
    ]
    one_pass = predict_logits(loaded.model, loaded.tokenizer, texts, batch_size=len(texts))
    grouped = predict_logits(loaded.model, loaded.tokenizer, texts, batch_size=len(texts), max_padding=max_padding)
    np.testing.assert_allclose(grouped, one_pass, atol=1e-5)
    assert len(set(map(tuple, one_pass.round(4)))) > 1  # the texts really get different logits


@pytest.mark.parametrize(
    ("setting", "runtime", "expected"),
    [
        ("auto", "torch", None),  # PyTorch: one pass per batch
        ("auto", "onnx", AUTO_MAX_PADDING),
        ("auto", "onnx-int8", AUTO_MAX_PADDING),
        (None, "onnx", None),
        (0.5, "torch", 0.5),
    ],
)
def test_auto_padding_bound_follows_the_runtime_each_version_runs(setting, runtime, expected):
    assert batch_padding(ServeConfig(max_padding=setting).max_padding, runtime) == expected


def test_head_tail_keeps_the_start_and_the_end_of_a_long_text_and_the_special_tokens(tiny_encoder):
    from dataclasses import replace

    from transformers import AutoTokenizer

    from tuneloop.models.classifier import HeadSpec, kept_tokens, tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    words = ["where", "is", "my", "parcel", "refund", "money", "back", "please", "password"]
    text = " ".join(words * 3)  # 27 words, one token each in the tiny vocabulary
    spec = HeadSpec(labels=["a"], max_length=10)
    (head,) = tokenize(tokenizer, [text], spec)
    (head_tail,) = tokenize(tokenizer, [text], replace(spec, truncation="head_tail"))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    as_ids = tokenizer.convert_tokens_to_ids
    assert head == [cls, *as_ids((words * 3)[:8]), sep]
    # 8 places for the text: its first 2 tokens and its last 6.
    assert head_tail == [cls, *as_ids((words * 3)[:2]), *as_ids((words * 3)[-6:]), sep]
    # Texts that fit are not touched, whatever the mode.
    (short,) = tokenize(tokenizer, ["where is my parcel"], replace(spec, truncation="head_tail"))
    assert short == tokenize(tokenizer, ["where is my parcel"], spec)[0]
    # In head mode the positions kept are what the tokenizer's own truncation keeps (explanations rely on it).
    assert kept_tokens([1, *[0] * 27, 1], 10, "head") == [0, *range(1, 9), 28]


WORDS = ["where", "is", "my", "parcel", "refund", "money", "back", "please", "password"]


def test_windows_cover_the_whole_text_each_with_its_special_tokens_and_prefix(tiny_encoder):
    from transformers import AutoTokenizer

    from tuneloop.models.classifier import HeadSpec, text_windows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    words = WORDS * 3  # 27 words, one token each in the tiny vocabulary
    spec = HeadSpec(labels=["a"], max_length=12, truncation="windows", text_prefix="please ")
    rows, owners = text_windows(tokenizer, ["where is my parcel", " ".join(words)], spec)
    cls, sep, prefix = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.convert_tokens_to_ids("please")
    assert rows[0] == tokenize(tokenizer, ["where is my parcel"], spec)[0]  # a text that fits: as under head
    long = [row for row, owner in zip(rows, owners, strict=True) if owner == 1]
    assert all(row[:2] == [cls, prefix] and row[-1] == sep and len(row) <= 12 for row in long)
    ids = tokenizer.convert_tokens_to_ids(words)
    # 9 places a window: starts every 7 tokens (a quarter overlaps), the last flush with the end.
    assert [row[2:-1] for row in long] == [ids[0:9], ids[7:16], ids[14:23], ids[18:27]]
    assert long[0] == tokenize(tokenizer, [" ".join(words)], spec)[0]  # the first window is what head keeps
    capped, _ = text_windows(tokenizer, [" ".join(WORDS * 20)], replace(spec, max_windows=3))
    assert len(capped) == 3 and capped[-1][-2] == ids[-1]  # spread over the text, the end included


def test_a_long_text_is_scored_over_all_its_windows(tiny_encoder):
    from transformers import AutoTokenizer

    from tuneloop.models.classifier import HeadSpec, TextClassifier, load_encoder, predict_logits

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    torch.manual_seed(0)
    spec = HeadSpec(labels=["a", "b", "c"], max_length=12, dropout=0.0)
    text = " ".join(WORDS * 3)
    changed_end = " ".join(WORDS * 3 + ["refund", "refund", "refund"])
    middle = WORDS * 3
    middle[12] = "refund"  # past the 10 tokens head truncation keeps, in the second window only
    changed_middle = " ".join(middle)
    for truncation, changes_score in (("head", False), ("windows", True)):
        model = TextClassifier(load_encoder(tiny_encoder), replace(spec, truncation=truncation))
        scores = predict_logits(model, tokenizer, [text, changed_end, changed_middle, "where is my parcel"])
        assert (not np.allclose(scores[0], scores[1])) is changes_score, truncation
        assert (not np.allclose(scores[0], scores[2])) is changes_score, truncation
    # A text that fits is scored alone in one window, as under head truncation.
    head = TextClassifier(load_encoder(tiny_encoder), spec)
    head.head.load_state_dict(model.head.state_dict())
    assert np.allclose(predict_logits(head, tokenizer, ["where is my parcel"])[0], scores[3], atol=1e-6)
