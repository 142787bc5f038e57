"""Benchmark: how well personal data is masked, on messages written alongside the masker, on a public set its
rules were tuned on, and on a held-out set nobody tuned anything on; and what masking costs.

    python bench/pii.py [--repeat 20]

1. Written alongside the masker: bench/data/pii_messages.jsonl, customer messages in English and Chinese, some
   with personal data (each piece labelled with its kind and exact text), the others full of ordinary numbers
   (order and tracking numbers, amounts, dates, versions) that must stay.
2. Public, tuned on: Presidio's labelled synthetic
   sentences (English, many countries' phone formats, cards of every issuer, addresses and ZIP codes that must
   stay) and MultiPriv's Chinese personal records (phone, e-mail and resident ID inside Chinese sentences). The
   rules were improved while looking at its misses, so it no longer measures unseen text.
3. Held out: conversations of Schema-Guided Dialogue's test split (English) and CrossWOZ's (Chinese) with their
   labelled phone numbers, and Nannigalaxy's synthetic English sentences with e-mails, IBANs and cards; the
   masker's rules were frozen before the set was read.
   Both public sets are read from the source repositories at the commits in SOURCES below (git snapshots under
   TUNELOOP_SOURCES, see bench/_common.py), never copied into this repository.
4. Every message is masked with the default settings (every kind; phone regions CN, US, GB). A piece counts as
   found when a span of its kind covers exactly it, and as masked away when its text no longer appears in the
   masked message; a message without personal data counts as altered when masking changed it.
5. The cost: microseconds per message over each set and over Banking77's test messages, timed `--repeat` times.
6. With --presidio, Microsoft Presidio's pattern recognisers (presidio-analyzer, `pip install -e .[bench]`) on
   the same messages, scored the same way, and per kind which pieces each finds that the other misses. They run
   without spaCy or any model: an NLP engine that gives no tokens stands in for spaCy (it only feeds the
   context-word score boosts, and every result is kept whatever its score), the phone recogniser reads the same
   regions as tuneloop's, and tldextract uses its bundled public-suffix list instead of fetching one.
Prints one JSON line with the sets side by side; also written to bench/results/pii.json.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from _common import BENCH, add_result_options, load_banking77, publish, source_file

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
# Where each public set comes from: (repository, commit), licence beside it.
PRESIDIO = ("microsoft/presidio-research", "7622dec1e5f7d25dc60b57c28c39f4c4af197018")  # MIT
MULTIPRIV = ("CyberChangAn/MultiPriv-PII", "ac70d796111c20d4bffeeb88fdf73f77b03ba3b6")  # CC BY-NC-SA 4.0
SGD = ("google-research-datasets/dstc8-schema-guided-dialogue", "e852981ae34990f4358979625854259302feaa78")  # CC BY-SA
CROSSWOZ = ("thu-coai/CrossWOZ", "df82c9fdff91b9b130f2d6b89110d3870ba6260e")  # Apache 2.0
NANNIGALAXY = ("Nannigalaxy/PII-synthetic_dataset", "e776265d92426ab9ef11f7bea3b9989addc39b63")  # MIT
# The test split's files the snapshot here holds whole (12, 16, 19, 22, 23, 26-29 and 31 are stored as pointers).
SGD_TEST_FILES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 17, 18, 20, 21, 24, 25, 30, 32, 33, 34)


def own_set() -> Labelled:
    lines = (BENCH / "data" / "pii_messages.jsonl").read_text("utf-8").splitlines()
    return [(row["text"], [tuple(pair) for pair in row["pii"]]) for row in map(json.loads, lines)]


def public_set() -> Labelled:
    rows: Labelled = []
    for item in json.loads(source_file(*PRESIDIO, "data/synth_dataset_v2.json")):
        text, spans = item["full_text"], item["spans"]
        if any(span["entity_type"] in NOT_MASKED_KINDS for span in spans):
            continue
        pieces = [
            (PRESIDIO_KINDS[span["entity_type"]], text[span["start_position"] : span["end_position"]])
            for span in spans
            if span["entity_type"] in PRESIDIO_KINDS
        ]
        rows.append((text, pieces))
    records = json.loads(source_file(*MULTIPRIV, "LLM/data_person_1000_zh.json"))
    for record in records:
        text = record["naturalParagraph"]
        fields = (("emailAddress", "email"), ("phoneNumbers", "phone"), ("idCardNumbers", "cn_id"))
        rows.append((text, [(kind, str(record[name])) for name, kind in fields if str(record[name]) in text]))
    return rows


# Held-out set: clean messages drawn from each conversation corpus, and the kinds of the synthetic sentences.
HELD_OUT_CLEAN = 400
HELD_OUT_SEED = 2026
NANNIGALAXY_KINDS = {"EMAIL": "email", "PHONE": "phone", "IBAN": "iban", "CREDIT_CARD": "card"}
NANNIGALAXY_NOT_PERSONAL = {"PERSON", "ORG", "ORGANIZATION", "TITLE", "MISC", "EVENT", "BANK", "SYSTEM"}


def _with_clean_sample(labelled: dict[str, list[tuple[str, str]]], clean: set[str]) -> Labelled:
    """The messages with pieces, and HELD_OUT_CLEAN of the clean ones drawn with HELD_OUT_SEED (texts once)."""
    drawn = random.Random(HELD_OUT_SEED).sample(sorted(clean - set(labelled)), HELD_OUT_CLEAN)
    return [*labelled.items(), *((text, []) for text in drawn)]


def sgd_messages() -> Labelled:
    """Schema-Guided Dialogue turns: phone_number slot spans are the pieces; a turn with a digit and none is clean."""
    labelled: dict[str, list[tuple[str, str]]] = {}
    clean: set[str] = set()
    for number in SGD_TEST_FILES:
        for dialogue in json.loads(source_file(*SGD, f"test/dialogues_{number:03d}.json")):
            for turn in dialogue["turns"]:
                text = turn["utterance"]
                slots = [slot for frame in turn["frames"] for slot in frame["slots"]]
                phones = [text[s["start"] : s["exclusive_end"]] for s in slots if s["slot"] == "phone_number"]
                if phones:
                    labelled[text] = [("phone", phone) for phone in phones]
                elif any(c.isdigit() for c in text):
                    clean.add(text)
    return _with_clean_sample(labelled, clean)


def crosswoz_messages() -> Labelled:
    """CrossWOZ messages: each part of a 电话 act's value found in the text is a piece; a message with a digit and
    no 电话 act is clean."""
    with zipfile.ZipFile(io.BytesIO(source_file(*CROSSWOZ, "data/crosswoz/test.json.zip"))) as archive:
        dialogues = json.loads(archive.read("test.json"))
    labelled: dict[str, list[tuple[str, str]]] = {}
    clean: set[str] = set()
    for dialogue in dialogues.values():
        for message in dialogue["messages"]:
            text, values = message["content"], [act[3] for act in message["dialog_act"] if act[2] == "电话"]
            parts = [part for value in values for part in re.split(r"[,，;；、/]+", value) if part.strip()]
            if parts and all(part in text for part in parts):
                labelled[text] = [("phone", part) for part in parts]
            elif not values and any(c.isdigit() for c in text):
                clean.add(text)
    return _with_clean_sample(labelled, clean)


def nannigalaxy_messages() -> Labelled:
    """Synthetic sentences: e-mail, phone, IBAN and card entities are the pieces; a sentence with an entity of a
    kind the masker does not handle is left out, one with names and organisations only is clean."""
    rows: Labelled = []
    for record in json.loads(source_file(*NANNIGALAXY, "dataset/pii_syn_nano_en.json")):
        entities = [(e.get("label"), e.get("entity")) for e in record["NER"]]
        if any(label not in NANNIGALAXY_KINDS and label not in NANNIGALAXY_NOT_PERSONAL for label, _ in entities):
            continue
        pieces = [(NANNIGALAXY_KINDS[label], value) for label, value in entities if label in NANNIGALAXY_KINDS]
        if all(value in record["text"] for _, value in pieces):
            rows.append((record["text"], pieces))
    return rows


def held_out_set() -> Labelled:
    return sgd_messages() + crosswoz_messages() + nannigalaxy_messages()


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
    chinese = sum(any("\u4e00" <= c <= "\u9fff" for c in text) for text, _ in rows)
    return {
        "messages": len(rows),
        "languages": {"zh": chinese, "en": len(rows) - chinese},
        "pieces_labelled": sum(truth.values()),
        "recall": ratio(sum(exact.values()), sum(truth.values())),
        "masked_away": ratio(sum(away.values()), sum(truth.values())),
        "precision": ratio(sum(hits.values()), sum(found_total.values())),
        "per_kind": per_kind,
        "messages_without_personal_data": clean,
        "of_them_altered": altered,
    }


EXAMPLES = 3  # different pieces shown per kind of what one side finds and the other misses


def presidio_finder() -> Callable[[str], list[tuple[str, int, int]]]:
    """Presidio's pattern recognisers for the kinds both mask, with no NLP model (see the module's docstring)."""
    import tldextract
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NlpArtifacts, NlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UrlRecognizer,
    )
    from presidio_analyzer.predefined_recognizers.generic import email_recognizer

    from tuneloop.config import DEFAULT_PHONE_REGIONS

    offline = tldextract.TLDExtract(suffix_list_urls=())  # the bundled list: nothing fetched
    email_recognizer.tldextract = SimpleNamespace(extract=offline)

    class NoNlp(NlpEngine):
        def load(self) -> None:
            pass

        def is_loaded(self) -> bool:
            return True

        def process_text(self, text: str, language: str) -> NlpArtifacts:
            return NlpArtifacts(
                entities=[], tokens=[], tokens_indices=[], lemmas=[], nlp_engine=self, language=language
            )

        def process_batch(self, texts, language, batch_size=1, n_process=1, **kwargs):
            return ((text, self.process_text(text, language)) for text in texts)

        def is_stopword(self, word: str, language: str) -> bool:
            return False

        def is_punct(self, word: str, language: str) -> bool:
            return False

        def get_supported_entities(self) -> list[str]:
            return []

        def get_supported_languages(self) -> list[str]:
            return ["en"]

    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (
        EmailRecognizer(),
        UrlRecognizer(),
        IbanRecognizer(),
        CreditCardRecognizer(),
        IpRecognizer(),
        PhoneRecognizer(supported_regions=DEFAULT_PHONE_REGIONS),
    ):
        registry.add_recognizer(recognizer)
    engine = AnalyzerEngine(registry=registry, nlp_engine=NoNlp(), supported_languages=["en"])

    def find(text: str) -> list[tuple[str, int, int]]:
        """The spans found, less those inside a longer one (the domain of an e-mail address taken for a URL), as
        Presidio's anonymizer resolves such overlaps."""
        found = engine.analyze(text=text, language="en", entities=list(PRESIDIO_KINDS))
        spans = {(PRESIDIO_KINDS[r.entity_type], r.start, r.end) for r in found}
        inside = {
            a for a in spans for b in spans if a != b and b[1] <= a[1] and a[2] <= b[2] and b[2] - b[1] > a[2] - a[1]
        }
        return sorted(spans - inside, key=lambda span: span[1])

    return find


def masking_of(find: Callable[[str], list[tuple[str, int, int]]]) -> Callable[[str], str]:
    """What masking with these spans gives (overlapping spans are one: the first, as long as the longest)."""

    def mask(text: str) -> str:
        pieces, last = [], 0
        for kind, start, end in sorted(find(text), key=lambda span: (span[1], -span[2])):
            if start < last:
                continue
            pieces += [text[last:start], f"[{kind.upper()}]"]
            last = end
        return "".join(pieces) + text[last:]

    return mask


def disagreements(rows: Labelled, ours: Callable[[str], list], theirs: Callable[[str], list]) -> dict[str, Any]:
    """Per kind, the labelled pieces only tuneloop finds exactly and those only Presidio does, with examples."""
    only: dict[str, dict[str, list[str]]] = {"tuneloop": {}, "presidio": {}}
    for text, pieces in rows:
        found = {
            side: {(k, text[a:b]) for k, a, b in finder(text)}
            for side, finder in (("tuneloop", ours), ("presidio", theirs))
        }
        for piece in pieces:
            for side, other in (("tuneloop", "presidio"), ("presidio", "tuneloop")):
                if piece in found[side] and piece not in found[other]:
                    only[side].setdefault(piece[0], []).append(piece[1])
    return {
        f"only_{side}": {
            kind: {"pieces": len(values), "examples": list(dict.fromkeys(values))[:EXAMPLES]}
            for kind, values in kinds.items()
        }
        for side, kinds in only.items()
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
    parser.add_argument("--presidio", action="store_true", help="Also run Presidio's pattern recognisers (see 6.).")
    add_result_options(parser)
    args = parser.parse_args()

    from tuneloop.config import PrivacyConfig
    from tuneloop.privacy.mask import find_pii, masker

    mask = masker(PrivacyConfig())
    assert mask is not None

    def find(text: str) -> list[tuple[str, int, int]]:
        return [(f.kind, f.start, f.end) for f in find_pii(text)]

    sets = {"written_alongside": own_set(), "public_tuned_on": public_set(), "held_out": held_out_set()}
    presidio = presidio_finder() if args.presidio else None
    result: dict[str, Any] = {}
    for name, rows in sets.items():
        texts = [t for t, _ in rows]
        scored = score(rows, find, mask)
        scored["microseconds_per_message"] = microseconds_per_text(mask, texts, args.repeat)
        if presidio is not None:
            theirs = masking_of(presidio)
            scored["presidio"] = {
                **score(rows, presidio, theirs),
                "microseconds_per_message": microseconds_per_text(theirs, texts, max(1, args.repeat // 10)),
                **disagreements(rows, find, presidio),
            }
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
