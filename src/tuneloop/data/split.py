"""Seeded stratified splits that also work for classes with only a handful of examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold


def stratified_split(
    frame: pd.DataFrame, fractions: dict[str, float], seed: int, remainder: str = "train"
) -> pd.Series:
    """Assign each row a split name so that every label is spread over the splits in proportion.

    sklearn's train_test_split refuses classes smaller than the number of splits; support data often has
    rare intents, so we allot per class: at least one example always stays in `remainder`, and a class
    with enough rows gets at least one example in each other split.
    """
    rng = np.random.default_rng(seed)
    assignment = pd.Series(remainder, index=frame.index, dtype=object)
    for _, group in frame.groupby("label", sort=True):
        order = rng.permutation(group.index.to_numpy())
        n = len(order)
        start = 0
        for name, fraction in fractions.items():
            take = int(round(n * fraction))
            if take == 0 and n >= len(fractions) + 1:
                take = 1
            take = min(take, n - start - 1)
            if take <= 0:
                continue
            assignment.loc[order[start : start + take]] = name
            start += take
    return assignment


def kfold_assignment(frame: pd.DataFrame, k: int, seed: int) -> pd.Series:
    """Fold number per row (stratified); classes with fewer than k rows are spread round-robin."""
    counts = frame["label"].value_counts()
    folds = pd.Series(-1, index=frame.index, dtype=int)
    common = frame[frame["label"].map(counts) >= k]
    if len(common):
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        for fold, (_, held) in enumerate(splitter.split(common, common["label"])):
            folds.loc[common.index[held]] = fold
    rare = frame[frame["label"].map(counts) < k]
    for position, index in enumerate(rare.index):
        folds.loc[index] = position % k
    return folds
