"""Curation as Ray Data stages.

``curate_batch`` (a ``map_batches`` operator) normalizes, filters and scrubs each document
and computes its dedup keys; ``find_duplicates`` runs exact and MinHash-LSH near-duplicate
detection as distributed group-bys over those keys, and returns the documents to drop.
Every dropped document carries a ``stage:reason`` so that the curation report accounts for
each one.
"""
from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Tuple

import numpy as np

from tidal.config.schema import CurationConfig
from tidal.data.curate import dedup as D
from tidal.data.curate.filters import quality_reason
from tidal.data.curate.normalize import dedup_key, normalize
from tidal.data.curate.pii import scrub


def curate_batch(batch: Dict[str, np.ndarray], cfg: CurationConfig,
                 min_chars: int = 1) -> Dict[str, np.ndarray]:
    """Per-document stages. Adds ``drop`` ("" to keep), ``pii`` (JSON counts), ``exact``
    (hash of the dedup key) and ``sig`` (MinHash signature, zeros when not needed)."""
    perms = D.permutations(cfg.dedup) if cfg.dedup.near else None
    n = len(batch["text"])
    texts, drops, piis, exact = [], [], [], []
    sigs = np.zeros((n, cfg.dedup.num_perm if cfg.dedup.near else 1), dtype=np.uint32)
    for i, (text, error) in enumerate(zip(batch["text"], batch["error"])):
        text, drop, counts = str(text), "", {}
        if error:
            drop = f"read:{str(error).split(':')[0]}"
        if not drop and cfg.normalize:
            text = normalize(text)
        if not drop and not text.strip():
            drop = "normalize:empty"
        if not drop and len(text) < min_chars:
            drop = "length:too_short"
        if not drop and cfg.filters.enabled:
            reason = quality_reason(text, cfg.filters)
            drop = f"quality:{reason}" if reason else ""
        if not drop and cfg.pii.enabled:
            text, counts = scrub(text, cfg.pii.types)
        if not drop and perms is not None:
            sigs[i] = D.signature(text, cfg.dedup, perms)
        texts.append(text)
        drops.append(drop)
        piis.append(json.dumps(counts, sort_keys=True))
        exact.append(hashlib.blake2b(dedup_key(text).encode(), digest_size=16).hexdigest())
    out = dict(batch)
    out.update(text=np.array(texts, dtype=object), drop=np.array(drops, dtype=object),
               pii=np.array(piis, dtype=object), exact=np.array(exact, dtype=object), sig=sigs)
    return out


def _exact_dups(group: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    ids = np.sort(group["doc_id"])
    return {"doc_id": ids[1:], "rep": np.full(len(ids) - 1, ids[0], dtype=np.int64)}


def _band_rows(row: Dict, cfg) -> List[Dict]:
    return [{"band": k, "doc_id": row["doc_id"]} for k in D.band_keys(row["sig"], cfg)]


def _bucket_pairs(group: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    pairs = D.candidate_pairs(np.unique(group["doc_id"]).tolist())
    return {"a": np.array([p[0] for p in pairs], dtype=np.int64),
            "b": np.array([p[1] for p in pairs], dtype=np.int64)}


def find_duplicates(curated, cfg: CurationConfig) -> Tuple[Dict[int, Tuple[str, int]], Dict]:
    """``({doc_id: (kind, representative)}, stats)`` for every document to drop as a
    duplicate; the representative (the earliest document of its cluster) is kept."""
    kept = curated.filter(lambda r: not r["drop"]).materialize()
    dropped: Dict[int, Tuple[str, int]] = {}
    stats = {"exact_removed": 0, "exact_clusters": 0, "near_removed": 0, "near_clusters": 0,
             "near_candidate_pairs": 0}
    if kept.count() == 0:  # nothing to compare (and a group-by over no rows has no schema)
        return dropped, stats
    if cfg.dedup.exact:
        dups = kept.select_columns(["doc_id", "exact"]).groupby("exact").map_groups(_exact_dups)
        for row in dups.iter_rows():
            dropped[int(row["doc_id"])] = ("exact", int(row["rep"]))
        stats["exact_removed"] = len(dropped)
        stats["exact_clusters"] = len({rep for _, rep in dropped.values()})
    if cfg.dedup.near:
        exact_ids = set(dropped)
        unique = kept.filter(lambda r: int(r["doc_id"]) not in exact_ids) if exact_ids else kept
        pairs = (unique.select_columns(["doc_id", "sig"])
                 .flat_map(_band_rows, fn_kwargs={"cfg": cfg.dedup})
                 .groupby("band").map_groups(_bucket_pairs))
        candidates = {(int(r["a"]), int(r["b"])) for r in pairs.iter_rows()}
        stats["near_candidate_pairs"] = len(candidates)
        involved = {i for p in candidates for i in p}
        sigs = {int(r["doc_id"]): np.asarray(r["sig"]) for r in
                unique.filter(lambda r: int(r["doc_id"]) in involved)
                .select_columns(["doc_id", "sig"]).iter_rows()} if involved else {}
        verified = [(a, b) for a, b in sorted(candidates)
                    if D.similarity(sigs[a], sigs[b]) >= cfg.dedup.threshold]
        reps = D.clusters(verified)
        for doc, rep in reps.items():
            if doc != rep:
                dropped[doc] = ("near", rep)
        stats["near_removed"] = sum(1 for d, r in reps.items() if d != r)
        stats["near_clusters"] = len(set(reps.values()))
    return dropped, stats
