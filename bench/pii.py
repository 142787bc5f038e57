"""Benchmark: how well personal data is masked, on messages written alongside the masker and on messages nobody
on the project wrote, and what masking costs.

    python bench/pii.py [--repeat 20]

1. Written alongside the masker: bench/data/pii_messages.jsonl, customer messages in English and Chinese, some
   with personal data (each piece labelled with its kind and exact text), the others full of ordinary numbers
   (order and tracking numbers, amounts, dates, versions) that must stay.
2. Not written here (../shared/datasets/pii_public/, its README says where from): Presidio's labelled synthetic
   sentences (English, many countries' phone formats, cards of every issuer, addresses and ZIP codes that must
   stay) and MultiPriv's Chinese personal records (phone, e-mail and resident ID inside Chinese sentences).
3. Every message is masked with the default settings (every kind; phone regions CN, US, GB). A piece counts as
   found when a span of its kind covers exactly it, and as masked away when its text no longer appears in the
   masked message; a message without personal data counts as altered when masking changed it.
4. The cost: microseconds per message over each set and over Banking77's test messages, timed `--repeat` times.
Prints one JSON line with both sets side by side; also written to bench/results/pii.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from _common import BENCH, add_result_options, dataset_file, load_banking77, publish

Labelled = list[tuple[str, list[tuple[str, str]]]]  # (message, [(kind, exact text)])
PRESIDIO_KINDS = {
    "EMAIL_ADDRESS": "email",
    "PHONE_NUMBER": "phone",
    "CREDIT_CARD": "card",
    "IBAN_CODE": "iban",
    "IP_ADDRESS": "ip",
    "URL": "url",
}
NOT_MASKED_KINDS = {"US_SSN", "US_DRIVER_LICENSE"}  # sentences with these are neither clean nor scored


def own_set() -> Labelled:
    lines = (BENCH / "data" / "pii_messages.jsonl").read_text("utf-8").splitlines()
    return [(row["text"], [tuple(pair) for pair in row["pii"]]) for row in map(json.loads, lines)]


def public_set() -> Labelled:
    rows: Labelled = []
    for item in json.loads(dataset_file("pii_public", "presidio_synth_dataset_v2.json").read_text("utf-8")):
        text, spans = item["full_text"], item["spans"]
        if any(span["entity_type"] in NOT_MASKED_KINDS for span in spans):
            continue
        pieces = [
            (PRESIDIO_KINDS[span["entity_type"]], text[span["start_position"] : span["end_position"]])
            for span in spans
            if span["entity_type"] in PRESIDIO_KINDS
        ]
        rows.append((text, pieces))
    records = json.loads(dataset_file("pii_public", "multipriv_data_person_1000_zh.json").read_text("utf-8"))
    for record in records:
        text = record["naturalParagraph"]
        fields = (("emailAddress", "email"), ("phoneNumbers", "phone"), ("idCardNumbers", "cn_id"))
        rows.append((text, [(kind, str(record[name])) for name, kind in fields if str(record[name]) in text]))
    return rows


def ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def score(rows: Labelled, find: Callable[[str], list[tuple[str, int, int]]], mask: Callable[[str], str]) -> dict:
    """Recall (exact span), pieces masked away and precision per kind; clean messages altered."""
    truth, exact, away, found_total, hits = (Counter[str]() for _ in range(5))
    clean = altered = 0
    for text, pieces in rows:
        found = {(kind, text[start:end]) for kind, start, end in find(text)}
        masked = mask(text)
        for kind, value in pieces:
            truth[kind] += 1
            exact[kind] += (kind, value) in found
            away[kind] += value not in masked
        for kind, value in found:
            found_total[kind] += 1
            hits[kind] += (kind, value) in pieces
        if not pieces:
            clean += 1
            altered += masked != text
    per_kind = {
        kind: {
            "labelled": truth[kind],
            "recall": ratio(exact[kind], truth[kind]),
            "masked_away": ratio(away[kind], truth[kind]),
            "precision": ratio(hits[kind], found_total[kind]),
        }
        for kind in sorted(truth)
    }
    return {
        "messages": len(rows),
        "languages": {"zh": sum(any("\u4e00" <= c <= "\u9fff" for c in text) for text, _ in rows)},
        "pieces_labelled": sum(truth.values()),
        "recall": ratio(sum(exact.values()), sum(truth.values())),
        "masked_away": ratio(sum(away.values()), sum(truth.values())),
        "precision": ratio(sum(hits.values()), sum(found_total.values())),
        "per_kind": per_kind,
        "messages_without_personal_data": clean,
        "of_them_altered": altered,
    }


def microseconds_per_text(mask: Callable[[str], str], texts: list[str], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        for text in texts:
            mask(text)
    return round((time.perf_counter() - started) / (repeat * len(texts)) * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="Timed passes over each set.")
    add_result_options(parser)
    args = parser.parse_args()

    from tuneloop.config import PrivacyConfig
    from tuneloop.privacy.mask import find_pii, masker

    mask = masker(PrivacyConfig())
    assert mask is not None

    def find(text: str) -> list[tuple[str, int, int]]:
        return [(f.kind, f.start, f.end) for f in find_pii(text)]

    sets = {"written_alongside": own_set(), "not_written_here": public_set()}
    result: dict[str, Any] = {}
    for name, rows in sets.items():
        scored = score(rows, find, mask)
        scored["languages"]["en"] = len(rows) - scored["languages"]["zh"]
        scored["microseconds_per_message"] = microseconds_per_text(mask, [t for t, _ in rows], args.repeat)
        result[name] = scored
    _, banking = load_banking77()
    banking_texts = banking["text"].astype(str).tolist()
    result["banking77_test"] = {
        "messages": len(banking_texts),
        "changed": sum(mask(t) != t for t in banking_texts),
        "microseconds_per_message": microseconds_per_text(mask, banking_texts[:1000], args.repeat),
    }
    publish(args, "pii", result)


if __name__ == "__main__":
    main()
