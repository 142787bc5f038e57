"""The shipped off-topic messages: generic negatives for out-of-scope detection (README.md beside this file).

5,700 messages written for tuneloop (English and Chinese, 37 everyday domains, MIT). Each message belongs
to one fixed part, by a hash of its text, so the parts never mix whoever loads them:
- train (70%): outlier exposure while an intent model trains;
- tune (10%): the out-of-scope side of a scope threshold, for an assistant given no examples of its own;
- heldout (20%): never used by tuneloop, only by reports of what the set covers (bench/assistant_eval.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pandas as pd

from tuneloop.data.clean import cjk_share
from tuneloop.errors import TuneloopError

MESSAGES = Path(__file__).with_name("messages.csv")
PARTS = {"train": range(0, 70), "tune": range(70, 80), "heldout": range(80, 100)}
LANGUAGES = ("en", "zh")
# A language is in the data when at least this share of its texts is written in it.
LANGUAGE_SHARE = 0.05


def part_of(text: str) -> str:
    """The fixed part of a message, from a hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 100
    return next(name for name, buckets in PARTS.items() if bucket in buckets)


@cache
def _all_messages() -> pd.DataFrame:
    frame = pd.read_csv(MESSAGES, dtype=str, keep_default_na=False)
    frame["part"] = frame["text"].map(part_of)
    return frame


def off_topic_messages(part: str, languages: Iterable[str] = LANGUAGES) -> pd.DataFrame:
    """The messages of one part in the given languages: columns text, lang, domain, part."""
    if part not in PARTS:
        raise TuneloopError(f"unknown part '{part}' of the off-topic messages: use one of {', '.join(PARTS)}")
    wanted = set(languages)
    unknown = wanted - set(LANGUAGES)
    if unknown:
        raise TuneloopError(f"the off-topic messages are in {', '.join(LANGUAGES)}, not {', '.join(sorted(unknown))}")
    frame = _all_messages()
    return frame[(frame["part"] == part) & frame["lang"].isin(wanted)].reset_index(drop=True)


def languages_of(texts: list[str]) -> tuple[str, ...]:
    """The shipped languages a set of texts is written in (by its share of texts with Chinese characters)."""
    chinese = cjk_share(texts)
    found = tuple(lang for lang, share in (("en", 1 - chinese), ("zh", chinese)) if share >= LANGUAGE_SHARE)
    return found or ("en",)
