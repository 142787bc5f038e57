"""The data stage end to end: load → clean → dedup/conflicts → split → report, saved as a folder."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tuneloop.config import DataConfig
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.data.load import read_table, select_columns
from tuneloop.data.near_duplicates import Pair, best_matches, clusters, near_duplicate_pairs
from tuneloop.data.split import kfold_assignment, stratified_split
from tuneloop.data.spreadsheet import from_spreadsheet
from tuneloop.errors import TuneloopError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
HOLDOUT_FILE = "feedback_holdout.jsonl"
# Rows listed per finding in the data report (the counts cover all of them).
EXAMPLES_LISTED = 20
# The splits checked for rows that have a near-duplicate in training.
LEAKAGE_CHECKED = ("val", "test")
# Which copy of a duplicate survives: a text given as test must stay test.
_SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2, "": 3}
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
# The data report (data_report.json): what happened to every row, as free-form JSON a person reads; the typed
# report keeps it as it is (ClassifierReport.data).
DataReport = dict[str, Any]


@dataclass
class PreparedData:
    """Cleaned, split data plus the report that explains what happened to every row."""

    splits: dict[str, pd.DataFrame]
    labels: list[str]
    report: DataReport
    fingerprint: str
    folds: pd.Series | None = field(default=None, repr=False)
    # Feedback examples kept out of training so the promotion gate can score them (retrained versions only).
    holdout: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def train(self) -> pd.DataFrame:
        return self.splits["train"]

    @property
    def val(self) -> pd.DataFrame:
        return self.splits["val"]

    @property
    def test(self) -> pd.DataFrame:
        return self.splits["test"]


def _load(config: DataConfig) -> pd.DataFrame:
    if config.path is None:
        raise TuneloopError("no data file given: set data.path=your_file.csv (or pass --data)")
    frame = select_columns(
        read_table(config.path, config.format),
        config.path,
        config.text_column,
        config.label_column,
        config.split_column,
    )
    frame["source"] = str(config.path)
    if config.test_path is not None:
        test = select_columns(
            read_table(config.test_path, config.format), config.test_path, config.text_column, config.label_column
        )
        test["split"] = "test"
        test["source"] = str(config.test_path)
        if "split" not in frame:
            frame["split"] = ""
        frame = pd.concat([frame, test], ignore_index=True)
    return frame


def _normalise_given_splits(frame: pd.DataFrame) -> None:
    if "split" not in frame:
        return
    raw = frame["split"].str.strip().str.lower()
    mapped = raw.map(lambda value: _SPLIT_ALIASES.get(value, "" if value == "" else None))
    bad = frame[mapped.isna()]
    if len(bad):
        first = bad.iloc[0]
        raise TuneloopError(
            f"{first['source']} row {first['row']}: split value '{first['split']}' is not one of "
            f"train/val/test (or empty to let tuneloop split)"
        )
    frame["split"] = mapped


def _drop_conflicts(frame: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, list[DataReport]]:
    label_sets = frame.groupby("key")["label"].agg(lambda labels: sorted(set(labels)))
    conflicted = label_sets[label_sets.map(len) > 1]
    report = []
    keep_label: dict[str, str] = {}
    for key in conflicted.index:
        rows = frame[frame["key"] == key]
        counts = rows["label"].value_counts()
        majority = counts.index[0] if (len(counts) == 1 or counts.iloc[0] > counts.iloc[1]) else None
        resolution = majority if policy == "majority" and majority is not None else None
        if resolution is not None:
            keep_label[key] = resolution
        report.append(
            {
                "text": rows["text"].iloc[0],
                "labels": dict(counts.astype(int)),
                "rows": rows["row"].tolist(),
                "kept_label": resolution,
            }
        )
    in_conflict = frame["key"].isin(conflicted.index)
    resolved = frame["key"].map(keep_label)
    keep = ~in_conflict | (resolved.notna() & (frame["label"] == resolved))
    return frame[keep], report


def measure_lengths(prepared: PreparedData, count_tokens: Callable[[list[str]], list[int]]) -> None:
    """The data report's text lengths over every split, counted with `count_tokens` (a model's tokenizer)."""
    texts = pd.concat([prepared.splits[name]["text"] for name in prepared.splits]).tolist()
    prepared.report["text_length"] = length_percentiles(texts, count_tokens)


def length_percentiles(
    texts: list[str], count_tokens: Callable[[list[str]], list[int]] | None
) -> dict[str, str | float]:
    lengths = np.array(count_tokens(texts) if count_tokens else [len(t) for t in texts])
    if lengths.size == 0:
        return {}
    points = {f"p{p}": float(np.percentile(lengths, p)) for p in (50, 90, 95, 99)}
    return {
        "unit": "tokens" if count_tokens else "characters",
        **points,
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 2),
    }


def clean_rows(frame: pd.DataFrame, path: Path | None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Clean texts and labels, drop rows left without either; counts of dropped rows by reason."""
    frame = frame.assign(text=frame["text"].map(clean_text), label=frame["label"].str.strip())
    dropped = {}
    for reason, mask in (("empty_text", frame["text"] == ""), ("missing_label", frame["label"] == "")):
        dropped[reason] = int(mask.sum())
        frame = frame[~mask]
    if frame.empty:
        raise TuneloopError(f"{path}: no row has both a text and a label after cleaning")
    return frame, dropped


def fingerprint(parts: Iterable[str]) -> str:
    """A short, stable digest of an ordered sequence of strings: data splits, a corpus, conversations."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(f"{part}\x1e".encode())
    return digest.hexdigest()[:16]


def fingerprint_of(splits: dict[str, pd.DataFrame]) -> str:
    """The data fingerprint of a version: every split's rows, in order."""
    return fingerprint(
        f"{name}\x1f{label}\x1f{text}"
        for name in SPLITS
        for text, label in zip(splits[name]["text"], splits[name]["label"], strict=True)
    )


def split_summary(splits: dict[str, pd.DataFrame], labels: list[str]) -> DataReport:
    """Labels, split sizes, class counts per split and the train imbalance ratio, for the data report."""
    class_counts = {
        name: splits[name]["label"].value_counts().reindex(labels, fill_value=0).astype(int).to_dict()
        for name in SPLITS
    }
    train_counts = np.array(list(class_counts["train"].values()))
    return {
        "labels": labels,
        "split_sizes": {name: len(splits[name]) for name in SPLITS},
        "class_counts": class_counts,
        "imbalance_ratio": round(float(train_counts.max() / max(train_counts.min(), 1)), 2),
    }


def assign_splits(frame: pd.DataFrame, config: DataConfig) -> tuple[pd.Series, str | None]:
    """Each row's split: a given one (data.split_column, data.test_path) is kept; the test and validation splits
    that were not given are carved, stratified and seeded, from the rows without one. When that leaves no
    validation rows (a split column with only train and test values), the validation split is carved from the
    training rows instead, and the second value says so in one line."""
    fixed = frame["split"] if "split" in frame else pd.Series("", index=frame.index)
    fractions = {"test": config.test_size, "val": config.val_size}
    for given in ("test", "val"):
        if (fixed == given).any():
            fractions.pop(given)
    assignment = fixed.copy()
    undecided = frame[fixed == ""]
    if len(undecided) and fractions:
        assignment.loc[undecided.index] = stratified_split(undecided, fractions, config.seed)
    assignment = assignment.replace("", "train")
    if (assignment == "val").any() or "val" not in fractions:
        return assignment, None
    training = frame[assignment == "train"]
    assignment.loc[training.index] = stratified_split(training, {"val": config.val_size}, config.seed)
    carved = int((assignment == "val").sum())
    if not carved:
        return assignment, None  # no class has the 2 training rows a validation row needs: trained without one
    where = f"data.split_column '{config.split_column}' has" if config.split_column else "the data has"
    note = (
        f"{where} no validation rows: {carved} of the {len(training)} training rows (data.val_size="
        f"{config.val_size:g} of each label, seed {config.seed}) became the validation split"
    )
    log.warning(note)
    return assignment, note


def refuse_untrainable(splits: dict[str, pd.DataFrame], labels: list[str], config: DataConfig) -> None:
    """Refuse, before any training, splits that would make the run fail at its end: one line naming the fix."""
    if splits["train"].empty:
        raise TuneloopError(
            f"{config.path}: the train split is empty; mark rows train (or leave their split value empty) in "
            f"{config.split_column or 'the data'}"
        )
    if splits["test"].empty:
        fix = (
            f"mark some rows test in {config.split_column}, leave some split values empty, or give data.test_path"
            if config.split_column
            else "add rows or raise data.test_size"
        )
        raise TuneloopError(f"{config.path}: the test split is empty (the report and the gate score it); {fix}")
    missing_in_train = sorted(set(labels) - set(splits["train"]["label"]))
    if missing_in_train:
        raise TuneloopError(
            f"{config.path}: label(s) {missing_in_train} have no training example after splitting; add training "
            "rows of them, or remove their rows"
        )


def prepare_data(
    config: DataConfig,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
    mask: Callable[[str], str] | None = None,
) -> PreparedData:
    """Load, clean, mask personal data, deduplicate, resolve conflicting labels, split and report.

    `count_tokens` (texts → token counts) makes the length percentiles use the model's tokenizer; `mask`
    (privacy.mask) replaces personal data by placeholders before anything is split or saved.
    """
    frame = _load(config)
    total = len(frame)
    _normalise_given_splits(frame)
    frame, dropped = clean_rows(frame, config.path)
    masked = 0
    if mask is not None:
        texts = frame["text"].map(mask)
        masked = int((texts != frame["text"]).sum())
        frame = frame.assign(text=texts)

    frame, conflicts, near_duplicates, pairs = _deduplicated(frame, config, dropped)
    counts = frame["label"].value_counts()
    _refuse_too_few_examples(counts, config)
    assignment, carved = assign_splits(frame, config)
    frame = frame.assign(split=assignment)
    splits, leakage = _splits_without_leakage(frame, pairs, config, dropped)
    labels = sorted(counts.index)
    refuse_untrainable(splits, labels, config)

    folds = None
    if config.kfold:
        pool = pd.concat([splits["train"], splits["val"]], ignore_index=True)
        folds = kfold_assignment(pool, config.kfold, config.seed)

    report = {
        "source": str(config.path),
        "rows_read": total,
        "rows_kept": int(len(frame)),
        "dropped": dropped,
        "texts_with_personal_data_masked": masked,
        "conflicts": conflicts[:50],
        "conflict_policy": config.conflicts,
        "near_duplicates": near_duplicates,
        "leakage": leakage,
        **split_summary(splits, labels),
        "text_length": length_percentiles(frame["text"].tolist(), count_tokens),
        "kfold": config.kfold,
    }
    if carved:
        report["validation_carved"] = carved
    prepared = PreparedData(
        splits=splits, labels=labels, report=report, fingerprint=fingerprint_of(splits), folds=folds
    )
    report["fingerprint"] = prepared.fingerprint
    return prepared


def _deduplicated(
    frame: pd.DataFrame, config: DataConfig, dropped: dict[str, int]
) -> tuple[pd.DataFrame, list[DataReport], DataReport, list[Pair]]:
    """The rows left after the audit's exclusions, conflicting labels, exact and near duplicates (counted into
    `dropped`); the conflicts, the near-duplicate summary and the search's pairs (reused for the leakage)."""
    frame = frame.assign(key=frame["text"].map(dedup_key))
    if config.exclude is not None:
        excluded = frame["key"].isin(confirmed_exclusions(config.exclude))
        dropped["excluded"] = int(excluded.sum())
        frame = frame[~excluded]
    frame, conflicts = _drop_conflicts(frame, config.conflicts)
    dropped["conflicting_label"] = sum(len(c["rows"]) for c in conflicts) - sum(
        1 for c in conflicts if c["kept_label"] is not None
    )
    if "split" in frame:
        frame = frame.sort_values("split", key=lambda s: s.map(_SPLIT_PRIORITY), kind="stable")
    before = len(frame)
    frame = frame.drop_duplicates(subset=["key", "label"], keep="first").sort_index()
    dropped["duplicate"] = dropped.get("duplicate", 0) + before - len(frame)
    frame = frame.drop(columns="key").reset_index(drop=True)
    frame, near_duplicates, pairs = _near_duplicates(frame, config)
    dropped["near_duplicate"] = near_duplicates.get("dropped", 0)
    return frame, conflicts, near_duplicates, pairs


def _refuse_too_few_examples(counts: pd.Series, config: DataConfig) -> None:
    if len(counts) < 2:
        only = counts.index[0] if len(counts) else "none"
        raise TuneloopError(
            f"{config.path}: only one label ('{only}') after cleaning; a classifier needs at least two "
            f"(check data.label_column)"
        )
    rare = counts[counts < 2]
    if len(rare):
        listed = ", ".join(f"'{label}' ({n})" for label, n in rare.items())
        raise TuneloopError(
            f"{config.path}: label(s) with fewer than 2 examples: {listed}; add examples or remove those rows"
        )


def _splits_without_leakage(
    frame: pd.DataFrame, pairs: list[Pair], config: DataConfig, dropped: dict[str, int]
) -> tuple[dict[str, pd.DataFrame], DataReport]:
    """Each split's rows, and which validation and test rows nearly repeat a training row (dropped from their
    split under data.leakage=drop, counted into `dropped`)."""
    splits = {name: frame[frame["split"] == name][["row", "text", "label"]].reset_index(drop=True) for name in SPLITS}
    # One search over every row serves both the clusters and the leakage: each split's rows, by search position.
    origins = {name: frame.index[frame["split"] == name] for name in SPLITS}
    leakage = leakage_report(splits, cross_split_matches(pairs, origins), config.near_duplicate_threshold)
    leakage["policy"] = config.leakage
    if config.leakage == "drop":
        for name in LEAKAGE_CHECKED:
            found = leakage[name]
            splits[name] = splits[name].drop(index=found["positions"]).reset_index(drop=True)
            dropped[f"near_duplicate_of_train_in_{name}"] = found["rows"]
            found["positions"] = []  # none left: the positions were those of the rows now dropped
    return splits, leakage


CONFIRMED = {"yes", "y", "true", "1", "x"}


def confirmed_exclusions(path: Path) -> set[str]:
    """Dedup keys of the texts a person confirmed in an audit CSV (its `confirmed` column marked)."""
    if not Path(path).is_file():
        raise TuneloopError(f"data.exclude file not found: {path} (a label audit's CSV: tuneloop data audit)")
    frame = read_table(path, "csv")
    missing = {"text", "confirmed"} - set(frame.columns)
    if missing:
        raise TuneloopError(
            f"{path}: data.exclude needs the columns text and confirmed (a label audit's CSV from tuneloop data "
            f"audit); missing: {', '.join(sorted(missing))}"
        )
    marked = frame["confirmed"].fillna("").astype(str).str.strip().str.lower().isin(CONFIRMED)
    return {dedup_key(clean_text(from_spreadsheet(str(text)))) for text in frame.loc[marked, "text"]}


def _near_duplicates(frame: pd.DataFrame, config: DataConfig) -> tuple[pd.DataFrame, DataReport, list[Pair]]:
    """Clusters of near-duplicate rows for the report; with data.near_duplicates=drop, one row per cluster and
    label is kept (its given test row first). Rows of one cluster with different labels all stay: they may be
    different requests worded alike, or label errors, and the report lists them for a person to judge. Also
    returns the pairs, by position in `frame` (a RangeIndex), for the leakage check after splitting."""
    pairs = near_duplicate_pairs(frame["text"].tolist(), config.near_duplicate_threshold)
    groups = clusters(len(frame), pairs)
    rank = frame["split"].map(_SPLIT_PRIORITY) if "split" in frame else pd.Series(0, index=frame.index)
    extra = []
    for group in groups:
        seen: set[str] = set()
        for position in sorted(group, key=lambda i: (rank.iat[i], i)):
            label = str(frame["label"].iat[position])  # a str already (select_columns)
            if label in seen:
                extra.append(position)
            seen.add(label)
    report = {
        "threshold": config.near_duplicate_threshold,
        "policy": config.near_duplicates,
        "clusters": len(groups),
        "rows_in_clusters": sum(len(group) for group in groups),
        "clusters_with_different_labels": sum(frame["label"].iloc[group].nunique() > 1 for group in groups),
        "examples": [
            {
                "rows": frame["row"].iloc[group].tolist()[:5],
                "texts": frame["text"].iloc[group].tolist()[:5],
                "labels": frame["label"].iloc[group].tolist()[:5],
                "size": len(group),
            }
            for group in groups[:EXAMPLES_LISTED]
        ],
    }
    if config.near_duplicates == "drop":
        report["dropped"] = len(extra)
        frame = frame.drop(index=frame.index[extra])
    return frame, report, pairs


def split_leakage(splits: dict[str, pd.DataFrame], threshold: float) -> DataReport:
    """Validation and test rows with a near-duplicate in the training split (see `leakage_report`)."""
    train = splits["train"]
    texts = [text for name in LEAKAGE_CHECKED for text in splits[name]["text"]]
    matches = best_matches(train["text"].tolist(), texts, threshold)
    found: dict[str, dict[int, Pair]] = {}
    offset = 0
    for name in LEAKAGE_CHECKED:
        size = len(splits[name])
        found[name] = {
            p.second - offset: Pair(p.first, p.second - offset, p.similarity)
            for p in matches.values()
            if offset <= p.second < offset + size
        }
        offset += size
    return leakage_report(splits, found, threshold)


def cross_split_matches(pairs: list[Pair], origins: dict[str, pd.Index]) -> dict[str, dict[int, Pair]]:
    """From near-duplicate pairs found over every row before splitting (`origins`: each split's rows, as
    positions in that search, in split order): per checked split, each leaked row's closest training row."""
    where = {int(i): (name, position) for name, index in origins.items() for position, i in enumerate(index)}
    found: dict[str, dict[int, Pair]] = {name: {} for name in LEAKAGE_CHECKED}
    for pair in pairs:
        first, second = where.get(pair.first), where.get(pair.second)
        if first is None or second is None:
            continue  # a row dropped after the search (a near-duplicate kept once)
        for (split, position), (other, other_position) in ((first, second), (second, first)):
            if split == "train" and other in found:
                best = found[other].get(other_position)
                if best is None or pair.similarity > best.similarity:
                    found[other][other_position] = Pair(position, other_position, pair.similarity)
    return found


def leakage_report(splits: dict[str, pd.DataFrame], found: dict[str, dict[int, Pair]], threshold: float) -> DataReport:
    """Per checked split: how many rows have a near-duplicate in training, where (`positions` in the split,
    for scoring them apart), and the closest training row of the most similar ones."""
    train = splits["train"]
    leakage: DataReport = {"threshold": threshold}
    for name in LEAKAGE_CHECKED:
        split, matched = splits[name], found[name]
        closest = sorted(matched, key=lambda i: -matched[i].similarity)[:EXAMPLES_LISTED]
        leakage[name] = {
            "rows": len(matched),
            "share": len(matched) / len(split) if len(split) else 0.0,
            "positions": sorted(matched),
            "examples": [
                {
                    "text": split["text"].iat[i],
                    "label": split["label"].iat[i],
                    "train_text": train["text"].iat[matched[i].first],
                    "train_label": train["label"].iat[matched[i].first],
                    "similarity": round(matched[i].similarity, 3),
                }
                for i in closest
            ],
        }
    return leakage


def leaked_positions(report: DataReport, split: str = "test") -> list[int] | None:
    """Positions of a split's rows with a near-duplicate in training, from a data report (None: not checked,
    as in data reports written before the check existed)."""
    positions: list[int] | None = report.get("leakage", {}).get(split, {}).get("positions")
    return positions


def save_prepared(prepared: PreparedData, folder: Path) -> None:
    """Write the splits as jsonl and the report as JSON: the frozen data a version was trained on."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in prepared.splits.items():
        split.to_json(folder / f"{name}.jsonl", orient="records", lines=True, force_ascii=False)
    if prepared.holdout is not None:
        prepared.holdout.to_json(folder / HOLDOUT_FILE, orient="records", lines=True, force_ascii=False)
    (folder / "data_report.json").write_text(json.dumps(prepared.report, indent=2, ensure_ascii=False, default=int))


def load_prepared(folder: Path) -> PreparedData:
    """Read back a folder written by save_prepared."""
    report = json.loads((folder / "data_report.json").read_text())
    splits = {name: _read_jsonl(folder / f"{name}.jsonl") for name in SPLITS}
    holdout = _read_jsonl(folder / HOLDOUT_FILE) if (folder / HOLDOUT_FILE).is_file() else None
    return PreparedData(
        splits=splits, labels=report["labels"], report=report, fingerprint=report["fingerprint"], holdout=holdout
    )


def _read_jsonl(path: Path) -> pd.DataFrame:
    if not path.stat().st_size:
        return pd.DataFrame(columns=["row", "text", "label"])
    return pd.read_json(path, lines=True, dtype={"text": str, "label": str, "prediction_id": str})


def labelled_rows(config: DataConfig, path: Path) -> pd.DataFrame:
    """Every row of a labelled file, cleaned like training data, to evaluate on (no dedup, no split)."""
    frame = select_columns(read_table(path, config.format), path, config.text_column, config.label_column)
    frame, _ = clean_rows(frame, path)
    return frame[["row", "text", "label"]].reset_index(drop=True)
