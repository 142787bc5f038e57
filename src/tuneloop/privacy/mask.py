"""Personal data in texts, replaced by typed placeholders before anything is written.

Each type is found by a pattern and then checked the way its issuer checks it, so ordinary numbers (order
numbers, amounts, dates) stay: payment cards by the Luhn sum and their issuer prefixes, IBANs by their mod-97
check, Chinese resident ID numbers by their check digit and birth date (python-stdnum), phone numbers by
libphonenumber's rules for the number's country (international numbers, Chinese mobiles, and national numbers
written as phone numbers are: with separators or brackets, or after a word such as "call" or "电话"), IP
addresses by the `ipaddress` module. Works in English and Chinese text alike.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import get_args
from urllib.parse import parse_qsl, urlsplit

import phonenumbers
from stdnum import iban, luhn
from stdnum.cn import ric

from tuneloop.config import DEFAULT_PHONE_REGIONS, PiiType, PrivacyConfig

PII_TYPES: tuple[PiiType, ...] = get_args(PiiType)
PLACEHOLDER: dict[PiiType, str] = {
    "email": "[EMAIL]",
    "url": "[URL]",
    "iban": "[IBAN]",
    "card": "[CARD]",
    "cn_id": "[CN_ID]",
    "ip": "[IP]",
    "phone": "[PHONE]",
}

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
URL = re.compile(r"https?://[^\s<>\"'，。、；）)]+", re.IGNORECASE)
# Query parameters and URL user-info that carry a credential; a URL with one is masked whole.
SECRET_PARAMS = re.compile(
    r"token|key|secret|password|passwd|pwd|auth|session|sid|sig|signature|code|credential|ticket", re.IGNORECASE
)
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
CARD_PREFIXES = re.compile(r"4|5[1-5]|2[2-7]|3[47]|6(?:011|2|4[4-9]|5)|35")
CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
CN_MOBILE = re.compile(r"(?<![\dA-Za-z])(?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?![\dA-Za-z])")
# A number glued to letters or a code's separators is part of a code (INV-2024-000187), not a phone number.
ATTACHED_BEFORE = re.compile(r"(?:[A-Za-z][-/#]?|[-/#])$")
ATTACHED_AFTER = re.compile(r"[A-Za-z]")
PHONE_WORDS = re.compile(
    r"(?:call|phone|tel|telephone|mobile|cell|whatsapp|number|reach me|text me|电话|手机|联系|致电|号码|打给)"
    r"[^0-9+]{0,12}$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Found:
    start: int
    end: int
    kind: PiiType


def _emails(text: str) -> Iterable[Found]:
    return (Found(m.start(), m.end(), "email") for m in EMAIL.finditer(text))


def _urls(text: str) -> Iterable[Found]:
    for match in URL.finditer(text):
        parts = urlsplit(match.group())
        names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
        fragment = [name for name, _ in parse_qsl(parts.fragment, keep_blank_values=True)]
        if parts.password or any(SECRET_PARAMS.search(name) for name in names + fragment):
            yield Found(match.start(), match.end(), "url")


def _ibans(text: str) -> Iterable[Found]:
    return (Found(m.start(), m.end(), "iban") for m in IBAN.finditer(text) if iban.is_valid(m.group()))


def _cards(text: str) -> Iterable[Found]:
    for match in CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and CARD_PREFIXES.match(digits) and luhn.is_valid(digits):
            yield Found(match.start(), match.end(), "card")


# The first two digits of a resident ID: its province (stdnum's own check also wants the district in its table,
# which misses districts created since, and personal data must not slip through for that).
CN_PROVINCES = {
    *range(11, 16),
    *range(21, 24),
    *range(31, 38),
    *range(41, 47),
    *range(50, 55),
    *range(61, 66),
    71,
    81,
    82,
}


def is_cn_resident_id(number: str) -> bool:
    """The ISO 7064 check digit, a real birth date and a province code."""
    number = number.upper()
    try:
        ric.get_birth_date(number)
    except ValueError:
        return False
    return number[-1] == ric.calc_check_digit(number) and int(number[:2]) in CN_PROVINCES


def _cn_ids(text: str) -> Iterable[Found]:
    return (Found(m.start(), m.end(), "cn_id") for m in CN_ID.finditer(text) if is_cn_resident_id(m.group()))


def _ips(text: str) -> Iterable[Found]:
    for pattern in (IPV4, IPV6):
        for match in pattern.finditer(text):
            candidate = match.group()
            if pattern is IPV6 and candidate.count(":") < 2:
                continue
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                continue
            yield Found(match.start(), match.end(), "ip")


def _phones(text: str, regions: tuple[str, ...]) -> Iterable[Found]:
    yield from (Found(m.start(), m.end(), "phone") for m in CN_MOBILE.finditer(text))
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            raw = match.raw_string
            if ATTACHED_BEFORE.search(text[: match.start]) or ATTACHED_AFTER.match(text, match.end):
                continue
            written_as_phone = raw.startswith("+") or re.search(r"[ ().-]", raw) is not None
            if written_as_phone or PHONE_WORDS.search(text[: match.start]):
                yield Found(match.start, match.end, "phone")


# Order matters where patterns overlap: a URL holds e-mail-like user-info, an IBAN and a card hold digit runs
# that look like phone numbers; the first type to claim a span keeps it.
FINDERS: dict[PiiType, Callable[[str, tuple[str, ...]], Iterable[Found]]] = {
    "url": lambda text, _: _urls(text),
    "email": lambda text, _: _emails(text),
    "iban": lambda text, _: _ibans(text),
    "cn_id": lambda text, _: _cn_ids(text),
    "card": lambda text, _: _cards(text),
    "ip": lambda text, _: _ips(text),
    "phone": _phones,
}


def find_pii(
    text: str, types: Iterable[PiiType] = PII_TYPES, regions: Iterable[str] = DEFAULT_PHONE_REGIONS
) -> list[Found]:
    """Non-overlapping spans of personal data in `text`, in order."""
    wanted, regions = set(types), tuple(regions)
    claimed: list[Found] = []
    for kind, finder in FINDERS.items():
        if kind not in wanted:
            continue
        for found in finder(text, regions):
            if not any(found.start < other.end and other.start < found.end for other in claimed):
                claimed.append(found)
    return sorted(claimed, key=lambda f: f.start)


def mask_text(text: str, types: Iterable[PiiType] = PII_TYPES, regions: Iterable[str] = DEFAULT_PHONE_REGIONS) -> str:
    """`text` with each piece of personal data replaced by its placeholder ([EMAIL], [PHONE], ...)."""
    pieces, last = [], 0
    for found in find_pii(text, types, regions):
        pieces += [text[last : found.start], PLACEHOLDER[found.kind]]
        last = found.end
    return "".join(pieces) + text[last:]


Masker = Callable[[str], str]


def masker(config: PrivacyConfig) -> Masker | None:
    """A function masking what `config` asks for (None when it asks for nothing, so callers skip the work)."""
    types, regions = tuple(config.mask), tuple(config.phone_regions)
    if not types:
        return None
    return lambda text: mask_text(text, types, regions)
