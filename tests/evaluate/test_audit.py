"""The training-label audit: planted label errors are found, ranked, and a person's confirmations excluded."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers import tiny_config, toy_rows
from tuneloop.config import DataConfig
from tuneloop.data.prepare import load_prepared, prepare_data
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.audit import AUDIT_FILE, audit_training_labels
from tuneloop.models.encoders import EncoderSource
from tuneloop.training import classification

FLIP = {"refund": "delivery", "delivery": "password", "password": "refund"}


def planted(tmp_path, per_label=60, every=12):
    rows = toy_rows(per_label=per_label, seed=7)
    flipped = set()
    for row in rows[::every]:
        row["label"] = FLIP[row["label"]]
        flipped.add(row["text"])
    path = tmp_path / "noisy.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path, flipped


def test_the_audit_finds_planted_flipped_labels_and_suggests_the_right_one(tmp_path, tiny_encoder):
    path, flipped = planted(tmp_path)
    data = prepare_data(DataConfig(path=path))
    audited = set(pd.concat([data.train, data.val])["text"])
    audit = audit_training_labels(data, EncoderSource("tiny", tiny_encoder), None, seed=0)
    issues = audit.issues
    found = set(issues["text"]) & flipped & audited
    assert len(found) >= 0.7 * len(flipped & audited)  # most planted errors are flagged
    assert len(found) >= 0.6 * len(issues)  # and most of what is flagged was planted
    assert not set(issues["text"]) & set(data.test["text"])  # the test split is never audited
    truth = {row.text: row.label for row in pd.read_csv(path).itertuples()}
    for issue in issues[issues["text"].isin(found)].itertuples():
        assert FLIP[issue.suggested] == issue.label  # the suggestion undoes the flip
    assert (issues["label_probability"].diff().dropna() >= -1e-9).all()  # least likely given label first
    assert audit.summary["flagged"] == len(issues) and audit.summary["folds"] == 5
    assert set(truth) >= set(issues["text"])


def test_confirmed_rows_are_excluded_from_the_next_training(tmp_path, tiny_encoder):
    path, _ = planted(tmp_path)
    data = prepare_data(DataConfig(path=path))
    audit = audit_training_labels(data, EncoderSource("tiny", tiny_encoder), 3, seed=0)
    edited = audit.issues.copy()
    edited.loc[edited.index[:3], "confirmed"] = ["yes", "X", " y "]
    edited.loc[edited.index[3:5], "confirmed"] = ["no", ""]
    csv = tmp_path / AUDIT_FILE
    edited.to_csv(csv, index=False)
    again = prepare_data(DataConfig(path=path, exclude=csv))
    kept = set(pd.concat(again.splits.values())["text"])
    assert not kept & set(edited["text"][:3]) and set(edited["text"][3:5]) <= kept
    assert again.report["dropped"]["excluded"] == 3


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "data.exclude file not found"),
        ("text,label\nhello,a\n", "needs the columns text and confirmed"),
    ],
)
def test_a_bad_exclusion_file_is_one_clear_error(tmp_path, content, message):
    path, _ = planted(tmp_path)
    exclude = tmp_path / "edited.csv"
    if content is not None:
        exclude.write_text(content)
    with pytest.raises(TuneloopError, match=message):
        prepare_data(DataConfig(path=path, exclude=exclude))


def test_too_few_rows_per_label_for_the_folds_is_one_clear_error(tmp_path, tiny_encoder):
    path, _ = planted(tmp_path, per_label=6, every=100)
    data = prepare_data(DataConfig(path=path))
    with pytest.raises(TuneloopError, match="fewer rows than the audit's 8 folds.*set data.kfold lower"):
        audit_training_labels(data, EncoderSource("tiny", tiny_encoder), 8, seed=0)


def test_train_with_audit_keeps_the_ranked_csv_with_the_version(tmp_path, tiny_encoder):
    path, _ = planted(tmp_path)
    config = tiny_config(tiny_encoder, path, tmp_path / "home", "train.audit=true", "train.epochs=1")
    outcome = classification.run(config, show_progress=False)
    ranked = pd.read_csv(outcome.folder.root / AUDIT_FILE)
    assert list(ranked.columns)[:5] == ["row", "split", "text", "label", "suggested"] and len(ranked)
    assert load_prepared(outcome.folder.data()).report["label_audit"]["flagged"] == len(ranked)

    (tmp_path / "few").mkdir()
    few, _ = planted(tmp_path / "few", per_label=4, every=100)
    refused = tiny_config(tiny_encoder, few, tmp_path / "home", "train.audit=true", "data.kfold=5")
    with pytest.raises(TuneloopError, match="audit's 5 folds"):
        classification.run(refused, show_progress=False)
    assert [v.version for v in classification.Registry(refused.registry).versions()] == [1]


def test_the_audit_csv_shows_formulas_as_text_and_still_excludes_them(tmp_path, tiny_encoder):
    """label_issues.csv is opened in a spreadsheet and may hold users' approved feedback (the review's L1): a text
    starting with = must not run there, and once confirmed it must still be excluded from training."""
    path, _ = planted(tmp_path)
    data = prepare_data(DataConfig(path=path))
    audit = audit_training_labels(data, EncoderSource("tiny", tiny_encoder), 3, seed=0)
    formula = '=HYPERLINK("http://evil.example","refund")'
    issues = audit.issues.copy()
    original = issues.loc[issues.index[0], "text"]
    issues.loc[issues.index[0], ["text", "confirmed"]] = [formula, "yes"]
    csv = tmp_path / AUDIT_FILE
    type(audit)(issues, audit.summary).write_csv(csv)
    written = pd.read_csv(csv)
    assert written.loc[0, "text"] == "'" + formula
    frame = pd.read_csv(path)
    frame.loc[frame["text"] == original, "text"] = formula
    frame.to_csv(path, index=False)
    kept = set(pd.concat(prepare_data(DataConfig(path=path, exclude=csv)).splits.values())["text"])
    assert formula not in kept
