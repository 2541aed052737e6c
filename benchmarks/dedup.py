"""MinHash near-dedup: tidal against datasketch's MinHashLSH (the reference implementation),
same parameters, same labelled set, same machine, side by side.

The labelled set is built from tinyshakespeare (exact copies, 3 % of words edited,
paragraphs reordered, boilerplate added, and unique passages). Rows:
  - datasketch: MinHash (sha1 per shingle) + MinHashLSH(threshold, num_perm), in process;
  - tidal functions, one process: the stage's own functions called directly (compute only);
  - tidal dedup stage: what `jobs/prepare.py` runs — signatures in a Ray Data map, then (below
    dedup.distributed_min_docs documents) the bucketing in the driver process;
  - tidal, forced distributed: the same with the group-bys as Ray Data hash shuffles, as on
    a large corpus; on a corpus this small Ray Data's per-stage scheduling dominates.

    pip install datasketch   # for the benchmark only
    python benchmarks/dedup.py [--originals 900]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))
import _hydra  # noqa: E402,F401

from tidal.config.schema import CurationConfig, DedupConfig, FilterConfig, PIIConfig  # noqa: E402
from tidal.data.curate import evalset  # noqa: E402
from tidal.data.curate.normalize import normalize  # noqa: E402

DATA = os.environ.get("TIDAL_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


def shared_text() -> str:
    """The three shared data sets as one stream of lines: Shakespeare, then the Alpaca
    records, then the HH-RLHF dialogues (chosen side), for passages that differ in kind."""
    import gzip
    import json

    with open(os.path.join(DATA, "tinyshakespeare", "input.txt")) as f:
        parts = [f.read()]
    with open(os.path.join(DATA, "alpaca", "alpaca_5000.json")) as f:
        parts += ["\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x)
                  for r in json.load(f)]
    with gzip.open(os.path.join(DATA, "hh-rlhf", "harmless-base-pairs.jsonl.gz"), "rt") as f:
        parts += [json.loads(line)["chosen"].strip() for line in f]
    return "\n".join(parts)


def shingles(text: str, n: int) -> set:
    words = re.findall(r"\w+", text.casefold())
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def run_datasketch(docs, cfg: DedupConfig):
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    dropped = {}
    for i, d in enumerate(docs):  # insert in order; a document with an earlier match is a copy
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch([s.encode() for s in shingles(normalize(d), cfg.shingle_words)])
        hits = lsh.query(m)
        if hits:
            dropped[i] = min(hits)
        lsh.insert(i, m)
    return dropped


def run_core(docs, cfg: DedupConfig):
    """The functions the stage runs (signatures, band keys, vectorized bucketing,
    verification, union-find), called directly in this process: the compute cost alone."""
    import numpy as np

    from tidal.data.curate import dedup as D
    from tidal.data.curate.pipeline import _band_rows, _bucket_partition

    perms = D.permutations(cfg)
    sigs = np.stack([D.signature(normalize(d), cfg, perms) for d in docs])
    bands = _band_rows({"doc_id": np.arange(len(docs)), "sig": sigs}, cfg, 1)
    pairs = _bucket_partition(bands)
    cands = sorted(set(zip(pairs["a"].tolist(), pairs["b"].tolist())))
    verified = [(a, b) for a, b in cands if D.similarity(sigs[a], sigs[b]) >= cfg.threshold]
    return {d: r for d, r in D.clusters(verified).items() if d != r}


def run_ray(docs, cfg: DedupConfig, distributed: bool = False):
    import ray.data

    from tidal.data.curate.pipeline import CURATE_BATCH, curate_batch, find_duplicates

    if distributed:
        cfg = replace(cfg, distributed_min_docs=0)
    cur = CurationConfig(filters=FilterConfig(enabled=False), pii=PIIConfig(enabled=False),
                         dedup=cfg)
    ds = ray.data.from_items([{"doc_id": i, "text": d, "error": ""} for i, d in enumerate(docs)],
                             override_num_blocks=os.cpu_count())
    curated = ds.map_batches(curate_batch, batch_size=CURATE_BATCH, fn_kwargs={"cfg": cur}).materialize()
    dups, _ = find_duplicates(curated, cur)
    return {d: rep for d, (_, rep) in dups.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--originals", type=int, default=10000)
    ap.add_argument("--per-kind", type=int, default=1000)
    ap.add_argument("--words", type=int, default=60, help="words per passage")
    args = ap.parse_args()
    docs, truth = evalset.build(shared_text(), seed=0, n_originals=args.originals,
                                per_kind=args.per_kind, words=args.words)
    cfg = DedupConfig()
    from tidal.train.launch import init_ray

    init_ray()
    # Warm-up: start Ray Data's workers once (a fixed cost per job, paid before any stage).
    run_ray(docs[:200], cfg)
    rows = []
    for name, fn in (("datasketch MinHashLSH", run_datasketch),
                     ("tidal functions, one process", run_core),
                     ("tidal dedup stage", run_ray),
                     ("tidal, forced distributed", lambda d, c: run_ray(d, c, distributed=True))):
        t0 = time.perf_counter()
        dropped = fn(docs, cfg)
        dt = time.perf_counter() - t0
        rows.append((name, len(docs) / dt, evalset.score(dropped, truth)))
    print(f"\n{len(docs)} documents ({len(truth)} copies), shingles={cfg.shingle_words} words, "
          f"num_perm={cfg.num_perm}, threshold={cfg.threshold}, {os.cpu_count()} cores")
    print(f"{'implementation':<28}{'docs/s':>10}{'precision':>11}{'recall':>8}")
    for name, rate, sc in rows:
        print(f"{name:<28}{rate:>10,.0f}{sc['precision']:>11.3f}{sc['recall']:>8.3f}")
    base = rows[0][1]
    print(f"speed vs datasketch: functions {rows[1][1] / base:.2f}x, prepare stage "
          f"{rows[2][1] / base:.2f}x, forced distributed {rows[3][1] / base:.2f}x")


if __name__ == "__main__":
    main()
