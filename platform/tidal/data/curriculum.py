"""Curriculum: a difficulty score per document, carried to packed samples, and the order
in which the loader serves them (easy to hard for the first epochs).

Scorers live in a small registry: ``@SCORERS.register("name")`` on a function
``(token_ids, text_bytes) -> float`` (higher is harder). A reference-model perplexity is
such a function: load the model once at module level and return its loss on ``token_ids``.
"""
from __future__ import annotations

import numpy as np

from tidal.registry import Registry

SCORERS = Registry("curriculum score")


@SCORERS.register("length")
def length(ids: np.ndarray, text_bytes: int) -> float:
    """Longer documents are harder (more context to use)."""
    return float(len(ids))


@SCORERS.register("bytes_per_token")
def bytes_per_token(ids: np.ndarray, text_bytes: int) -> float:
    """Text the tokenizer compresses well (common words) is easier than text it does not."""
    return -text_bytes / max(len(ids), 1)


def curriculum_order(scores: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Sample indices by ascending score; ties broken by a seeded random key."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 7])))
    return np.lexsort((rng.random(len(scores)), scores))
