from __future__ import annotations

import json

import pandas as pd
import pytest

from tuneloop.config import DataConfig
from tuneloop.data.prepare import load_prepared, prepare_data, save_prepared
from tuneloop.data.split import kfold_assignment, stratified_split
from tuneloop.errors import TuneloopError


def write(tmp_path, rows, name="d.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def labelled(n_per_label=10, labels=("a", "b", "c")):
    return [{"text": f"{label} example number {i}", "label": label} for label in labels for i in range(n_per_label)]


def test_duplicates_after_normalisation_are_dropped(tmp_path):
    rows = labelled() + [
        {"text": "  A   EXAMPLE number 1 ", "label": "a"},
        {"text": "<i>a example</i> number 2", "label": "a"},
    ]
    prepared = prepare_data(DataConfig(path=write(tmp_path, rows)))
    assert prepared.report["dropped"]["duplicate"] == 2
    assert prepared.report["rows_kept"] == 30


def test_conflicting_labels_dropped_or_majority(tmp_path):
    rows = labelled() + [
        {"text": "where is my money", "label": "a"},
        {"text": "Where is my money", "label": "a"},
        {"text": "where is my money", "label": "b"},
    ]
    path = write(tmp_path, rows)
    dropped = prepare_data(DataConfig(path=path, conflicts="drop"))
    assert dropped.report["conflicts"][0]["labels"] == {"a": 2, "b": 1}
    assert dropped.report["dropped"]["conflicting_label"] == 3
    all_texts = pd.concat(dropped.splits.values())["text"].str.lower()
    assert "where is my money" not in set(all_texts)
    majority = prepare_data(DataConfig(path=path, conflicts="majority"))
    kept = pd.concat(majority.splits.values())
    assert kept[kept["text"].str.lower() == "where is my money"]["label"].tolist() == ["a"]


def test_stratified_split_is_seeded_and_covers_every_label(tmp_path):
    path = write(tmp_path, labelled(20))
    one = prepare_data(DataConfig(path=path, seed=3))
    two = prepare_data(DataConfig(path=path, seed=3))
    other = prepare_data(DataConfig(path=path, seed=4))
    assert one.fingerprint == two.fingerprint != other.fingerprint
    for split in ("train", "val", "test"):
        assert set(one.splits[split]["label"]) == {"a", "b", "c"}
    assert one.report["split_sizes"] == {"train": 45, "val": 6, "test": 9}


def test_rare_classes_keep_a_training_example():
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(7)], "label": ["x", "x", "y", "y", "y", "z", "z"]})
    assignment = stratified_split(frame, {"test": 0.3, "val": 0.3}, seed=0)
    for label in "xyz":
        assert (assignment[frame["label"] == label] == "train").any()


def test_given_test_split_is_respected(tmp_path):
    rows = [dict(r, split="test" if i % 5 == 0 else "") for i, r in enumerate(labelled(10))]
    prepared = prepare_data(DataConfig(path=write(tmp_path, rows), split_column="split"))
    given = {r["text"] for i, r in enumerate(labelled(10)) if i % 5 == 0}
    assert set(prepared.test["text"]) == given
    assert not given & set(prepared.train["text"])


def test_separate_test_file(tmp_path):
    train = write(tmp_path, labelled(10))
    test = write(tmp_path, [{"text": "held out a", "label": "a"}, {"text": "held out b", "label": "b"}], "t.csv")
    prepared = prepare_data(DataConfig(path=train, test_path=test))
    assert sorted(prepared.test["text"]) == ["held out a", "held out b"]


def test_kfold_assigns_every_row_once():
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(32)], "label": ["a"] * 15 + ["b"] * 15 + ["c"] * 2})
    folds = kfold_assignment(frame, 3, seed=0)
    assert set(folds) == {0, 1, 2}
    for fold in range(3):
        assert set(frame[folds == fold]["label"]) >= {"a", "b"}


def test_report_has_counts_lengths_and_imbalance(tmp_path):
    rows = labelled(20, ("a",)) + labelled(5, ("b",))
    prepared = prepare_data(
        DataConfig(path=write(tmp_path, rows)), count_tokens=lambda ts: [len(t.split()) for t in ts]
    )
    report = prepared.report
    assert report["text_length"]["unit"] == "tokens"
    assert report["text_length"]["p50"] == 4
    assert report["imbalance_ratio"] > 3
    assert sum(report["class_counts"]["train"].values()) == report["split_sizes"]["train"]


def test_save_and_load_round_trip(tmp_path):
    prepared = prepare_data(DataConfig(path=write(tmp_path, labelled())))
    save_prepared(prepared, tmp_path / "out")
    again = load_prepared(tmp_path / "out")
    assert again.fingerprint == prepared.fingerprint
    assert again.train["text"].tolist() == prepared.train["text"].tolist()
    assert json.loads((tmp_path / "out" / "data_report.json").read_text())["labels"] == ["a", "b", "c"]


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_other_formats(tmp_path, fmt):
    frame = pd.DataFrame(labelled())
    path = tmp_path / f"d.{fmt}"
    if fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    assert prepare_data(DataConfig(path=path)).report["rows_kept"] == 30


def test_column_mapping(tmp_path):
    rows = [{"body": r["text"], "intent": r["label"]} for r in labelled()]
    prepared = prepare_data(DataConfig(path=write(tmp_path, rows), text_column="body", label_column="intent"))
    assert prepared.labels == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "data file not found"),
        (b"", "is empty"),
        (b"text,label\n", "no rows"),
        (b"text,label\nhello,a\nworld,a\n", "only one label"),
        (b"text,label\nhello,a\nworld,a\nsolo,b\n", r"fewer than 2 examples: 'b' \(1\)"),
        ("text,label\n\u9000\u6b3e,a\n".encode("gbk") + b"x,b\n", "not valid UTF-8.*line 2"),
        (b"body,label\nhello,a\n", "no text column 'text'; columns are: body, label"),
    ],
    ids=["missing", "empty", "header-only", "single-label", "rare-label", "non-utf8", "missing-column"],
)
def test_bad_input_gets_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TuneloopError, match=message) as caught:
        prepare_data(DataConfig(path=path))
    assert str(path) in str(caught.value)


def test_a_split_column_without_validation_rows_gets_one_carved_from_train(tmp_path, caplog):
    """Regression: with only train and test values in the split column, no validation split was made, training ran
    to its end and crashed in the int8 check."""
    rows = [dict(r, split="test" if i % 10 < 2 else "train") for i, r in enumerate(labelled(10))]
    config = DataConfig(path=write(tmp_path, rows), split_column="split", seed=7)
    with caplog.at_level("WARNING"):
        prepared = prepare_data(config)
    given_train = {r["text"] for r in rows if r["split"] == "train"}
    assert set(prepared.val["label"]) == {"a", "b", "c"}  # stratified: every label
    assert set(prepared.train["text"]) | set(prepared.val["text"]) == given_train  # carved from train only
    assert set(prepared.test["text"]) == {r["text"] for r in rows if r["split"] == "test"}
    note = prepared.report["validation_carved"]
    assert note.startswith("data.split_column 'split' has no validation rows") and "seed 7" in note
    assert note in caplog.text and "\n" not in note
    assert prepare_data(config).fingerprint == prepared.fingerprint  # seeded


def test_given_validation_rows_are_kept_and_nothing_is_carved(tmp_path):
    rows = [dict(r, split=("test", "val", "train", "train", "train")[i % 5]) for i, r in enumerate(labelled(10))]
    prepared = prepare_data(DataConfig(path=write(tmp_path, rows), split_column="split"))
    assert set(prepared.val["text"]) == {r["text"] for r in rows if r["split"] == "val"}
    assert "validation_carved" not in prepared.report


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        (("train",), "the test split is empty (the report and the gate score it); mark some rows test in split"),
        (("test",), "the train split is empty; mark rows train"),
    ],
)
def test_splits_that_would_fail_at_the_end_of_training_are_refused_first(tmp_path, splits, message):
    rows = [dict(r, split=splits[i % len(splits)]) for i, r in enumerate(labelled(10))]
    with pytest.raises(TuneloopError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare_data(DataConfig(path=write(tmp_path, rows), split_column="split"))


def test_a_label_only_in_the_test_split_is_refused_naming_the_fix(tmp_path):
    rows = [dict(r, split="train") for r in labelled(10)] + [
        {"text": f"d example {i}", "label": "d", "split": "test"} for i in range(3)
    ]
    with pytest.raises(TuneloopError, match=r"\['d'\] have no training example after splitting; add training rows"):
        prepare_data(DataConfig(path=write(tmp_path, rows), split_column="split"))
