"""Quality heuristics in the style of Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020).

``quality_reason(text, cfg)`` returns the name of the first failed check, or "" to keep.
Each threshold lives in ``FilterConfig`` (``conf/data/*.yaml: curation.filters``).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import List

from tidal.config.schema import FilterConfig

STOP_WORDS = frozenset("the be to of and that have with this from they will would there their "
                       "what about which when make can like time just know take people into "
                       "year your some could them see other than then now look only come its "
                       "over think also back after use two how our work first well way even new "
                       "want because any these give most is are was were for on in it as at by "
                       "an or not but if a".split())
BOILERPLATE = re.compile(
    r"lorem ipsum|enable javascript|javascript is (disabled|required)|"
    r"(this (site|website) uses|we use) cookies|accept (all )?cookies|cookie (policy|settings)|"
    r"terms of (use|service)|privacy policy|all rights reserved|click here to|sign up for our newsletter",
    re.IGNORECASE)
_WORD = re.compile(r"\w+", re.UNICODE)
_BULLET = re.compile(r"^\s*([-*•●▪‣◦]|\d+[.)])\s")
_END_PUNCT = (".", "!", "?", '"', "'", "”", "’", ":", ";")
_SCRIPTS = {"latin": lambda c: "LATIN" in _name(c)}


def _name(c: str) -> str:
    import unicodedata

    return unicodedata.name(c, "")


def _repeated_fraction(words: List[str], n: int, top_only: bool) -> float:
    """Share of word characters covered by the most frequent n-gram (``top_only``) or by
    every n-gram occurring more than once (Gopher's repetition measures)."""
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    total = sum(len(w) for w in words)
    if top_only:
        gram, c = counts.most_common(1)[0]
        return (c * sum(len(w) for w in gram)) / total if c > 1 else 0.0
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return sum(len(w) for w, c in zip(words, covered) if c) / total


def quality_reason(text: str, cfg: FilterConfig) -> str:
    words = _WORD.findall(text)
    n = len(words)
    if n == 0 or n < cfg.min_words:
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"
    mean_len = sum(len(w) for w in words) / n
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / n > cfg.max_symbol_word_ratio:
        return "symbol_ratio"
    lines = [l for l in text.split("\n") if l.strip()]
    if lines:
        if sum(1 for l in lines if _BULLET.match(l)) / len(lines) > cfg.max_bullet_line_fraction:
            return "bullet_lines"
        if sum(1 for l in lines if l.rstrip().endswith(("...", "…"))) / len(lines) > cfg.max_ellipsis_line_fraction:
            return "ellipsis_lines"
        if cfg.min_end_punct_line_fraction > 0 and \
                sum(1 for l in lines if l.rstrip().endswith(_END_PUNCT)) / len(lines) < cfg.min_end_punct_line_fraction:
            return "end_punctuation"
        if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > cfg.max_dup_line_fraction:
            return "duplicate_lines"
    lower = [w.lower() for w in words]
    if _repeated_fraction(lower, 2, top_only=True) > cfg.max_top_ngram_fraction:
        return "top_ngram_repetition"
    if _repeated_fraction(lower, 5, top_only=False) > cfg.max_dup_ngram_fraction:
        return "duplicate_ngrams"
    if sum(1 for w in lower if w in STOP_WORDS) < cfg.min_stop_words:
        return "no_stop_words"
    if cfg.boilerplate and BOILERPLATE.search(text):
        return "boilerplate"
    if cfg.min_script_fraction > 0:
        letters = [c for c in text if c.isalpha()]
        in_script = _SCRIPTS[cfg.script]
        if letters and sum(1 for c in letters if in_script(c)) / len(letters) < cfg.min_script_fraction:
            return "script"
    return ""
