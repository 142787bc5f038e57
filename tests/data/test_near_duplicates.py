"""Near-duplicates and cross-split leakage: MinHash LSH candidates, checked by exact Jaccard similarity."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pandas as pd
import pytest

from tuneloop.config import DataConfig
from tuneloop.data.near_duplicates import (
    clusters,
    jaccard,
    near_duplicate_pairs,
    pairs_across,
    shingles,
)
from tuneloop.data.prepare import leaked_positions, prepare_data, split_leakage
from tuneloop.evaluate.report import leakage_line, leakage_scores

# fmt: off
WORDS = [
    "card", "account", "transfer", "refund", "money", "payment", "bank", "cash", "fee", "limit", "pin", "phone",
    "app", "balance", "exchange", "rate", "travel", "abroad", "salary", "loan", "savings", "interest", "statement",
    "branch", "online", "password", "address", "name", "email", "code",
]
# fmt: on


def sentence(rng: random.Random, length: int = 10) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def reworded(text: str) -> str:
    """The same request with different case and punctuation, and one word appended."""
    return text.upper().replace(" ", ", ", 1) + " please"


def test_shingles_ignore_case_and_punctuation_and_split_chinese_into_characters():
    assert shingles("Top-up, please!") == shingles("top up please")
    assert shingles("退款") == frozenset({"退", "款", "退 款"})
    assert "order 退" in shingles("order退款")  # mixed scripts: the Latin word and each character
    assert shingles("!!! 🙂") == frozenset()


def test_planted_paraphrases_are_found_and_unrelated_texts_are_not():
    rng = random.Random(0)
    originals = [sentence(rng) for _ in range(300)]
    planted = {i: reworded(originals[i]) for i in range(0, 300, 10)}
    texts = originals + list(planted.values())
    found = {(p.first, p.second) for p in near_duplicate_pairs(texts, 0.8)}
    expected = {(i, 300 + k) for k, i in enumerate(planted)}
    assert expected <= found
    unrelated = found - expected
    # Every other pair reported is as close as asked: the candidates are checked exactly.
    sets = [shingles(t) for t in texts]
    assert all(jaccard(sets[a], sets[b]) >= 0.8 for a, b in unrelated)
    assert not unrelated  # random ten-word sentences share few word pairs


def test_lsh_misses_almost_no_pair_a_brute_force_comparison_finds():
    rng = random.Random(1)
    base = [sentence(rng, 12) for _ in range(60)]
    texts = []
    for text in base:  # variants dropping one word each: Jaccard between about 0.6 and 0.9
        words = text.split()
        texts += [text] + [" ".join(words[:k] + words[k + 1 :]) for k in range(0, 12, 3)]
    sets = [shingles(t) for t in texts]
    brute = {
        (a, b) for a, b in itertools.combinations(range(len(texts)), 2) if sets[a] and jaccard(sets[a], sets[b]) >= 0.7
    }
    found = {(p.first, p.second) for p in near_duplicate_pairs(texts, 0.7)}
    assert found <= brute
    assert len(brute) > 100 and len(found) >= 0.97 * len(brute)


def test_clusters_are_connected_groups_largest_first():
    pairs = near_duplicate_pairs(["a b c d e", "A b c d e!", "x y z w v", "X Y Z W V", "x y z w v.", "lone text"], 0.9)
    assert clusters(6, pairs) == [[2, 3, 4], [0, 1]]
    assert clusters(3, []) == []


def test_pairs_across_two_collections_index_each_collection():
    pairs = pairs_across(["where is my card", "refund me"], ["hello there", "Where is my card?"], 0.8)
    assert [(p.first, p.second, p.similarity) for p in pairs] == [(0, 1, 1.0)]


def write(tmp_path, rows):
    path = tmp_path / "d.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def distinct_rows(seed=2, per_label=20, labels=("a", "b", "c")):
    rng = random.Random(seed)
    return [{"text": sentence(rng), "label": label} for label in labels for _ in range(per_label)]


def test_near_duplicate_clusters_are_reported_and_dropped_on_request(tmp_path):
    rows = distinct_rows()
    rows += [{"text": reworded(rows[i]["text"]), "label": rows[i]["label"]} for i in (0, 1, 25)]
    rows.append({"text": reworded(rows[45]["text"]), "label": "a"})  # row 45 is a "c": different labels
    path = write(tmp_path, rows)
    kept = prepare_data(DataConfig(path=path))
    near = kept.report["near_duplicates"]
    assert near["clusters"] == 4 and near["rows_in_clusters"] == 8 and near["clusters_with_different_labels"] == 1
    assert near["policy"] == "keep" and kept.report["rows_kept"] == 64
    assert any(set(example["labels"]) == {"a", "c"} for example in near["examples"])
    dropped = prepare_data(DataConfig(path=path, near_duplicates="drop"))
    assert dropped.report["dropped"]["near_duplicate"] == 3  # the pair with different labels stays
    assert dropped.report["rows_kept"] == 61
    every = pd.concat(dropped.splits.values())["text"]
    assert rows[45]["text"] in set(every) and reworded(rows[45]["text"]) in set(every)


def test_a_given_test_row_survives_and_its_training_copy_is_the_one_dropped(tmp_path):
    rows = [{**row, "split": "train"} for row in distinct_rows()]
    rows.append({"text": reworded(rows[3]["text"]), "label": rows[3]["label"], "split": "test"})
    rows += [{**row, "split": "test"} for row in distinct_rows(seed=9, per_label=3)]
    prepared = prepare_data(DataConfig(path=write(tmp_path, rows), split_column="split", near_duplicates="drop"))
    assert reworded(rows[3]["text"]) in set(prepared.test["text"])
    assert rows[3]["text"] not in set(pd.concat([prepared.train, prepared.val])["text"])


def test_test_rows_with_a_near_duplicate_in_train_are_listed_or_dropped(tmp_path):
    train = [{**row, "split": "train"} for row in distinct_rows()]
    fresh = [{**row, "split": "test"} for row in distinct_rows(seed=5, per_label=4)]
    leaked = [{"text": reworded(train[i]["text"]), "label": train[i]["label"], "split": "test"} for i in (2, 30)]
    path = write(tmp_path, train + fresh + leaked)
    reported = prepare_data(DataConfig(path=path, split_column="split"))
    leakage = reported.report["leakage"]
    assert leakage["policy"] == "report" and leakage["test"]["rows"] == 2
    positions = leaked_positions(reported.report)
    assert sorted(reported.test["text"].iloc[positions]) == sorted(row["text"] for row in leaked)
    assert {e["train_text"] for e in leakage["test"]["examples"]} == {train[2]["text"], train[30]["text"]}
    assert leakage["test"]["share"] == pytest.approx(2 / 14)

    dropped = prepare_data(DataConfig(path=path, split_column="split", leakage="drop"))
    assert len(dropped.test) == 12 and not set(dropped.test["text"]) & {row["text"] for row in leaked}
    assert dropped.report["dropped"]["near_duplicate_of_train_in_test"] == 2
    assert leaked_positions(dropped.report) == []


def test_chinese_paraphrases_leak_too(tmp_path):
    train = ["送餐速度很快，味道也不错", "菜都凉了，等了一个多小时", "包装很好，分量足", "太咸了，下次不点了"] * 1
    rows = [{"text": t, "label": label, "split": "train"} for t, label in zip(train, "pnpn", strict=True)]
    rows += [{"text": t + "！", "label": "p", "split": "train"} for t in ("服务态度好", "价格实惠")]
    rows += [{"text": "菜都凉了，等了一个多小时。", "label": "n", "split": "test"}]  # punctuation only
    rows += [{"text": "很好吃，还会再来", "label": "p", "split": "test"}]
    prepared = prepare_data(DataConfig(path=write(tmp_path, rows), split_column="split"))
    assert prepared.report["leakage"]["test"]["rows"] == 1
    assert prepared.test["text"].iloc[leaked_positions(prepared.report)[0]] == "菜都凉了,等了一个多小时。"


def test_accuracy_is_scored_apart_on_leaked_rows():
    truth = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    scores = leakage_scores(truth, probs, pd.Index([0, 1, 2, 3]), leaked=[0, 2])
    assert scores.model_dump() == {"rows": 2, "accuracy_leaked": 1.0, "accuracy_not_leaked": 0.5}
    assert leakage_scores(truth, probs, pd.Index([0, 1, 2, 3]), leaked=[]).accuracy_leaked is None
    assert leakage_line(scores, 4) == (
        "2 of 4 test rows have a near-duplicate in the training split: accuracy 100.00% on them, 50.00% on the "
        "other rows"
    )


@pytest.mark.parametrize("near_duplicates", ["keep", "drop"])
def test_leakage_from_the_one_search_before_splitting_matches_a_search_of_the_splits(tmp_path, near_duplicates):
    rng = random.Random(3)
    rows = distinct_rows(seed=3, per_label=40)
    rows += [{"text": reworded(rows[i]["text"]), "label": rows[i]["label"]} for i in rng.sample(range(120), 30)]
    rows += [{"text": reworded(rows[i]["text"]), "label": "a"} for i in rng.sample(range(120), 10)]
    prepared = prepare_data(DataConfig(path=write(tmp_path, rows), near_duplicates=near_duplicates))
    searched = split_leakage(prepared.splits, 0.8)
    for name in ("val", "test"):
        found = prepared.report["leakage"][name]
        assert found["positions"] == searched[name]["positions"] and found["rows"] == searched[name]["rows"]
    assert prepared.report["leakage"]["test"]["rows"] + prepared.report["leakage"]["val"]["rows"] > 0
