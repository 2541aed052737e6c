"""The data preparation pipeline: sources -> documents -> tokenize -> pack -> shards + manifest.

Reading and tokenizing run as Ray Data stages (parallel, streaming); packing runs on the
driver over the ordered stream, which keeps the output byte-identical from run to run.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import time
import warnings
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np

from tidal.config.redact import redact
from tidal.config import DataConfig, fingerprint, to_dict
from tidal.data import io as tio
from tidal.data import mixture
from tidal.data.curriculum import SCORERS
from tidal.data.inputs import describe_file
from tidal.data import sources as srcs
from tidal.data import tokenizer as toks
from tidal.data.corpus import embedded_docs, embedded_version
from tidal.data.curate import report as curate_report
from tidal.data.curate.pipeline import CURATE_BATCH, curate_batch, find_duplicates
from tidal.data.pack import ShardWriter
from tidal.data.progress import StageProgress, report as report_progress, summary_line
from tidal.data import DataError

MANIFEST = "manifest.json"
REPORT = "curation_report"
# Documents per tokenizer call: encode_batch spreads a batch over threads, and small batches
# spend more time starting them than encoding (1k docs: ~3x slower than 8k on 2 cores).
TOKENIZE_BATCH = 8192
FORMAT_VERSION = 1


def data_key(cfg: DataConfig) -> str:
    """The part of the data config that determines the shards' content."""
    d = to_dict(cfg)
    d.pop("output_dir")
    if d["mixture"]:  # the mixture's own sources and reading options are what count
        for unused in ("sources", "format", "text_field", "text_unit"):
            d.pop(unused)
    return fingerprint(d, 10)


def default_output_dir(cfg: DataConfig, root: str) -> str:
    return cfg.output_dir or tio.join(root, "data", f"{cfg.name}-{data_key(cfg)}")


def is_val(text: str, fraction: float, seed: int) -> bool:
    """Document-level split by content hash: duplicates land on the same side."""
    h = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "little") / 2**64 < fraction


@lru_cache(maxsize=4)
def _cached_tokenizer(path: str, digest: str):
    """The Rust tokenizer, loaded once per worker process (keyed by content, so a re-trained
    one is reloaded) straight from ``tokenizer.json``: no transformers import in workers."""
    from tokenizers import Tokenizer

    local = tio.local_dir(path)
    if os.path.exists(os.path.join(local, "tokenizer.json")):
        return Tokenizer.from_file(os.path.join(local, "tokenizer.json"))
    return toks.load(local).backend_tokenizer  # a slow-only tokenizer converted by transformers


def tokenize_batch(batch, tok_path: str, tok_hash: str, fraction: float, seed: int, meter=None):
    """Ray Data ``map_batches`` body (pyarrow in and out): token ids as a ``list<int32>``
    column (one flat buffer, no per-document Python objects), the split flag and the size
    in bytes of each document."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tok = _cached_tokenizer(tok_path, tok_hash)
    column = batch.column("text")
    texts = column.to_pylist()
    extra = {"mix": batch.column("mix")} if "mix" in batch.column_names else {}
    enc = tok.encode_batch(texts, add_special_tokens=False) if texts else []
    lengths = np.fromiter((len(e) for e in enc), dtype=np.int32, count=len(enc))
    flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in enc), dtype=np.int32,
                       count=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    report_progress(meter, "tokenize", len(texts), len(flat))
    return pa.table({
        "ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        "val": pa.array([is_val(t, fraction, seed) for t in texts], type=pa.bool_()),
        "nbytes": pc.cast(pc.binary_length(column), pa.int64()), **extra})


def _code_version() -> Dict:
    """What produced the shards: tidal's version and commit, and the libraries that shape them."""
    import tidal
    from tidal.tracking.run_card import git_commit, package_versions

    return {"tidal": tidal.__version__, "commit": git_commit(os.path.dirname(tidal.__file__)),
            "packages": package_versions(("tokenizers", "pyarrow", "ray", "numpy"))}


def _hash_inputs(inputs: List, groups: List) -> List[Dict]:
    """Each input's manifest entry: what it was (hash, size, time; an embedded corpus's
    Python version), so that ``inputs.changed_inputs`` can tell when shards are stale."""
    out = []
    for uri, g in inputs:
        if uri.startswith("embedded:"):
            docs = embedded_docs(uri.split(":", 1)[1])
            h = hashlib.sha256()
            size = 0
            for sid, text in docs:
                b = text.encode()
                h.update(sid.encode() + b"\0" + b)
                size += len(b)
            out.append({"uri": uri, "source": groups[g].name, "sha256": h.hexdigest(),
                        "bytes": size, "version": embedded_version()})
        else:
            out.append({"uri": uri, "source": groups[g].name, **describe_file(uri)})
    return out


def _tokenizer_dir(cfg: DataConfig, out_dir: str, docs, log) -> str:
    """The tokenizer to use: the configured one, or a BPE trained now into ``out_dir``."""
    if cfg.tokenizer.path:
        return os.path.abspath(os.path.expanduser(cfg.tokenizer.path))
    dest = tio.join(out_dir, "tokenizer")
    log(f"training byte-level BPE tokenizer (vocab {cfg.tokenizer.vocab_size}) -> {dest}")
    texts = (r["text"] for r in docs.iter_rows()
             if not r["error"] and not is_val(r["text"], cfg.val_fraction, cfg.seed))
    if not tio.is_cloud(out_dir):
        toks.train_bpe(texts, cfg.tokenizer, dest)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            toks.train_bpe(texts, cfg.tokenizer, tmp)
            tio.upload_dir(tmp, dest)
    return dest


def prepare(cfg: DataConfig, out_dir: str, log=print, show_progress: bool = True) -> Dict:
    """Run the pipeline and write shards plus ``manifest.json`` into ``out_dir``; a live
    display shows records and tokens per second for each stage."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # our own bar below; Ray Data's logs are per operator
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'")
    t0 = time.time()
    inputs = srcs.list_inputs(cfg)
    if not tio.is_cloud(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    # The manifest is written last: without it, a half-written directory is never used.
    tio.remove(tio.join(out_dir, MANIFEST))
    stages = StageProgress([("curate", "curate"), ("dedup", "dedup"), ("tokenize", "tokenize"),
                            ("pack", "pack")], show=show_progress)
    with stages:
        manifest, report = _run(cfg, inputs, out_dir, log, stages)
    report["stages"] = stages.counts()  # timings: in the report, not the (deterministic) manifest
    tio.write_bytes(tio.join(out_dir, REPORT + ".json"), json.dumps(report, indent=2).encode())
    tio.write_bytes(tio.join(out_dir, REPORT + ".md"), curate_report.markdown(report).encode())
    tio.write_bytes(tio.join(out_dir, MANIFEST), json.dumps(manifest, indent=2).encode())
    log(summary_line(report["stages"]))
    stats = manifest["counts"]
    log(f"prepared {stats['documents']} documents -> {stats['train']['samples']} train / "
        f"{stats['val']['samples']} val samples of {cfg.seq_len + 1} tokens in {time.time() - t0:.1f}s "
        f"-> {out_dir}")
    return manifest


def _run(cfg: DataConfig, inputs, out_dir: str, log, stages: StageProgress) -> Tuple[Dict, Dict]:
    # recorded before reading: a file changed while it is read shows a newer time later
    recorded = _hash_inputs(inputs, srcs.source_groups(cfg))
    kept, report = _curate(cfg, srcs.documents(cfg, inputs), inputs, out_dir, log, stages)
    tok_dir = _tokenizer_dir(cfg, out_dir, kept, log)
    tok_hash = toks.tokenizer_hash(tio.local_dir(tok_dir))
    tok = toks.load(tio.local_dir(tok_dir))
    vocab = len(tok)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max else np.uint32
    writers = {s: ShardWriter(out_dir, s, cfg.seq_len, cfg.shard_samples, dtype)
               for s in ("train", "val")}
    stages.start("tokenize")
    tokenized = kept.select_columns(["text", "mix"]).map_batches(
        tokenize_batch, batch_size=TOKENIZE_BATCH, batch_format="pyarrow", fn_kwargs={
            "tok_path": tok_dir, "tok_hash": tok_hash, "fraction": cfg.val_fraction, "seed": cfg.seed,
            "meter": stages.meter})
    counts, mix_summary = None, None
    if cfg.mixture:  # two passes: lengths per source first, then the weighted stream
        tokenized = tokenized.materialize()
        stages.done("tokenize")
        counts, mix_summary = _mixture_plan(cfg, tokenized)
    scorer = SCORERS.get_or_raise(cfg.curriculum.score) if cfg.curriculum.score else None
    n_docs, n_tokens = _pack(tokenized, counts, scorer, writers, tok.eos_token_id, report, stages)
    train, val = writers["train"], writers["val"]
    if not val.shards and len(val.pending_samples()) == 0 and len(train.pending_samples()) >= 2:
        move = max(1, round(cfg.val_fraction * len(train.pending_samples())))
        val.add_samples(train.take_pending(move))
    stats = {"train": train.close(), "val": val.close()}
    curriculum = None
    if scorer is not None:  # one difficulty per training sample, in shard order
        digest = tio.save_npy(tio.join(out_dir, "train_scores.npy"), np.asarray(train.scores, np.float32))
        curriculum = {"score": cfg.curriculum.score, "epochs": cfg.curriculum.epochs,
                      "file": "train_scores.npy", "sha256": digest}
    if stats["train"]["samples"] == 0:
        raise DataError(f"data '{cfg.name}': too little text for seq_len={cfg.seq_len}: "
                         f"{stats['train']['samples']} train / {stats['val']['samples']} val samples")
    if stats["val"]["samples"] == 0:  # recorded as shards.val == []: training skips evaluation
        log(f"data '{cfg.name}': too little text for a validation split "
            f"({stats['train']['samples']} train samples); training will run without evaluation")
    manifest = _manifest(cfg, recorded, report, stats, n_docs, mix_summary, curriculum,
                         {"path": _relative(tok_dir, out_dir), "sha256": tok_hash, "vocab_size": vocab,
                          "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}, dtype)
    report.update(tokens_out=stats["train"]["tokens"] + stats["val"]["tokens"],
                  samples_out=stats["train"]["samples"] + stats["val"]["samples"])
    return manifest, report


def _pack(tokenized, counts, scorer, writers, eos: int, report: Dict, stages: StageProgress) -> Tuple[int, int]:
    """Write the tokenized documents into the train/val shard writers; returns the number of
    documents and tokens read."""
    # An upsampled mixture repeats documents in whole passes over the data (pass r writes
    # the documents used more than r times), never back to back in one context.
    passes = 1 if counts is None else max(1, int(counts.max()))
    n_docs = n_tokens = 0
    stages.total("tokenize", report["documents_kept"])
    stages.total("pack", report["documents_kept"] if counts is None else int(counts.sum()))
    stages.start("pack")
    for r in range(passes):
        j = 0
        for batch in tokenized.iter_batches(batch_size=None, batch_format="pyarrow"):
            ids = batch.column("ids").combine_chunks()
            flat, offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
            written = written_tokens = 0
            for k, (val, nbytes) in enumerate(zip(batch.column("val").to_pylist(),
                                                  batch.column("nbytes").to_pylist())):
                if counts is None or counts[j] > r:
                    doc = flat[offsets[k]:offsets[k + 1]]
                    score = scorer(doc, nbytes) if scorer is not None else 0.0
                    writers["val" if val else "train"].add(doc, eos, nbytes, score)
                    written += 1
                    written_tokens += len(doc)
                j += 1
            stages.add("pack", written, written_tokens)
            n_tokens += len(flat) if r == 0 else 0
        n_docs = n_docs or j
        stages.done("tokenize")
        stages.set("tokenize", n_docs, n_tokens)
    stages.done("pack")
    return n_docs, n_tokens


def _manifest(cfg: DataConfig, recorded, report: Dict, stats: Dict, n_docs: int, mix_summary, curriculum,
              tokenizer: Dict, dtype) -> Dict:
    """The data set's manifest.json: what was read, kept and written, and from which config."""
    return {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "data_key": data_key(cfg),
        "inputs": recorded,
        "tokenizer": tokenizer,
        "seq_len": cfg.seq_len,
        "sample_width": cfg.seq_len + 1,
        "dtype": np.dtype(dtype).name,
        "counts": {"records_read": report["records_in"], "documents": n_docs,
                   "too_short": report["dropped"].get("length", {}).get("too_short", 0),
                   "malformed": report["dropped"].get("read", {}),
                   "malformed_examples": report["malformed_examples"],
                   "train": {k: v for k, v in stats["train"].items() if k != "shards"},
                   "val": {k: v for k, v in stats["val"].items() if k != "shards"}},
        "curation": {k: v for k, v in report.items() if k != "malformed_examples"},
        "mixture": mix_summary,
        "curriculum": curriculum,
        "shards": {"train": stats["train"]["shards"], "val": stats["val"]["shards"]},
        "config": redact(to_dict(cfg)),
        "code": _code_version(),
    }


def _mixture_plan(cfg: DataConfig, tokenized) -> Tuple[np.ndarray, Dict]:
    """Per-document multiplicities that give each named source its share of training tokens."""
    parts = list(tokenized.select_columns(["mix", "val", "ids"]).iter_batches(
        batch_size=None, batch_format="pyarrow"))
    names = np.concatenate([np.asarray(b.column("mix").to_pylist(), dtype=object) for b in parts])
    is_val = np.concatenate([b.column("val").to_numpy(zero_copy_only=False) for b in parts])
    lengths = np.concatenate([pc_lengths(b.column("ids")) for b in parts]) + 1  # + EOS
    weights = {s.name: s.weight for s in cfg.mixture}
    counts = mixture.plan(names, lengths, is_val, weights, cfg.mixture_mode, cfg.seed)
    return counts, mixture.summary(names, lengths, is_val, counts, weights)


def pc_lengths(column) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def _curate(cfg: DataConfig, docs, inputs, out_dir: str, log,
            stages: StageProgress) -> Tuple[object, Dict]:
    """Normalize, filter, scrub and dedup; returns the kept documents and the report."""
    stages.start("curate")
    curated = docs.map_batches(curate_batch, batch_size=CURATE_BATCH, fn_kwargs={
        "cfg": cfg.curation, "min_chars": cfg.min_chars, "meter": stages.meter}).materialize()
    stages.done("curate")
    stages.set("curate", curated.count())
    stages.start("dedup")
    dups, dedup_stats = find_duplicates(curated, cfg.curation)
    stages.add("dedup", curated.count())
    stages.done("dedup")
    side = tio.join(out_dir, "dropped.jsonl") if cfg.curation.write_dropped else None
    report = curate_report.account(curated, dups, dedup_stats, side)
    if report["documents_kept"] == 0:
        tio.write_bytes(tio.join(out_dir, REPORT + ".json"), json.dumps(report, indent=2).encode())
        raise DataError(f"data '{cfg.name}': curation kept none of {report['records_in']:,} records "
                         f"(dropped: {json.dumps(report['dropped'])}); by input:\n"
                         + _why_dropped(curated, inputs) + f"\nsee {tio.join(out_dir, REPORT + '.json')};"
                         " fix or remove these inputs, or relax data.curation")
    dup_ids = set(dups)
    kept = curated.filter(lambda r: not r["drop"] and int(r["doc_id"]) not in dup_ids)
    log(f"curated {report['records_in']:,} records: kept {report['documents_kept']:,}, dropped "
        + (", ".join(f"{s} {sum(r.values()):,}" for s, r in report["dropped"].items()) or "none"))
    return kept.drop_columns(["sig"]).materialize(), report


def _why_dropped(curated, inputs, limit: int = 20) -> str:
    """Each input and the reasons its records were dropped (the reader's full error for a
    file that could not be read): for the error when nothing is left, so it runs only then."""
    per_input: Dict[int, Dict[str, int]] = {}
    for row in curated.select_columns(["doc_id", "error", "drop"]).iter_rows():
        reason = row["error"] or row["drop"]
        tally = per_input.setdefault(int(row["doc_id"]) >> 32, {})  # doc_id: input << 32 | unit
        tally[reason] = tally.get(reason, 0) + 1
    lines = [f"  {inputs[i][0]}: {srcs.reasons_text(dict(sorted(t.items())))}"
             for i, t in sorted(per_input.items())]
    more = [f"  ... and {len(lines) - limit} more input(s)"] if len(lines) > limit else []
    return "\n".join(lines[:limit] + more)


def _relative(path: str, root: str) -> str:
    """Paths inside the data directory are stored relative to it (the manifest moves with it)."""
    if tio.is_cloud(root):
        return path[len(root):].lstrip("/") if path.startswith(root.rstrip("/") + "/") else path
    if os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
        return os.path.relpath(path, root)
    return path


def tokenizer_path(manifest: Dict, data_dir: str) -> str:
    """A local directory with the data set's tokenizer (downloaded if the data is remote)."""
    path = manifest["tokenizer"]["path"]
    if not (os.path.isabs(path) or tio.is_cloud(path)):
        path = tio.join(data_dir, path)
    return tio.local_dir(path)


def load_manifest(out_dir: str) -> Optional[Dict]:
    uri = tio.join(out_dir, MANIFEST)
    if not tio.exists(uri):
        return None
    return json.loads(tio.read_bytes(uri))


def manifest_hash(manifest: Dict) -> str:
    """The data's identity (checkpoints record it). Input times are left out: they only
    speed up the staleness check, and a touched file is the same data."""
    inputs = [{k: v for k, v in i.items() if k != "mtime_ns"} for i in manifest.get("inputs", [])]
    ident = dict(manifest, inputs=inputs) if "inputs" in manifest else manifest
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
