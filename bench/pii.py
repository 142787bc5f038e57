"""Benchmark: how well personal data is masked, and what masking costs.

    python bench/pii.py [--repeat 20]

1. The labelled set bench/data/pii_messages.jsonl: customer messages written for tuneloop in English and
   Chinese, some with personal data (each piece labelled with its kind and exact text), the others full of
   ordinary numbers (order and tracking numbers, amounts, dates, versions) that must stay.
2. Every message is masked with the default settings (every kind; phone regions CN, US, GB); a labelled
   piece counts as found when a span of its kind covers exactly it.
3. The cost: microseconds per message over the labelled set, and over Banking77's test messages (ordinary
   traffic, nearly no personal data), each timed `--repeat` times.
Prints one JSON line: recall and precision per kind and overall, false positives in the messages without
personal data, and the cost per message; also written to bench/results/pii.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from _common import BENCH, add_result_options, load_banking77, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="Timed passes over each set.")
    add_result_options(parser)
    args = parser.parse_args()

    from tuneloop.config import PrivacyConfig
    from tuneloop.privacy.mask import PII_TYPES, find_pii, masker

    rows = [json.loads(line) for line in (BENCH / "data" / "pii_messages.jsonl").read_text("utf-8").splitlines()]
    truth, hits, found_total = Counter[str](), Counter[str](), Counter[str]()
    clean_messages = clean_flagged = 0
    for row in rows:
        wanted = {tuple(pair) for pair in row["pii"]}
        found = {(f.kind, row["text"][f.start : f.end]) for f in find_pii(row["text"])}
        for kind, _ in wanted:
            truth[kind] += 1
        for kind, value in found:
            found_total[kind] += 1
            hits[kind] += (kind, value) in wanted
        if not wanted:
            clean_messages += 1
            clean_flagged += bool(found)

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    per_kind = {
        kind: {
            "labelled": truth[kind],
            "recall": ratio(hits[kind], truth[kind]),
            "precision": ratio(hits[kind], found_total[kind]),
        }
        for kind in PII_TYPES
    }
    mask = masker(PrivacyConfig())
    assert mask is not None

    def microseconds_per_text(texts: list[str]) -> float:
        started = time.perf_counter()
        for _ in range(args.repeat):
            for text in texts:
                mask(text)
        return round((time.perf_counter() - started) / (args.repeat * len(texts)) * 1e6, 1)

    _, banking = load_banking77()
    banking_texts = banking["text"].astype(str).tolist()
    result = {
        "messages": len(rows),
        "languages": {"zh": sum(any("\u4e00" <= c <= "\u9fff" for c in r["text"]) for r in rows)},
        "pieces_labelled": sum(truth.values()),
        "recall": ratio(sum(hits.values()), sum(truth.values())),
        "precision": ratio(sum(hits.values()), sum(found_total.values())),
        "per_kind": per_kind,
        "messages_without_personal_data": clean_messages,
        "of_them_masked_anyway": clean_flagged,
        "microseconds_per_message": {
            "labelled_set": microseconds_per_text([r["text"] for r in rows]),
            "banking77_test": microseconds_per_text(banking_texts[:1000]),
        },
        "banking77_test_messages_changed": sum(mask(t) != t for t in banking_texts),
        "banking77_test_messages": len(banking_texts),
    }
    result["languages"]["en"] = len(rows) - result["languages"]["zh"]
    publish(args, "pii", result)


if __name__ == "__main__":
    main()
