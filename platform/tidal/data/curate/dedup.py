"""Near-duplicate detection with MinHash + LSH, and the union-find that turns candidate
pairs into clusters.

Shingles are word n-grams of the normalized, case-folded text. Each shingle is hashed to 32
bits (crc32 of its words, combined), and the signature is the minimum over shingles of
``num_perm`` universal hashes ``(a*x + b) mod (2^61 - 1)``. Documents whose signatures agree
on all rows of at least one of ``bands`` bands become candidates; a candidate pair is kept
when the estimated Jaccard similarity (share of equal signature entries) reaches the
threshold. Everything is seeded, so the result is deterministic.
"""
from __future__ import annotations

import re
import zlib
from typing import Dict, Iterable, List, Tuple

import numpy as np

from tidal.config.schema import DedupConfig

MERSENNE = np.uint64((1 << 61) - 1)
MAX32 = np.uint64(0xFFFFFFFF)
_TOKEN = re.compile(r"\w+", re.UNICODE)


def permutations(cfg: DedupConfig) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    a = rng.integers(1, 1 << 32, size=cfg.num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, size=cfg.num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """32-bit hashes of the word n-grams of ``text`` (one shingle for shorter texts)."""
    words = _TOKEN.findall(text.casefold())
    if not words:
        return np.zeros(1, dtype=np.uint64)
    h = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    if len(words) < n:
        n = len(words)
    acc = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for k in range(n):  # polynomial combination of the n word hashes, mod 2^64
        acc = acc * np.uint64(1_000_003) + h[k:len(words) - n + 1 + k]
    return np.unique((acc ^ (acc >> np.uint64(32))) & MAX32)


def signature(text: str, cfg: DedupConfig, perms: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    a, b = perms
    x = shingle_hashes(text, cfg.shingle_words)[:, None]
    return (((x * a[None, :] + b[None, :]) % MERSENNE) & MAX32).min(axis=0).astype(np.uint32)


def band_keys(sig: np.ndarray, cfg: DedupConfig) -> List[int]:
    """One 63-bit key per band: the band index and a hash of the band's rows."""
    keys = []
    for i in range(cfg.bands):
        rows = sig[i * cfg.rows:(i + 1) * cfg.rows].tobytes()
        keys.append((i << 56) | (zlib.crc32(rows) << 24) | (zlib.adler32(rows) & 0xFFFFFF))
    return keys


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return float(np.mean(a == b))


class UnionFind:
    def __init__(self) -> None:
        self.parent: Dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(x, x) != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller id (earlier in input order) represents the cluster
            self.parent[max(ra, rb)] = min(ra, rb)


def clusters(pairs: Iterable[Tuple[int, int]]) -> Dict[int, int]:
    """Connected components of the duplicate graph: ``{doc_id: representative}`` for every
    document that has at least one duplicate (the representative is the smallest id)."""
    uf = UnionFind()
    for a, b in pairs:
        uf.union(a, b)
    members = set(uf.parent) | set(uf.parent.values())
    return {x: uf.find(x) for x in members}
