"""Hybrid FAQ search: BM25 over words plus dense embeddings, fused by reciprocal rank.

BM25 catches exact terms (an order number, "3-D Secure", "发票") that an embedding blurs; embeddings
catch paraphrases that share no word with the FAQ. Reciprocal rank fusion (Cormack et al. 2009)
combines the two rankings without having to calibrate their scores against each other. The index is
built once per FAQ file and encoder, and the embeddings are cached on disk.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from tuneloop.atomic import atomic_file
from tuneloop.data.clean import clean_text
from tuneloop.data.load import read_table
from tuneloop.errors import TuneloopError
from tuneloop.models.embedder import SentenceEmbedder

log = logging.getLogger(__name__)
# bm25s sets its own logger to DEBUG at import, which would print "Building index" on every start.
logging.getLogger("bm25s").setLevel(logging.WARNING)
RRF_K = 60  # the constant from the RRF paper; ranks past ~60 barely matter
CANDIDATES = 20
_LATIN = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
# RRF counts ranks, not scores: a BM25 "match" on "my" or "的" would rank an entry first. Function words go.
_CHINESE_FUNCTION_CHARACTERS = set("的了吗呢啊吧呀哦么嘛是在我你他她它们这那有和就都也还要把被给")


@dataclass(frozen=True)
class FaqEntry:
    question: str
    answer: str
    intent: str | None = None
    lang: str | None = None


@dataclass(frozen=True)
class FaqHit:
    entry: FaqEntry
    score: float  # fused reciprocal-rank score
    similarity: float  # cosine between the message and the entry's question
    bm25_rank: int | None
    dense_rank: int | None


def tokenize(text: str) -> list[str]:
    """Lower-cased Latin words, plus Chinese characters and character bigrams (no dictionary needed)."""
    text = clean_text(text).casefold()
    tokens = [w for w in _LATIN.findall(text) if w not in ENGLISH_STOP_WORDS]
    for run in _CJK.findall(text):
        tokens.extend(ch for ch in run if ch not in _CHINESE_FUNCTION_CHARACTERS)
        tokens.extend(run[i : i + 2] for i in range(len(run) - 1))
    return tokens


def load_faq(path: Path) -> list[FaqEntry]:
    """question, answer and optional intent and lang columns from csv/tsv/jsonl/parquet."""
    frame = read_table(Path(path))
    missing = [c for c in ("question", "answer") if c not in frame.columns]
    if missing:
        raise TuneloopError(
            f"{path}: the FAQ needs columns question and answer; missing {', '.join(missing)} "
            f"(columns are: {', '.join(map(str, frame.columns))})"
        )
    entries = []
    for number, row in enumerate(frame.to_dict("records"), start=2):
        question, answer = clean_text(str(row["question"] or "")), str(row["answer"] or "").strip()
        if not question or not answer:
            raise TuneloopError(f"{path} row {number}: empty question or answer")
        optional = {
            k: (str(row[k]).strip() or None) if k in row and pd.notna(row[k]) else None for k in ("intent", "lang")
        }
        entries.append(FaqEntry(question, answer, **optional))
    return entries


class FaqIndex:
    """BM25 + dense index over FAQ entries; `search` returns fused hits, best first."""

    def __init__(self, entries: list[FaqEntry], embedder: SentenceEmbedder, cache_dir: Path | None = None) -> None:
        if not entries:
            raise TuneloopError("the FAQ is empty")
        self.entries = entries
        self.embedder = embedder
        documents = [tokenize(f"{e.question} {e.answer}") for e in entries]
        self.bm25 = bm25s.BM25()
        self.bm25.index(documents, show_progress=False)
        self.vectors = self._question_vectors(cache_dir)

    def _question_vectors(self, cache_dir: Path | None) -> np.ndarray:
        questions = [e.question for e in self.entries]
        key = hashlib.sha256("\x1f".join([self.embedder.name, *questions]).encode()).hexdigest()[:16]
        cached = cache_dir / f"faq-{key}.npy" if cache_dir else None
        if cached is not None and cached.is_file():
            try:
                vectors: np.ndarray = np.load(cached, allow_pickle=False)  # an .npy file: one array
                return vectors
            except (OSError, ValueError):
                log.warning("unreadable FAQ vector cache %s: embedding again", cached)
        vectors = self.embedder.encode(questions)
        if cached is not None:
            with atomic_file(cached) as staging, staging.open("wb") as out:
                np.save(out, vectors)
        return vectors

    def search(
        self, query: str, k: int = 3, lang: str | None = None, query_vector: np.ndarray | None = None
    ) -> list[FaqHit]:
        """The k best entries for a message; entries in `lang` only, when the FAQ has any in it."""
        allowed = np.ones(len(self.entries), dtype=bool)
        if lang is not None:
            # Entries without a language serve every language.
            same = np.array([e.lang in (None, lang) for e in self.entries])
            if any(e.lang == lang for e in self.entries):
                allowed = same
        vector = query_vector if query_vector is not None else self.embedder.encode([query])[0]
        similarity = self.vectors @ vector
        dense_order = [i for i in np.argsort(-similarity) if allowed[i]][:CANDIDATES]
        tokens = tokenize(query)
        bm25_scores = self.bm25.get_scores(tokens) if tokens else np.zeros(len(self.entries))
        bm25_order = [i for i in np.argsort(-bm25_scores) if allowed[i] and bm25_scores[i] > 0][:CANDIDATES]
        fused: dict[int, float] = {}
        for ranking in (dense_order, bm25_order):
            for rank, index in enumerate(ranking, start=1):
                fused[index] = fused.get(index, 0.0) + 1.0 / (RRF_K + rank)
        best = sorted(fused, key=lambda i: -fused[i])[:k]
        return [
            FaqHit(
                self.entries[i],
                fused[i],
                float(similarity[i]),
                bm25_order.index(i) + 1 if i in bm25_order else None,
                dense_order.index(i) + 1 if i in dense_order else None,
            )
            for i in best
        ]
