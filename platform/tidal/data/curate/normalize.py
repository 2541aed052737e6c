"""Text normalization: Unicode NFC, no control characters, tidy whitespace and line endings."""
from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC; CRLF/CR -> LF; control and zero-width characters removed (tabs become four
    spaces); runs of spaces inside a line collapsed, leading indentation kept (code keeps
    its shape); trailing spaces and more than one blank line removed."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text.replace("\t", "    "))
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        lines.append(line[:len(line) - len(body)] + _SPACES.sub(" ", body).rstrip())
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n").rstrip()


def dedup_key(text: str) -> str:
    """The text exact-dedup compares: case-folded with all whitespace runs collapsed."""
    return " ".join(text.casefold().split())
