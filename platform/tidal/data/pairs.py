"""Preference pairs for reward modelling and DPO: read, validate, template, shard.

Each sample is an ``int32 [4, seq_len]`` array: the chosen conversation's token ids and
labels (ids on the reply's tokens, ``-100`` elsewhere), then the rejected one's. Rows are
right-padded (padding follows every real token, so causal attention never sees it). The
shards use the same global sample-cursor loader, checkpoints and resume as every stage.
"""
from __future__ import annotations

import random
from typing import Dict, List, Tuple

import numpy as np

from tidal.config import fingerprint, to_dict
from tidal.data.chat import IGNORE, render
from tidal.data.corpus import embedded_docs
from tidal.data.formats import preference_example
from tidal.data.prepare import is_val
from tidal.data.sft import (TOO_LONG, encode, no_usable, read_examples, save_tokenizer, split_examples,
                            start_output, tally, write_manifest, write_split)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def pydocs_preferences(seed: int = 0) -> List[Dict]:
    """Pairs from the embedded Python docs: for "explain X", the documentation's paragraph
    on X is preferred over a paragraph about another topic."""
    items = []
    for sid, text in embedded_docs("pydocs"):
        topic = sid.split(":", 1)[1] if ":" in sid else sid
        paras = [p.strip() for p in text.split("\n\n") if len(p.split()) >= 8]
        if paras:
            items.append((topic, " ".join(paras[0].split()[:120])))
    rng = random.Random(seed)
    out = []
    for i, (topic, answer) in enumerate(items):
        other = items[(i + rng.randrange(1, len(items))) % len(items)][1]
        out.append({"prompt": f"Explain `{topic}` in Python.", "chosen": answer, "rejected": other})
    return out


def data_key(cfg) -> str:
    d = to_dict(cfg)
    d.pop("output_dir", None)
    return fingerprint(d, 10)


def _row(chosen: Tuple[List[int], List[int]], rejected: Tuple[List[int], List[int]], seq_len: int,
         pad_id: int) -> np.ndarray:
    row = np.full((4, seq_len), IGNORE, dtype=np.int32)
    row[0, :] = pad_id
    row[2, :] = pad_id
    for k, (ids, labels) in enumerate((chosen, rejected)):
        row[2 * k, :len(ids)] = ids
        row[2 * k + 1, :len(labels)] = labels
    return row


def _encode_pair(tok, ex: Dict, cfg, counts: Dict, entry: Dict):
    """The pair's two ``(ids, labels)``, or None with the reason counted."""
    pair = []
    for side in ("chosen", "rejected"):
        turns = ex["prompt"] + [{"role": "assistant", "content": ex[side]}]
        encoded = encode(tok, turns, counts, entry)
        if encoded is None:
            return None
        ids, labels = encoded
        if len(ids) > cfg.seq_len:
            # keep the end: the replies are what is compared, the oldest turns
            # of the prompt are what can go
            ids, labels = ids[-cfg.seq_len:], labels[-cfg.seq_len:]
            counts["truncated"] += 1
        pair.append((ids, labels))
    if any(all(x == IGNORE for x in lab[1:]) for _, lab in pair) or pair[0][0] == pair[1][0]:
        counts["too_long"] += 1  # nothing left to compare
        tally(entry["set_aside"], TOO_LONG)
        return None
    return pair


def prepare_pairs(cfg, tokenizer_dir: str, out_dir: str, log=print) -> Dict:
    tok, added = start_output(tokenizer_dir, out_dir, cfg.chat_template)
    counts: Dict = {"records": 0, "malformed": {}, "too_long": 0, "truncated": 0}
    inputs, splits = [], {"train": [], "val": []}
    embedded = {"embedded:pydocs_prefs": lambda: pydocs_preferences(cfg.seed)}
    for ex, entry in read_examples(cfg, preference_example, embedded, counts, inputs):
        pair = _encode_pair(tok, ex, cfg, counts, entry)
        if pair is None:
            continue
        text = render(tok, ex["prompt"])
        split = "val" if is_val(text, cfg.val_fraction, cfg.seed) else "train"
        splits[split].append(_row(pair[0], pair[1], cfg.seq_len, tok.pad_token_id))
    split_examples(splits)
    if not splits["train"]:
        raise no_usable("pair data", cfg, counts, inputs)
    manifest: Dict = {"format_version": FORMAT_VERSION, "kind": "pairs", "name": cfg.name,
                      "data_key": data_key(cfg), "inputs": inputs, "seq_len": cfg.seq_len,
                      "sample_shape": [4, cfg.seq_len], "shards": {}}
    manifest["tokenizer"] = save_tokenizer(tok, out_dir, added)
    rng = np.random.default_rng(cfg.seed)
    for split, rows in splits.items():
        arr = np.stack(rows) if rows else np.zeros((0, 4, cfg.seq_len), dtype=np.int32)
        if split == "train":
            arr = arr[rng.permutation(len(arr))]
        manifest["shards"][split] = write_split(out_dir, split, arr)
        counts[split] = {"samples": int(len(arr)), "pairs": int(len(arr))}
    return write_manifest(out_dir, manifest, counts, cfg, log, (
        f"pair data '{cfg.name}': {counts['train']['pairs']} train / {counts['val']['pairs']} val pairs "
        f"of <= {cfg.seq_len} tokens"), "pairs")
