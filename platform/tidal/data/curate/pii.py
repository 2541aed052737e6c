"""PII scrubbing: matches are replaced by typed placeholders and counted per type.

Each pattern is followed by a check that removes the classic false positives: card numbers
must pass the Luhn checksum, phone numbers must not be dates or version-like numbers, IPv4
octets must be <= 255, and e-mail domains need a real top-level domain.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Callable, Dict, Iterable, Tuple

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}(?::|[0-9A-Fa-f]{1,4})(?![\w:])|"
                  r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:?){0,6}(?![\w:])")
CARD = re.compile(r"(?<![\d-])(?:\d{4}[ -]){3}\d{1,7}(?![\d-])|(?<![\d-])\d{13,19}(?![\d-])")
PHONE = re.compile(r"(?<![\w+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?![\w-])")
DATE_LIKE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
SECRET = re.compile(
    r"\b(?:AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{40,}|"
    r"sk-[A-Za-z0-9_-]{20,}|xox[abpr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})|"
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----")
THOUSANDS = re.compile(r"^\d{1,3}(?:[ .,]\d{3})+$")
YEARS = re.compile(r"^(?:(?:1[5-9]|20)\d\d[ .-]?)+$")


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(m: str) -> bool:
    digits = re.sub(r"\D", "", m)
    return 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1


def _phone(m: str) -> bool:
    """Not a date, a number with thousands separators, or a run of years."""
    digits = re.sub(r"\D", "", m)
    m = m.strip()
    return 7 <= len(digits) <= 15 and not (DATE_LIKE.match(m) or THOUSANDS.match(m) or YEARS.match(m))


def _ipv4(m: str) -> bool:
    return all(int(o) <= 255 for o in m.split("."))


def _ipv6(m: str) -> bool:
    try:
        ipaddress.IPv6Address(m)
    except ValueError:
        return False
    return m.count(":") >= 2 and any(c.isalpha() for c in m) or m.count(":") >= 4


# Order matters: secrets and e-mails before the number-shaped types.
RULES: Tuple[Tuple[str, re.Pattern, Callable[[str], bool], str], ...] = (
    ("secret", SECRET, lambda m: True, "<SECRET>"),
    ("email", EMAIL, lambda m: True, "<EMAIL>"),
    ("credit_card", CARD, _card, "<CREDIT_CARD>"),
    ("ip", IPV6, _ipv6, "<IP_ADDRESS>"),
    ("ip", IPV4, _ipv4, "<IP_ADDRESS>"),
    ("phone", PHONE, _phone, "<PHONE>"),
)


def scrub(text: str, types: Iterable[str]) -> Tuple[str, Dict[str, int]]:
    """Replace PII of the given types; return the new text and the count per type."""
    wanted = set(types)
    counts: Dict[str, int] = {}
    for kind, pattern, check, placeholder in RULES:
        if kind not in wanted:
            continue

        def repl(m: re.Match, kind=kind, check=check, placeholder=placeholder) -> str:
            if not check(m.group(0)):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return placeholder

        text = pattern.sub(repl, text)
    return text, counts
