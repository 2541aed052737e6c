"""A labelled near-duplicate set built from real text, for measuring dedup quality.

From non-overlapping passages of a corpus it makes exact copies and three kinds of near
copies (a few percent of words replaced, paragraphs reordered, boilerplate added); the rest
stay unique. Copies come after all originals, so a correct dedup keeps the originals.
"""
from __future__ import annotations

import random
from typing import Dict, List, Tuple

BOILERPLATE = ("Share this page with your friends. Subscribe to our newsletter for updates. "
               "Copyright notice: reproduced for study purposes only.")


def passages(text: str, words: int, count: int) -> List[str]:
    """``count`` consecutive, non-overlapping passages of about ``words`` words, cut at lines."""
    out, cur, n = [], [], 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        cur.append(line)
        n += len(line.split())
        if n >= words:
            out.append("\n".join(cur))
            cur, n = [], 0
            if len(out) == count:
                break
    return out


def _edit_words(text: str, rate: float, rng: random.Random) -> str:
    lines = [line.split(" ") for line in text.split("\n")]
    vocab = ["quill", "harbour", "lantern", "meadow", "crimson", "thimble", "ember", "parish"]
    for words in lines:
        for i in range(len(words)):
            if rng.random() < rate:
                words[i] = rng.choice(vocab)
    return "\n".join(" ".join(w) for w in lines)


def _reorder(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    k = max(2, len(lines) // 4)
    blocks = [lines[i:i + k] for i in range(0, len(lines), k)]
    rng.shuffle(blocks)
    return "\n".join(line for b in blocks for line in b)


def build(text: str, seed: int = 0, n_originals: int = 300, per_kind: int = 40,
          words: int = 200, edit_rate: float = 0.03) -> Tuple[List[str], Dict[int, int]]:
    """``(documents, truth)``: truth maps the index of each copy to its original's index."""
    rng = random.Random(seed)
    originals = passages(text, words, n_originals)
    docs = list(originals)
    truth: Dict[int, int] = {}
    picks = rng.sample(range(len(originals)), 4 * per_kind)
    makers = [lambda t: t, lambda t: _edit_words(t, edit_rate, rng), lambda t: _reorder(t, rng),
              lambda t: t + "\n" + BOILERPLATE]
    for k, make in enumerate(makers):
        for src in picks[k * per_kind:(k + 1) * per_kind]:
            truth[len(docs)] = src
            docs.append(make(originals[src]))
    return docs, truth


def score(dropped: Dict[int, int], truth: Dict[int, int]) -> Dict[str, float]:
    """Precision and recall of ``dropped`` ({index: representative index}) against truth:
    a drop is right when it is a copy whose representative is its original (or a copy of
    the same original)."""
    def origin(i: int) -> int:
        return truth.get(i, i)

    right = sum(1 for d, rep in dropped.items() if d in truth and origin(rep) == truth[d])
    return {"precision": right / len(dropped) if dropped else 1.0,
            "recall": right / len(truth) if truth else 1.0,
            "dropped": len(dropped), "duplicates": len(truth)}
