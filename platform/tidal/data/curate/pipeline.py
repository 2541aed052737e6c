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
from tidal.data.progress import report as report_progress


# Documents per curation task: the per-document work is Python, so a batch of a few hundred
# amortizes Ray Data's per-batch cost (64 made the stage ~2x slower end to end).
CURATE_BATCH = 256


def curate_batch(batch: Dict[str, np.ndarray], cfg: CurationConfig,
                 min_chars: int = 1, meter=None) -> Dict[str, np.ndarray]:
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
    report_progress(meter, "curate", n)
    return out


def _runs(keys: np.ndarray, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For rows sorted by (key, id): each row's id paired with the first id of its key's run
    (a star per group connects it; rows that start a run are left out)."""
    if len(keys) == 0:
        return ids[:0], ids[:0]
    start = np.r_[True, keys[1:] != keys[:-1]]
    first = ids[np.maximum.accumulate(np.where(start, np.arange(len(ids)), 0))]
    return ids[~start], first[~start]


def _exact_partition(group: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """One hash partition of (exact key, doc id) rows -> (duplicate, representative)."""
    keys = group["exact"].astype(str)
    order = np.lexsort((group["doc_id"], keys))
    dup, rep = _runs(keys[order], group["doc_id"][order])
    return {"doc_id": dup, "rep": rep}


def _band_rows(batch: Dict[str, np.ndarray], cfg, parts: int) -> Dict[str, np.ndarray]:
    keys = np.array([D.band_keys(sig, cfg) for sig in batch["sig"]], dtype=np.int64).reshape(-1)
    ids = np.repeat(batch["doc_id"].astype(np.int64), cfg.bands)
    return {"band": keys, "doc_id": ids, "part": keys % parts}


def _bucket_partition(group: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """One hash partition of (band key, doc id) rows -> candidate pairs within buckets."""
    order = np.lexsort((group["doc_id"], group["band"]))
    b, a = _runs(group["band"][order], group["doc_id"][order])
    return {"a": a, "b": b}


def _partitions() -> int:
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 2)))


class _Local:
    """A small data set held as numpy columns in the driver, with the two Ray Data methods
    the dedup stage uses: the same partition functions then run in this process."""

    def __init__(self, ds):
        batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        self.cols = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def select_columns(self, names):
        out = _Local.__new__(_Local)
        out.cols = {k: self.cols[k] for k in names}
        return out

    def map_batches(self, fn, fn_kwargs=None):
        out = _Local.__new__(_Local)
        out.cols = fn(self.cols, **(fn_kwargs or {}))
        return out

    def iter_batches(self):
        return iter([self.cols])


def _grouped(ds, fn, parts: int) -> List[Dict[str, np.ndarray]]:
    """``fn`` over each hash partition (column ``part``) of ``ds``: a Ray Data group-by, or
    one call over all rows of a ``_Local`` set."""
    if isinstance(ds, _Local):
        return [fn(ds.cols)]
    grouped = ds.groupby("part", num_partitions=parts).map_groups(fn, batch_format="numpy")
    return list(grouped.iter_batches(batch_size=None, batch_format="numpy"))


def _exact_dups(kept, parts: int) -> Dict[int, Tuple[str, int]]:
    keyed = kept.select_columns(["doc_id", "exact"]).map_batches(
        lambda b: dict(b, part=np.array([int(k[:8], 16) % parts for k in b["exact"]], dtype=np.int64)))
    out = {}
    for r in _grouped(keyed, _exact_partition, parts):
        out.update({int(d): ("exact", int(rep)) for d, rep in zip(r["doc_id"], r["rep"])})
    return out


def _near_dups(unique, cfg: CurationConfig, parts: int) -> Tuple[Dict[int, Tuple[str, int]], int]:
    bands = unique.select_columns(["doc_id", "sig"]).map_batches(
        _band_rows, fn_kwargs={"cfg": cfg.dedup, "parts": parts})
    candidates = sorted({(int(a), int(b)) for r in _grouped(bands, _bucket_partition, parts)
                         for a, b in zip(r["a"], r["b"])})
    if not candidates:
        return {}, 0
    involved = np.array(sorted({i for p in candidates for i in p}), dtype=np.int64)
    sigs = {}
    for batch in unique.select_columns(["doc_id", "sig"]).map_batches(
            lambda b: {k: v[np.isin(b["doc_id"], involved)] for k, v in b.items()}).iter_batches():
        sigs.update(zip(batch["doc_id"].tolist(), batch["sig"]))
    verified = [(a, b) for a, b in candidates if D.similarity(sigs[a], sigs[b]) >= cfg.dedup.threshold]
    reps = D.clusters(verified)
    return {d: ("near", r) for d, r in reps.items() if d != r}, len(candidates)


def _undropped(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    keep = batch["drop"] == ""
    return {k: v[keep] for k, v in batch.items()}


def find_duplicates(curated, cfg: CurationConfig) -> Tuple[Dict[int, Tuple[str, int]], Dict]:
    """``({doc_id: (kind, representative)}, stats)`` for every document to drop as a
    duplicate; the representative (the earliest document of its cluster) is kept. Exact
    keys and LSH band keys are hash-partitioned across the cluster (one group per
    partition, handled with vectorized sorts); only candidate pairs come to the driver.
    Below ``dedup.distributed_min_docs`` the same partition functions run in the driver."""
    kept = curated.map_batches(_undropped, batch_format="numpy").materialize()
    dropped: Dict[int, Tuple[str, int]] = {}
    stats = {"exact_removed": 0, "exact_clusters": 0, "near_removed": 0, "near_clusters": 0,
             "near_candidate_pairs": 0}
    if kept.count() == 0:  # nothing to compare (and a group-by over no rows has no schema)
        return dropped, stats
    parts = _partitions()
    if kept.count() < cfg.dedup.distributed_min_docs:
        kept = _Local(kept.select_columns(["doc_id", "exact", "sig"]))
    if cfg.dedup.exact:
        dropped = _exact_dups(kept, parts)
        stats["exact_removed"] = len(dropped)
        stats["exact_clusters"] = len({rep for _, rep in dropped.values()})
    if cfg.dedup.near:
        exact_ids = np.array(sorted(dropped), dtype=np.int64)
        unique = kept.map_batches(lambda b: {k: v[~np.isin(b["doc_id"], exact_ids)] for k, v in b.items()}) \
            if len(exact_ids) else kept
        near, stats["near_candidate_pairs"] = _near_dups(unique, cfg, parts)
        dropped.update(near)
        stats["near_removed"] = len(near)
        stats["near_clusters"] = len({rep for _, rep in near.values()})
    return dropped, stats
