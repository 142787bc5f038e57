"""Text normalisation that is safe for Chinese as well as English."""

from __future__ import annotations

import html
import re
import unicodedata

_TAG = re.compile(r"<[^<>]{0,500}?>")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Strip HTML, NFKC-normalise, drop control and zero-width characters, collapse whitespace.

    NFKC folds full-width Latin and digits (common in Chinese input methods) into ASCII while leaving
    CJK ideographs alone; entities are unescaped after tags are removed so that "&lt;b&gt;" stays text.
    """
    text = _TAG.sub(" ", text)
    text = html.unescape(text)
    text = unicodedata.normalize("NFKC", text)
    text = text.translate(_ZERO_WIDTH)
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)
    return _SPACE.sub(" ", text).strip()


def dedup_key(text: str) -> str:
    """Key under which two cleaned texts count as the same example (case-insensitive)."""
    return text.casefold()


def cjk_share(texts: list[str]) -> float:
    """Share of texts containing at least one CJK ideograph; used to pick a multilingual encoder."""
    if not texts:
        return 0.0
    return sum(1 for t in texts if any("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in t)) / len(
        texts
    )
