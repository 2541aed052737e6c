"""Instruction data for SFT: read, validate, template, mask, pack, shard.

Each sample is an ``int32 [3, seq_len]`` array: token ids, labels (the ids on assistant
tokens, ``-100`` elsewhere) and position ids. With packing, several conversations share a
row; their position ids restart at 0, from which the model builds a block-diagonal
attention mask (no token attends across examples). The shards plug into the same global
sample-cursor loader as pretraining, so SFT resumes, reshards and resizes the same way.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from tidal.config.redact import redact
from tidal.config import fingerprint, to_dict
from tidal.data import io as tio
from tidal.data.chat import IGNORE, encode_conversation, ensure_chat_template, render
from tidal.data.corpus import embedded_docs
from tidal.data.formats import instruction_example
from tidal.data.inputs import describe_embedded, describe_file
from tidal.data.prepare import is_val
from tidal.data.sources import EMPTY, json_records, read_raw, reasons_text
from tidal.data import DataError, MissingInput

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def pydocs_instructions() -> List[Dict]:
    """Instruction pairs derived from the embedded Python documentation (no download):
    "explain X" -> the documentation's opening paragraphs on X."""
    out = []
    for sid, text in embedded_docs("pydocs"):
        topic = sid.split(":", 1)[1] if ":" in sid else sid
        paras = [p.strip() for p in text.split("\n\n") if len(p.split()) >= 8]
        for k, (ask, take) in enumerate((("Explain {t} in Python.", paras[0:1]),
                                         ("What else does the Python documentation say about {t}?", paras[1:3]))):
            answer = "\n\n".join(take)
            if answer:
                words = answer.split()
                out.append({"instruction": ask.format(t=f"`{topic}`"),
                            "input": "", "output": " ".join(words[:160])})
    return out


def _records(uri: str) -> Iterator[Tuple[int, object, Optional[str]]]:
    """``(unit, record, error)`` for every record of a JSON list or JSONL file (.gz, .zst);
    a file that cannot be used at all is one error: unreadable, empty or binary."""
    raw, problem = read_raw(uri)
    if problem:
        yield 0, None, problem
        return
    found = False
    for unit, rec, error in json_records(raw):
        found = True
        yield unit, rec, error or None
    if not found:
        yield 0, None, EMPTY


def tally(counts: Dict, reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def set_aside(counts: Dict, entry: Dict, reason: str) -> None:
    """Count a record that is not used, by reason, in the totals and in its input's entry."""
    tally(counts["malformed"], reason)
    tally(entry["set_aside"], reason)


def read_examples(cfg, parse: Callable, embedded: Dict[str, Callable[[], List[Dict]]],
                  counts: Dict, inputs: List[Dict]) -> Iterator[Tuple[object, Dict]]:
    """``(example, input entry)`` for every valid example of ``cfg.sources`` (``parse(record)
    -> (example, reason)``), at most ``cfg.limit`` records. Each input is appended to
    ``inputs`` (a file with its SHA-256, size and time; an embedded set with its version),
    with its record count and the records it had set aside by reason; malformed records are
    also counted by reason in ``counts``. The entry lets callers set aside an example later
    (one that cannot be encoded) against the file it came from."""
    for src in cfg.sources:
        uris = [src] if src in embedded else tio.expand(src)
        if not uris:
            raise MissingInput(f"data.sources: nothing matches {src!r}")
        for uri in uris:
            if uri in embedded:
                entry = describe_embedded(uri)
                rows = ((i, r, None) for i, r in enumerate(embedded[uri]()))
            else:
                entry = {"uri": uri, **describe_file(uri)}
                rows = _records(uri)
            entry.update(records=0, set_aside={})
            inputs.append(entry)
            for _, rec, error in rows:
                if cfg.limit is not None and counts["records"] >= cfg.limit:
                    return
                counts["records"] += 1
                entry["records"] += 1
                example, reason = (None, error) if error else parse(rec)
                if example is None:
                    set_aside(counts, entry, reason)
                    continue
                yield example, entry


def no_usable(what: str, cfg, counts: Dict, inputs: List[Dict]) -> ValueError:
    """The error when every record was set aside: the totals, then each input and why."""
    lines = [f"  {e['uri']}: {reasons_text(e['set_aside'])}" for e in inputs if e["set_aside"]]
    return DataError(f"{what} '{cfg.name}': no usable examples in {counts['records']} records from "
                      f"{len(inputs)} input(s); set aside, by input:\n" + "\n".join(lines))


def pack(examples: List[Tuple[List[int], List[int]]], seq_len: int, pad_id: int,
         packing: bool) -> np.ndarray:
    """Rows of ``[ids, labels, positions]``; first-fit in order when packing."""
    rows: List[np.ndarray] = []
    cur: List[Tuple[List[int], List[int]]] = []
    used = 0

    def flush():
        nonlocal cur, used
        if not cur:
            return
        row = np.full((3, seq_len), 0, dtype=np.int32)
        row[0, :] = pad_id
        row[1, :] = IGNORE
        at = 0
        for ids, labels in cur:
            n = len(ids)
            row[0, at:at + n] = ids
            row[1, at:at + n] = labels
            row[2, at:at + n] = np.arange(n)
            at += n
        row[2, at:] = np.arange(seq_len - at)  # the padding is a block of its own
        rows.append(row)
        cur, used = [], 0

    for ids, labels in examples:
        if used + len(ids) > seq_len or (cur and not packing):
            flush()
        cur.append((ids, labels))
        used += len(ids)
    flush()
    return np.stack(rows) if rows else np.zeros((0, 3, seq_len), dtype=np.int32)


def data_key(cfg) -> str:
    d = to_dict(cfg)
    d.pop("output_dir", None)
    return fingerprint(d, 10)


def start_output(tokenizer_dir: str, out_dir: str, chat_template):
    """The tokenizer with its chat template (and whether role tokens were added), and an
    output directory without a manifest (it is written last)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tio.local_dir(tokenizer_dir), local_files_only=True)
    added = ensure_chat_template(tok, chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tio.is_cloud(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    tio.remove(tio.join(out_dir, MANIFEST))
    return tok, added


def save_tokenizer(tok, out_dir: str, added: bool) -> Dict:
    """Write the tokenizer (chat template included) to ``<out_dir>/tokenizer``; its manifest entry."""
    from tidal.data.tokenizer import tokenizer_hash

    dest = tio.join(out_dir, "tokenizer")
    if tio.is_cloud(out_dir):
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            tio.upload_dir(tmp, dest)
    else:
        tok.save_pretrained(dest)
    return {"path": "tokenizer", "sha256": tokenizer_hash(tio.local_dir(dest)), "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "added_chat_tokens": added, "chat_template": tok.chat_template}


TOO_LONG = "too long: nothing of the reply fits in seq_len"


def encode(tok, turns, counts: Dict, entry: Dict) -> Optional[Tuple[List[int], List[int]]]:
    """``(ids, labels)``, or None with the reason counted: a conversation the chat template
    cannot split into turns (e.g. a reply of whitespace that merges with the role header
    into one token) is one bad record, not a failed job."""
    try:
        return encode_conversation(tok, turns)
    except ValueError as e:
        set_aside(counts, entry, f"cannot be encoded: {e}")
        return None


def split_examples(splits: Dict[str, List]) -> None:
    """Tiny sets keep one example for evaluation when they can; below two examples the
    validation split stays empty (the manifest records ``shards.val == []``)."""
    if not splits["val"] and len(splits["train"]) >= 2:
        splits["val"].append(splits["train"].pop())


def write_split(out_dir: str, split: str, rows: np.ndarray) -> List[Dict]:
    """The split's shard list: one .npy, or none for an empty split (no zero-row files)."""
    if not len(rows):
        return []
    name = f"{split}_000.npy"
    digest = tio.save_npy(tio.join(out_dir, name), rows)
    return [{"file": name, "samples": int(len(rows)), "sha256": digest}]


def prepare_sft(cfg, tokenizer_dir: str, out_dir: str, log=print) -> Dict:
    """Write SFT shards, the tokenizer (with its chat template) and ``manifest.json``."""
    tok, added = start_output(tokenizer_dir, out_dir, cfg.chat_template)
    counts: Dict = {"records": 0, "malformed": {}, "too_long": 0, "truncated": 0}
    inputs, splits = [], {"train": [], "val": []}
    embedded = {"embedded:pydocs_instruct": pydocs_instructions}
    for turns, entry in read_examples(cfg, instruction_example, embedded, counts, inputs):
        encoded = encode(tok, turns, counts, entry)
        if encoded is None:
            continue
        ids, labels = encoded
        if len(ids) > cfg.seq_len:
            ids, labels = ids[:cfg.seq_len], labels[:cfg.seq_len]
            counts["truncated"] += 1
        if all(x == IGNORE for x in labels[1:]):
            counts["too_long"] += 1  # nothing of the reply is left to learn from
            tally(entry["set_aside"], TOO_LONG)
            continue
        split = "val" if is_val(render(tok, turns), cfg.val_fraction, cfg.seed) else "train"
        splits[split].append((ids, labels))
    split_examples(splits)
    if not splits["train"]:
        raise no_usable("sft data", cfg, counts, inputs)
    rng = np.random.default_rng(cfg.seed)
    manifest: Dict = {"format_version": FORMAT_VERSION, "kind": "sft", "name": cfg.name,
                      "data_key": data_key(cfg), "inputs": inputs, "seq_len": cfg.seq_len,
                      "sample_shape": [3, cfg.seq_len], "packing": cfg.packing, "shards": {}}
    manifest["tokenizer"] = save_tokenizer(tok, out_dir, added)
    for split, examples in splits.items():
        order = rng.permutation(len(examples)) if split == "train" else np.arange(len(examples))
        rows = pack([examples[i] for i in order], cfg.seq_len, tok.pad_token_id, cfg.packing)
        manifest["shards"][split] = write_split(out_dir, split, rows)
        counts[split] = {"examples": len(examples), "samples": int(len(rows)),
                         "tokens": int(sum(len(e[0]) for e in examples)),
                         "response_tokens": int(sum(sum(x != IGNORE for x in e[1]) for e in examples))}
    return write_manifest(out_dir, manifest, counts, cfg, log, (
        f"sft data '{cfg.name}': {counts['train']['examples']} train / {counts['val']['examples']} val "
        f"examples -> {counts['train']['samples']} / {counts['val']['samples']} rows of {cfg.seq_len} "
        "tokens"), "examples")


def write_manifest(out_dir: str, manifest: Dict, counts: Dict, cfg, log, summary: str, unit: str) -> Dict:
    """The manifest, written last (it marks the data complete), and one line saying what
    was prepared and what was set aside."""
    manifest["counts"] = counts
    manifest["config"] = redact(to_dict(cfg))
    tio.write_bytes(tio.join(out_dir, MANIFEST), json.dumps(manifest, indent=2).encode())
    log(f"{summary}; set aside: {sum(counts['malformed'].values())} malformed, {counts['too_long']} too long"
        + ("" if counts["val"]["samples"] else f"; no validation split (too few {unit})"))
    return manifest
