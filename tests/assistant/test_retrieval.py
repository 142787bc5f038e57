"""Hybrid FAQ search: tokenising both languages, loading the FAQ, fusing BM25 with dense ranks, caching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tuneloop.assistant.retrieval import FaqEntry, FaqIndex, load_faq, tokenize
from tuneloop.errors import TuneloopError

ENTRIES = [
    FaqEntry("How long does a refund take?", "Refunds take 5-7 business days.", "refund", "en"),
    FaqEntry("Where is my parcel?", "Track it on the My Orders page.", "delivery", "en"),
    FaqEntry("What is 3-D Secure?", "A bank check for card payments.", "payment", "en"),
    FaqEntry("退款多久到账？", "退款5-7个工作日到账。", "refund", "zh"),
]


class FakeEmbedder:
    """Vectors chosen by hand: a message containing a key word points at that entry's direction."""

    name = "fake"

    def __init__(self) -> None:
        self.calls = 0
        self.directions = {"refund": 0, "money": 0, "parcel": 1, "package": 1, "secure": 2, "退款": 3}

    def encode(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), 4), dtype=np.float32)
        for row, text in enumerate(texts):
            for word, axis in self.directions.items():
                if word in text.lower():
                    out[row, axis] = 1.0
            out[row] = out[row] / np.linalg.norm(out[row]) if out[row].any() else np.full(4, 0.5)
        return out


def test_tokenize_keeps_content_words_chinese_characters_and_bigrams():
    assert tokenize("Where's my <b>PARCEL</b> #A123?") == ["where's", "parcel", "a123"]
    assert tokenize("退款多久") == ["退", "款", "多", "久", "退款", "款多", "多久"]
    assert tokenize("iPhone 有货吗") == ["iphone", "货", "有货", "货吗"]


def test_dense_finds_a_paraphrase_and_bm25_finds_an_exact_term():
    index = FaqIndex(ENTRIES, FakeEmbedder())
    paraphrase = index.search("I want my money back", k=2, lang="en")
    assert paraphrase[0].entry.intent == "refund" and paraphrase[0].dense_rank == 1
    exact = index.search("is 3-D secure required", k=1, lang="en")[0]
    assert exact.entry.intent == "payment" and exact.bm25_rank == 1 and exact.dense_rank == 1
    assert exact.score == pytest.approx(2 / 61)  # first in both rankings: 1/(60+1) twice


def test_search_keeps_to_the_message_language_when_the_faq_has_it():
    index = FaqIndex(ENTRIES, FakeEmbedder())
    assert {h.entry.lang for h in index.search("退款", k=4, lang="zh")} == {"zh"}
    assert {h.entry.lang for h in index.search("refund", k=4, lang="fr")} == {"en", "zh"}


def test_entries_without_a_language_serve_every_language():
    index = FaqIndex([*ENTRIES, FaqEntry("refund policy", "Any language.", "refund", None)], FakeEmbedder())
    assert "Any language." in {h.entry.answer for h in index.search("退款", k=5, lang="zh")}


def test_question_vectors_are_cached_on_disk(tmp_path):
    embedder = FakeEmbedder()
    FaqIndex(ENTRIES, embedder, cache_dir=tmp_path)
    assert embedder.calls == 1 and len(list(tmp_path.glob("faq-*.npy"))) == 1
    again = FakeEmbedder()
    FaqIndex(ENTRIES, again, cache_dir=tmp_path)
    assert again.calls == 0


def test_load_faq_reads_optional_columns_and_names_bad_rows(tmp_path):
    good = tmp_path / "faq.csv"
    pd.DataFrame([{"question": "Q1?", "answer": "A1", "intent": "x"}]).to_csv(good, index=False)
    assert load_faq(good) == [FaqEntry("Q1?", "A1", "x", None)]
    bad = tmp_path / "bad.csv"
    pd.DataFrame([{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": ""}]).to_csv(bad, index=False)
    with pytest.raises(TuneloopError, match="row 3: empty question or answer"):
        load_faq(bad)
    wrong = tmp_path / "wrong.csv"
    pd.DataFrame([{"q": "Q1?", "a": "A1"}]).to_csv(wrong, index=False)
    with pytest.raises(TuneloopError, match="needs columns question and answer"):
        load_faq(wrong)
