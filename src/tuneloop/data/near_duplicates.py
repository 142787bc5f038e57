"""Near-duplicate texts: MinHash LSH (datasketch) over word shingles, verified by exact Jaccard similarity.

Exact duplicates are removed by `dedup_key`; paraphrases that differ by a word or some punctuation are not,
and when one lands in training and another in the test split, the test score overstates what the model
does on new text. This module finds such pairs once, over every row of the data, so that both the clusters
inside the data and the leakage across splits come from the same comparison.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# 128 permutations estimate a Jaccard similarity of 0.8 within about ±0.035 (one standard error); the
# candidates are then checked exactly, so the estimate only decides which pairs get checked.
NUM_PERM = 128
# Candidates are looked for below the threshold asked for, so that pairs just above it are rarely missed
# (LSH's banding is a soft cut-off); the exact check removes the extra candidates.
CANDIDATE_MARGIN = 0.15

# A word is a run of letters or digits; each CJK ideograph is a word of its own, so that Chinese, written
# without spaces, gets character and character-pair shingles (the usual unit for Chinese near-duplicates).
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def shingles(text: str) -> frozenset[str]:
    """A text's words and adjacent word pairs, case-folded: word order matters a little, punctuation not."""
    words = _WORD.findall(text.casefold())
    return frozenset([*words, *(f"{a} {b}" for a, b in zip(words, words[1:], strict=False))])


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass(frozen=True)
class Pair:
    """Two texts (by position) whose shingle sets overlap by `similarity` (Jaccard), first < second."""

    first: int
    second: int
    similarity: float


def near_duplicate_pairs(texts: Sequence[str], threshold: float) -> list[Pair]:
    """Every pair of texts whose shingles' Jaccard similarity is at least `threshold`.

    Texts without a word (only punctuation or emoji) have no shingles and are left to exact deduplication.
    """
    sets = [shingles(t) for t in texts]
    present = [i for i, s in enumerate(sets) if s]
    if len(present) < 2:
        return []
    signatures = MinHash.bulk([[s.encode() for s in sets[i]] for i in present], num_perm=NUM_PERM)
    index = MinHashLSH(threshold=max(threshold - CANDIDATE_MARGIN, 0.1), num_perm=NUM_PERM)
    with index.insertion_session() as session:
        for position, signature in enumerate(signatures):
            session.insert(position, signature, check_duplication=False)
    pairs = []
    for position, signature in enumerate(signatures):
        first = present[position]
        for other in index.query(signature):
            if other <= position:
                continue
            second = present[other]
            similarity = jaccard(sets[first], sets[second])
            if similarity >= threshold:
                pairs.append(Pair(first, second, similarity))
    return sorted(pairs, key=lambda p: (p.first, p.second))


def clusters(count: int, pairs: Sequence[Pair]) -> list[list[int]]:
    """Groups of two or more texts linked by near-duplicate pairs (connected components), each sorted,
    largest group first."""
    if not pairs:
        return []
    first = np.array([p.first for p in pairs])
    second = np.array([p.second for p in pairs])
    graph = coo_matrix((np.ones(len(pairs)), (first, second)), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for position in np.unique(np.concatenate([first, second])):
        members.setdefault(int(component[position]), []).append(int(position))
    return sorted(members.values(), key=lambda group: (-len(group), group[0]))


def pairs_across(references: Sequence[str], texts: Sequence[str], threshold: float) -> list[Pair]:
    """Near-duplicate pairs between two collections: `first` indexes `references`, `second` indexes `texts`."""
    offset = len(references)
    return [
        Pair(p.first, p.second - offset, p.similarity)
        for p in near_duplicate_pairs([*references, *texts], threshold)
        if p.first < offset <= p.second
    ]


def best_matches(references: Sequence[str], texts: Sequence[str], threshold: float) -> dict[int, Pair]:
    """For each text with a near-duplicate among `references`, its most similar one (by text position)."""
    best: dict[int, Pair] = {}
    for pair in pairs_across(references, texts, threshold):
        if pair.second not in best or pair.similarity > best[pair.second].similarity:
            best[pair.second] = pair
    return best
