"""PII scrubbing: emails, phone numbers, card-like numbers and IP addresses.

Patterns are deliberately narrow, because a false positive silently rewrites training data (an
order number masked as <PHONE> teaches the model to drop order numbers):

* email: local@domain.tld with a 2+ letter TLD ("user@localhost" is not matched).
* phone: a leading "+" and 8-15 digits (E.164), a NANP number written in groups 3-3-4
  ("(555) 123-4567", "555.123.4567"), or a national number with a trunk 0 written in groups with
  9-12 digits ("020 7946 0958", "07700 900123", "01 23 45 67 89"). A bare run of digits is never a
  phone: it cannot be told from an order or ticket number.
* card: 13-19 digits, contiguous or in the groups cards are printed in (4-4-4-4[-3], Amex 4-6-5),
  that pass the Luhn check; ~90% of other long numbers fail it. A Luhn-valid 13-19 digit id is
  masked as a card on purpose: the safe side.
* ip: IPv4 dotted quads (0-255, no leading zeros, not part of a longer dotted number, and not
  right after "v"/"version"/"build"/"release", so 4-part version numbers survive) and IPv6 addresses
  (validated by the standard library, at least two non-empty groups, so "std::vector" and times
  such as 10:30:00 are left alone).

Types are applied in the order email, ip, card, phone, each on the text the previous one masked,
so one span is counted once, under the first type that claims it.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import NamedTuple

PII_TYPES = ("email", "ip", "card", "phone")
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "card": "<CARD>", "ip": "<IP>"}

EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]*[A-Za-z0-9_%+-])?@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
IPV6_CANDIDATE = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?![\w:])")
VERSION_CUE = re.compile(r"(?:\bversion|\bver\.?|\bbuild|\brelease|\bfirmware)\s*$", re.IGNORECASE)
CARD = re.compile(
    r"(?<![\w+.,-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?"
    r"|\d{4}([ -])\d{6}\2\d{4,5})(?![\w]|[.,-]\d)"
)
_END = r"(?![\w]|[.-]\d)"
PHONE_INTL = re.compile(rf"(?<![\w+])\+\d{{1,3}}(?:[ .-]?\(\d{{1,4}}\)|[ .-]?\d{{1,5}}){{1,6}}{_END}")
PHONE_NANP = re.compile(rf"(?<![\w+(])(?:\(\d{{3}}\) ?\d{{3}}[ .-]|\d{{3}}([ .-])\d{{3}}\1)\d{{4}}{_END}")
PHONE_TRUNK = re.compile(rf"(?<![\w+(])(?:\(0\d{{1,4}}\) ?|0\d{{1,4}}([ .-]))\d{{2,8}}(?:[ .-]\d{{2,4}}){{0,3}}{_END}")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _ipv4_ok(match: re.Match) -> bool:
    return not VERSION_CUE.search(match.string[max(0, match.start() - 12) : match.start()])


def _ipv6_ok(match: re.Match) -> bool:
    text = match.group(0)
    if sum(1 for group in re.split(r"[:.]", text) if group) < 2:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _card_ok(match: re.Match) -> bool:
    return luhn_ok(_digits(match.group(0)))


def _phone_intl_ok(match: re.Match) -> bool:
    return 8 <= len(_digits(match.group(0))) <= 15


def _phone_trunk_ok(match: re.Match) -> bool:
    return 9 <= len(_digits(match.group(0))) <= 12


class Clues(NamedTuple):
    """Counts that bound what the patterns can match, found with cheap str methods in one pass.

    A rule whose pattern cannot match (no '@' for an email), or whose every match its validator
    would refuse (a card needs 13 digits, the text has 5), is skipped: most text holds no PII, and
    running seven regexes over it was the whole cost of scrubbing. The bounds hold for every rule in
    turn, since the placeholders written by earlier rules add none of these characters.
    """

    at: bool
    plus: bool
    colons: int
    dots: int
    digits: int  # an upper bound on the characters \d can match

    @classmethod
    def of(cls, text: str) -> Clues:
        # \d also matches non-ASCII decimal digits, which str.count would miss: then no bound.
        digits = sum(map(text.count, "0123456789")) if text.isascii() else len(text)
        return cls("@" in text, "+" in text, text.count(":"), text.count("."), digits)


Rule = tuple[re.Pattern, Callable[[re.Match], bool] | None, Callable[[Clues], bool]]
RULES: dict[str, tuple[Rule, ...]] = {
    "email": ((EMAIL, None, lambda c: c.at),),
    "ip": (
        (IPV6_CANDIDATE, _ipv6_ok, lambda c: c.colons >= 2),
        (IPV4, _ipv4_ok, lambda c: c.dots >= 3 and c.digits >= 4),
    ),
    "card": ((CARD, _card_ok, lambda c: c.digits >= 13),),
    "phone": (
        (PHONE_INTL, _phone_intl_ok, lambda c: c.plus and c.digits >= 8),
        (PHONE_NANP, None, lambda c: c.digits >= 10),
        (PHONE_TRUNK, _phone_trunk_ok, lambda c: c.digits >= 9),
    ),
}


class PiiScrubber:
    """Finds and masks the configured PII types; counts what it found, by type."""

    def __init__(self, types: Iterable[str] = PII_TYPES) -> None:
        wanted = set(types)
        unknown = wanted - set(PII_TYPES)
        if unknown:
            raise ValueError(f"unknown PII types {sorted(unknown)}; known: {', '.join(PII_TYPES)}")
        self.types = tuple(t for t in PII_TYPES if t in wanted)
        self._rules = [
            (kind, pattern, valid, possible) for kind in self.types for pattern, valid, possible in RULES[kind]
        ]

    def scrub(self, text: str) -> tuple[str, Counter]:
        """(text with each PII span replaced by its placeholder, occurrences by type)."""
        found: Counter = Counter()
        clues = Clues.of(text)
        for kind, pattern, valid, possible in self._rules:
            if possible(clues):
                text = pattern.sub(self._replacer(kind, valid, found), text)
        return text, found

    @staticmethod
    def _replacer(kind: str, valid, found: Counter):
        placeholder = PLACEHOLDERS[kind]

        def replace(match: re.Match) -> str:
            if valid is not None and not valid(match):
                return match.group(0)
            found[kind] += 1
            return placeholder

        return replace
