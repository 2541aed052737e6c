"""Mixtures: how many times each training document is used so that named sources make up
the configured shares of training tokens.

``plan`` is a pure function of the per-document source, length and split, the weights,
the mode and a seed: the same inputs give the same mixture.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from tidal.data import DataError


def plan(sources: np.ndarray, lengths: np.ndarray, is_val: np.ndarray, weights: Dict[str, float],
         mode: str, seed: int) -> np.ndarray:
    """Multiplicity of each document (validation documents are kept once, as they are).

    downsample: the total is the largest for which every source can supply its share
    without repeats; each source contributes documents in a seeded random order until its
    quota of tokens is reached. upsample: the total is the smallest for which no source
    drops anything; sources below their share repeat (whole passes, then a seeded partial
    pass)."""
    counts = np.where(is_val, 1, 0).astype(np.int64)
    total_w = sum(weights.values())
    share = {k: w / total_w for k, w in weights.items()}
    avail = {k: int(lengths[(sources == k) & ~is_val].sum()) for k in weights}
    if any(v == 0 for v in avail.values()):
        empty = [k for k, v in avail.items() if v == 0]
        raise DataError(f"data.mixture: source(s) {', '.join(empty)} have no training tokens left "
                         "after curation")
    pick = min if mode == "downsample" else max
    total = pick(avail[k] / share[k] for k in weights)
    rng = np.random.Generator(np.random.PCG64(seed))
    for i, name in enumerate(sorted(weights)):
        idx = np.flatnonzero((sources == name) & ~is_val)
        quota = share[name] * total
        if mode == "downsample":  # float rounding must never ask for a repeat
            quota = min(quota, avail[name])
        full, rest = divmod(quota, avail[name])
        counts[idx] += int(full)
        order = rng.permutation(idx)
        cum = np.cumsum(lengths[order])
        # the shortest prefix of the order that reaches the remaining quota
        take = int(np.searchsorted(cum, rest - 1e-9)) + 1 if rest > 1e-9 else 0
        counts[order[:min(take, len(order))]] += 1
    return counts


def summary(sources: np.ndarray, lengths: np.ndarray, is_val: np.ndarray, counts: np.ndarray,
            weights: Dict[str, float]) -> Dict[str, Dict]:
    """Per source: weight, tokens available, tokens used, effective share of training tokens."""
    train = ~is_val
    used_total = int((lengths * counts)[train].sum())
    total_w = sum(weights.values())
    out = {}
    for name in sorted(weights):
        m = (sources == name) & train
        used = int((lengths[m] * counts[m]).sum())
        out[name] = {"weight": weights[name] / total_w, "tokens_available": int(lengths[m].sum()),
                     "tokens_used": used, "effective_share": used / used_total if used_total else 0.0,
                     "documents_used": int(counts[m].sum())}
    return out
