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

# Starts only where a run of address characters starts: tried from every character of a long run without "@",
# the search would cost the square of its length.
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A URL ends where the text around it starts again: at white space, quotes or brackets, CJK characters and
# full-width punctuation (a Chinese sentence goes on right after it), and trailing sentence punctuation.
URL = re.compile(r"https?://[^\s<>\"'\u3000-\u9fff\uff00-\uffef]+", re.IGNORECASE)
URL_TRAILING = ".,;:!?)]}'\""
# Query parameters and URL user-info that carry a credential or name a user; a URL with one is masked whole.
SECRET_PARAMS = re.compile(
    r"token|key|secret|password|passwd|pwd|auth|session|sid|sig|signature|code|credential|ticket|"
    r"^(?:u|user|userid|user_id|uid|member|account|acct|customer|email|mail|phone|mobile|event|invite|reset|"
    r"verify|verification|activation|confirm|otp|nonce|hash)$",
    re.IGNORECASE,
)
# A path segment that is somebody's token rather than a page name: a UUID, or a long run of letters and digits
# mixed (an activation or reset link, a signed download).
TOKEN_SEGMENT = re.compile(
    r"^(?:[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}|"
    r"(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{20,})$",
    re.IGNORECASE,
)
# Letters or digits right against a code would make it part of a longer word; CJK characters do not (Chinese
# writes "账号GB82WEST…" with no space), so these look only at ASCII letters and digits.
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?(?![A-Za-z0-9])")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){11,18}\d(?![\d-])")
# Issuer prefixes (Visa, Mastercard, Amex, Diners, JCB, Discover, UnionPay, Maestro): a Luhn-valid number of 13
# digits or more with one is a card wherever it is; any other Luhn-valid number only right after a word for a card.
CARD_PREFIXES = re.compile(r"4|5[0-5]|2[2-7]|3[0478]|35|6|2131|1800")
CARD_WORDS = re.compile(r"(?:card|cc|credit|debit|visa|mastercard|amex|卡号|卡)[^0-9]{0,16}$", re.IGNORECASE)
CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
# A dotted quad ends before a sentence's full stop ("from 203.0.113.5."), not before another number part.
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
# What a dotted number after these is: a version (4.2.1.7, V1.0.2.15), never an address.
VERSION_WORDS = re.compile(r"(?:v|ver\.?|version|release|build|firmware|固件|版本|系统)\s*[:：]?\s*$", re.IGNORECASE)
CN_MOBILE = re.compile(r"(?<![\dA-Za-z])(?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?![\dA-Za-z])")
# "+44 (0)7700 900872": the national trunk prefix written in brackets after the country code, which
# libphonenumber's matcher does not read; parsed without the "(0)".
TRUNK_IN_BRACKETS = re.compile(r"\+\d{1,3}[ -]?\(0\)[ -]?\d(?:[ -]?\d){5,12}(?!\d)")
# A number glued to letters or a code's separators is part of a code (INV-2024-000187), not a phone number.
ATTACHED_BEFORE = re.compile(r"(?:[A-Za-z][-/#]?|[-/#])$")
ATTACHED_AFTER = re.compile(r"[A-Za-z]")
PHONE_WORDS = re.compile(
    r"(?:call|phone|tel|telephone|mobile|cell|whatsapp|fax|desk|reach me|text me|sms|messages? to|answering at|"
    r"registered|电话|手机|联系|致电|打给|短信)[^0-9+]{0,12}$",
    re.IGNORECASE,
)
# libphonenumber's matcher reads every digit group three times (once per region), and its cost grows faster than
# the digits of a text: a 2,000-character "1/1/1/..." took 75 ms. Past this many digits (the most in any labelled
# message of bench/pii.py is 72) a text is a list or a log rather than a message, and its phones are found by
# LONG_NUMBER alone, which errs towards masking: that caps the masking time of any text.
PHONE_RULES_MAX_DIGITS = 96
LONG_NUMBER = re.compile(r"\+?\(?\d(?:[ ()./-]{0,2}\d)*")
LONG_NUMBER_DIGITS = 7  # what LONG_NUMBER takes for a phone: the shortest national numbers in common use
NUMBER_WORDS = re.compile(r"(?:number|号码)[^0-9+]{0,12}$", re.IGNORECASE)
# A label after the number, as signatures and address blocks write them ("082 490 1693-Office").
PHONE_LABEL_AFTER = re.compile(r"[-\s,]*(?:office|fax|mobile|cell|home|work)\b", re.IGNORECASE)
# After these, a dashed or grouped number is an order, parcel, invoice or serial number, unless a word for a
# phone comes closer.
ORDER_WORDS = re.compile(
    r"(?:order|tracking|parcel|invoice|ticket|ref|reference|case|booking|serial|no\.|#|订单|单号|快递|运单|工单|序列)"
    r"[^0-9]{0,16}$",
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
        url = match.group().rstrip(URL_TRAILING)
        parts = urlsplit(url)
        names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
        fragment = [name for name, _ in parse_qsl(parts.fragment, keep_blank_values=True)]
        segments = [segment for segment in parts.path.split("/") if segment]
        if (
            parts.password
            or any(SECRET_PARAMS.search(name) for name in names + fragment)
            or any(TOKEN_SEGMENT.match(segment) for segment in segments)
        ):
            yield Found(match.start(), match.start() + len(url), "url")


def _ibans(text: str) -> Iterable[Found]:
    return (Found(m.start(), m.end(), "iban") for m in IBAN.finditer(text) if iban.is_valid(m.group()))


def _cards(text: str) -> Iterable[Found]:
    for match in CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if not (12 <= len(digits) <= 19 and luhn.is_valid(digits)):
            continue
        issued = len(digits) >= 13 and CARD_PREFIXES.match(digits)
        if issued or CARD_WORDS.search(text[: match.start()]):
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
    """A real birth date and a province code. The ISO 7064 check digit is not required: an ID with one digit
    mistyped is still somebody's, and the date and province already set it apart from order numbers."""
    number = number.upper()
    try:
        ric.get_birth_date(number)
    except ValueError:
        return False
    return int(number[:2]) in CN_PROVINCES


def _cn_ids(text: str) -> Iterable[Found]:
    return (Found(m.start(), m.end(), "cn_id") for m in CN_ID.finditer(text) if is_cn_resident_id(m.group()))


def _ips(text: str) -> Iterable[Found]:
    for pattern in (IPV4, IPV6):
        for match in pattern.finditer(text):
            candidate = match.group()
            if pattern is IPV6 and candidate.count(":") < 2:
                continue
            if pattern is IPV4 and VERSION_WORDS.search(text[: match.start()]):
                continue
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                continue
            yield Found(match.start(), match.end(), "ip")


def _trunk_prefixed(text: str) -> Iterable[Found]:
    for match in TRUNK_IN_BRACKETS.finditer(text):
        try:
            number = phonenumbers.parse(match.group().replace("(0)", " "), None)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_possible_number(number):
            yield Found(match.start(), match.end(), "phone")


def _long_numbers(text: str) -> Iterable[Found]:
    for match in LONG_NUMBER.finditer(text):
        if sum(c.isdigit() for c in match.group()) >= LONG_NUMBER_DIGITS:
            yield Found(match.start(), match.end(), "phone")


def _phones(text: str, regions: tuple[str, ...]) -> Iterable[Found]:
    yield from (Found(m.start(), m.end(), "phone") for m in CN_MOBILE.finditer(text))
    yield from _trunk_prefixed(text)
    if sum(c.isdigit() for c in text) > PHONE_RULES_MAX_DIGITS:
        yield from _long_numbers(text)
        return
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE):
            raw, before = match.raw_string, text[: match.start]
            if ATTACHED_BEFORE.search(before) or ATTACHED_AFTER.match(text, match.end):
                continue
            named = PHONE_WORDS.search(before) is not None
            if ORDER_WORDS.search(before) and not named:
                continue
            labelled = named or NUMBER_WORDS.search(before) or PHONE_LABEL_AFTER.match(text, match.end)
            written_as_phone = raw.startswith("+") or re.search(r"[ ().-]", raw) is not None
            # A + or a word for a phone says what it is (for a number of 7 digits or more: "call a taxi to 124 67
            # Devon Street" names a street number); otherwise the number must be a real one of the region, written
            # the way phone numbers are.
            long_enough = sum(c.isdigit() for c in raw) >= 7
            if (
                (raw.startswith("+") or labelled)
                and long_enough
                or (written_as_phone and phonenumbers.is_valid_number(match.number))
            ):
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


# Cleaning decodes one level of HTML entities each time it runs. Past this many levels a text was built to outlast
# the check below, and what is kept of it loses its "&" so that nothing in it decodes any further.
MAX_CLEANINGS = 8


def masked_for_keeping(text: str, mask: Masker, clean: Masker) -> str:
    """`text` cleaned and masked so that no later cleaning turns what is kept back into personal data.

    Every reader of a kept text cleans it again (the review queue, exports, retraining, the training recipe), and
    each cleaning decodes one more level of entities: `alice&amp;#64;example.com` passes the masker once cleaned and
    reads `alice@example.com` the next time. So each further cleaning is looked at, and the first that would reveal
    personal data is kept instead, masked; a text that reveals nothing is kept as cleaned once. `clean` is
    data.clean_text, passed in because privacy sits beside the data package, not above it."""
    kept = probe = mask(clean(text))
    for _ in range(MAX_CLEANINGS):
        cleaned = clean(probe)
        if cleaned == probe:
            return kept
        probe = mask(cleaned)
        if probe != cleaned:
            kept = probe
    return kept.replace("&", " ")


def masker(config: PrivacyConfig) -> Masker | None:
    """A function masking what `config` asks for (None when it asks for nothing, so callers skip the work)."""
    types, regions = tuple(config.mask), tuple(config.phone_regions)
    if not types:
        return None
    return lambda text: mask_text(text, types, regions)
