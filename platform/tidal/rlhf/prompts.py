"""Prompts for RL: read, validate, template, tokenize, split.

Every record becomes a prompt (the conversation the policy continues) and metadata for
the reward functions, from any of:
- chat ``messages``: every turn before the last assistant reply (all the turns when the
  conversation does not end with one);
- Alpaca records: ``instruction`` and the optional ``input``, as SFT reads them (the
  ``output`` is not part of the prompt);
- ``{"prompt": ...}`` records: a string (one user turn) or a list of chat turns;
- HH-RLHF transcripts (``chosen``): the dialogue before the last Assistant reply.
A record's other fields (e.g. ``answer``, ``target``, ``id``) are the prompt's ``meta``; the
replies (``output``, ``response``, ``completion``, ``chosen``, ``rejected``) are not. A
malformed record is counted by reason and set aside (in the manifest's totals and in its
input's entry), never fatal.

The prompt is rendered with the chat template as SFT renders a conversation, plus the
generation prompt, and tokenized as SFT tokenizes it (no extra special tokens: the template
writes its own). A prompt of more than ``seq_len`` tokens is set aside and counted. Each split
is a JSON-lines file of ``{"ids", "text", "meta"}`` written whole (temp file + rename), its
SHA-256 recorded in the manifest, which is written last and marks the data complete.
"""
from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Optional, Tuple

import numpy as np

from tidal.data import DataError
from tidal.data import io as tio
from tidal.data.chat import render
from tidal.data.formats import alpaca_prompt, opening_turns, parse_hh
from tidal.data.prepare import is_val, load_manifest
from tidal.data.sft import (MANIFEST, data_key, no_usable, pydocs_instructions, read_examples,
                            save_tokenizer, set_aside, split_examples, start_output, tally,
                            write_manifest)

FORMAT_VERSION = 1
KIND = "prompts"
SPLITS = ("train", "val")
REPLY_FIELDS = frozenset(("output", "response", "completion", "chosen", "rejected"))
TOO_LONG = "too long: the prompt has more than seq_len tokens"
EMBEDDED = {"embedded:pydocs_instruct": pydocs_instructions}


def _turns(rec: Dict) -> Tuple[Optional[list], Optional[str], Tuple[str, ...]]:
    """``(turns, reason, the fields the prompt was made of)``."""
    if "messages" in rec:
        msgs = rec["messages"]
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) \
                and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]  # the reply: what the policy is to write
        return (*opening_turns(msgs), ("messages",))
    if "instruction" in rec:
        user, why = alpaca_prompt(rec)
        return ([{"role": "user", "content": user}] if user else None), why, ("instruction", "input")
    if "prompt" in rec:
        prompt = rec["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                return None, "empty 'prompt'", ()
            return [{"role": "user", "content": prompt.strip()}], None, ("prompt",)
        return (*opening_turns(prompt), ("prompt",))
    if "chosen" in rec:
        turns = parse_hh(rec["chosen"])
        if turns is None:
            return None, "'chosen' is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript", ()
        if turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        return (*opening_turns(turns), ())
    return None, "no messages, instruction, prompt or chosen (HH-RLHF transcript) field", ()


def prompt_example(rec) -> Tuple[Optional[Dict], Optional[str]]:
    """``({"turns", "meta"}, None)`` for a usable record, else ``(None, reason)``."""
    if not isinstance(rec, dict):
        return None, "record is not an object"
    turns, why, used = _turns(rec)
    if turns is None:
        return None, why
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        return None, "the prompt does not end with a non-empty user turn"
    meta = {k: v for k, v in rec.items() if k not in used and k not in REPLY_FIELDS}
    return {"turns": turns, "meta": meta}, None


def prepare_prompts(cfg, tokenizer_dir: str, out_dir: str, log=print) -> Dict:
    """Write the prompt splits, the tokenizer (with its chat template) and ``manifest.json``."""
    from jinja2.exceptions import TemplateError

    tok, added = start_output(tokenizer_dir, out_dir, cfg.chat_template)
    counts: Dict = {"records": 0, "malformed": {}, "too_long": 0}
    inputs, splits = [], {"train": [], "val": []}
    for ex, entry in read_examples(cfg, prompt_example, EMBEDDED, counts, inputs):
        try:
            text = render(tok, ex["turns"], add_generation_prompt=True)
        except (TemplateError, ValueError, TypeError) as e:  # e.g. a template that refuses the roles
            set_aside(counts, entry, f"cannot be rendered: {e}")
            continue
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.seq_len:
            counts["too_long"] += 1
            tally(entry["set_aside"], TOO_LONG)
            continue
        split = "val" if is_val(text, cfg.val_fraction, cfg.seed) else "train"
        splits[split].append({"ids": ids, "text": text, "meta": ex["meta"]})
    split_examples(splits)
    if not splits["train"]:
        raise no_usable("prompt data", cfg, counts, inputs)
    train = splits["train"]
    splits["train"] = [train[i] for i in np.random.default_rng(cfg.seed).permutation(len(train))]
    manifest: Dict = {"format_version": FORMAT_VERSION, "kind": KIND, "name": cfg.name,
                      "data_key": data_key(cfg), "inputs": inputs, "seq_len": cfg.seq_len, "files": {}}
    manifest["tokenizer"] = save_tokenizer(tok, out_dir, added)
    whole = hashlib.sha256()
    for split in SPLITS:
        prompts = splits[split]
        data = b"".join(json.dumps(p).encode() + b"\n" for p in prompts)  # ASCII: no lone surrogates
        tio.write_bytes(tio.join(out_dir, f"{split}.jsonl"), data)
        digest = hashlib.sha256(data).hexdigest()
        manifest["files"][split] = {"file": f"{split}.jsonl", "prompts": len(prompts), "bytes": len(data),
                                    "sha256": digest}
        counts[split] = {"prompts": len(prompts), "samples": len(prompts),
                         "tokens": sum(len(p["ids"]) for p in prompts),
                         "max_tokens": max((len(p["ids"]) for p in prompts), default=0)}
        whole.update(f"{split}:{digest}\n".encode())
    manifest["prompt_hash"] = whole.hexdigest()
    return write_manifest(out_dir, manifest, counts, cfg, log, (
        f"prompt data '{cfg.name}': {counts['train']['prompts']} train / {counts['val']['prompts']} val "
        f"prompts of <= {cfg.seq_len} tokens"), "prompts")


def _problem(p) -> Optional[str]:
    if not isinstance(p, dict) or set(p) != {"ids", "text", "meta"}:
        return "not an object with exactly ids, text and meta"
    ids = p["ids"]
    if not isinstance(ids, list) or not ids or not all(type(i) is int and i >= 0 for i in ids):
        return "'ids' is not a non-empty list of token ids"
    if not isinstance(p["text"], str) or not isinstance(p["meta"], dict):
        return "'text' is not a string or 'meta' not an object"
    return None


def read_prompts(out_dir: str, split: str = "train") -> List[Dict]:
    """The prepared prompts of ``split`` (``{"ids", "text", "meta"}`` each), checked against
    the manifest (kind, version, SHA-256, count) and line by line; JSON only."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    manifest = load_manifest(out_dir)
    if manifest is None:
        raise DataError(f"{out_dir}: no {MANIFEST} (not prepared prompt data, or its preparation "
                        "did not finish)")
    if manifest.get("kind") != KIND or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{out_dir}: holds {manifest.get('kind')!r} data of format "
                        f"{manifest.get('format_version')!r}, not {KIND!r} data of format {FORMAT_VERSION}")
    entry = manifest.get("files", {}).get(split)
    uri = tio.join(out_dir, f"{split}.jsonl")
    if not isinstance(entry, dict) or not tio.exists(uri):
        raise DataError(f"{uri}: missing (or not in {MANIFEST})")
    data = tio.read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise DataError(f"{uri}: content differs from its {MANIFEST} SHA-256 (truncated or overwritten)")
    out = []
    for n, line in enumerate(data.splitlines(), 1):
        try:
            p = json.loads(line)
        except ValueError as e:
            raise DataError(f"{uri}: line {n} is not JSON: {e}") from None
        problem = _problem(p)
        if problem:
            raise DataError(f"{uri}: line {n}: {problem}")
        out.append(p)
    if len(out) != entry.get("prompts"):
        raise DataError(f"{uri}: {len(out)} prompts, {MANIFEST} says {entry.get('prompts')}")
    return out
