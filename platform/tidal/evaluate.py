"""Evaluation of an HF model directory against prepared data, in one process.

- language modelling on a prepared pretraining data directory's validation split:
  loss, perplexity, bits per byte, next-token accuracy;
- SFT: loss and token accuracy on the held-out instructions (response tokens only);
- pairs: a reward model's accuracy on held-out pairs, or a policy's DPO preference
  accuracy against a reference (implicit rewards ``log pi - log ref``);
- forgetting: the language-modelling metrics of a ``before`` model (e.g. the pretrained
  base) and of this one, side by side;
- generations for a fixed prompt list, with the model's own chat template.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from tidal.data.loader import ShardSet
from tidal.data.prepare import load_manifest
from tidal.objectives.preference import sequence_logps

IGNORE = -100


def load(path: str, reward: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _val(data_dir: str, max_samples: int):
    manifest = load_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"no prepared data (manifest.json) at {data_dir}")
    val = ShardSet(data_dir, manifest["shards"].get("val") or [])
    if len(val) == 0:
        raise ValueError(f"{data_dir}: no validation split (the data set was too small to hold "
                         "one out): nothing held out to evaluate on")
    n = min(len(val), max_samples)
    return manifest, val.take(np.arange(n))


def _token_sums(rows: np.ndarray, batch: int, forward):
    """Summed next-token loss, correct argmax predictions and labelled-token count over
    ``rows`` in batches; ``forward(batch)`` gives ``(logits, labels)`` aligned."""
    loss_sum = correct = tokens = 0.0
    for i in range(0, len(rows), batch):
        logits, labels = forward(torch.from_numpy(rows[i:i + batch]))
        logits = logits.float()
        mask = labels != IGNORE
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                    ignore_index=IGNORE, reduction="sum").item()
        correct += ((logits.argmax(-1) == labels) & mask).sum().item()
        tokens += mask.sum().item()
    return loss_sum, correct, tokens


@torch.no_grad()
def lm_metrics(model, data_dir: str, max_samples: int = 64, batch: int = 8) -> Dict[str, float]:
    """Loss, perplexity, bits per byte and next-token accuracy on the validation split."""
    manifest, samples = _val(data_dir, max_samples)
    loss_sum, correct, tokens = _token_sums(
        samples, batch, lambda t: (model(input_ids=t[:, :-1]).logits, t[:, 1:]))
    loss = loss_sum / max(tokens, 1)
    out = {"loss": loss, "ppl": math.exp(min(loss, 50)), "token_accuracy": correct / max(tokens, 1),
           "samples": len(samples)}
    val = manifest["counts"]["val"]
    if val.get("bytes") and val.get("tokens"):
        out["bpb"] = loss / math.log(2) / (val["bytes"] / val["tokens"])
    return out


@torch.no_grad()
def sft_metrics(model, data_dir: str, max_samples: int = 64, batch: int = 8) -> Dict[str, float]:
    """Response-token loss and accuracy on held-out instruction rows ``[ids, labels, pos]``."""
    _, rows = _val(data_dir, max_samples)
    loss_sum, correct, tokens = _token_sums(
        rows, batch, lambda b: (model(input_ids=b[:, 0], position_ids=b[:, 2], use_cache=False).logits[:, :-1],
                                b[:, 1, 1:]))
    return {"loss": loss_sum / max(tokens, 1), "token_accuracy": correct / max(tokens, 1),
            "examples_rows": len(rows)}


@torch.no_grad()
def pair_metrics(model, data_dir: str, reference=None, reward: bool = False,
                 max_samples: int = 64, batch: int = 8) -> Dict[str, float]:
    """Held-out pair accuracy: a reward model's ``r_c > r_r``, or a policy's implicit
    DPO reward ``(log pi - log ref)(c) > (...)(r)`` against ``reference``."""
    _, rows = _val(data_dir, max_samples)
    wins, margins = 0, []
    for i in range(0, len(rows), batch):
        b = torch.from_numpy(rows[i:i + batch])
        n = len(b)
        ids, labels = torch.cat([b[:, 0], b[:, 2]]), torch.cat([b[:, 1], b[:, 3]])
        if reward:
            r = model(input_ids=ids).logits.squeeze(-1).float()
        else:
            r = sequence_logps(model, ids, labels)[0]
            if reference is not None:
                r = r - sequence_logps(reference, ids, labels)[0]
        d = r[:n] - r[n:]
        wins += int((d > 0).sum())
        margins += d.tolist()
    return {"accuracy": wins / max(len(rows), 1), "margin": float(np.mean(margins)) if margins else 0.0,
            "pairs": len(rows)}


@torch.no_grad()
def generate(model, tok, prompts: List[str], max_new_tokens: int = 32) -> List[Dict[str, str]]:
    """Greedy completions of ``prompts`` as user turns, through the model's chat template
    (plain text when it has none)."""
    out = []
    for p in prompts:
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = p
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        out.append({"prompt": p, "rendered": text,
                    "completion": tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=False)})
    return out


def evaluate(cfg, log=print) -> Dict:
    """Every evaluation ``cfg`` asks for; see :class:`tidal.config.EvalConfig`."""
    results: Dict = {"model": cfg.model_dir}
    model, tok = load(cfg.model_dir, reward=cfg.reward)
    if cfg.text_data and not cfg.reward:
        results["lm"] = lm_metrics(model, cfg.text_data, cfg.max_samples)
        if cfg.before:
            before, _ = load(cfg.before)
            b = lm_metrics(before, cfg.text_data, cfg.max_samples)
            results["forgetting"] = {"before": b, "after": results["lm"],
                                     "ppl_change": results["lm"]["ppl"] / b["ppl"] - 1}
    if cfg.sft_data and not cfg.reward:
        results["sft"] = sft_metrics(model, cfg.sft_data, cfg.max_samples)
    if cfg.pair_data:
        reference = load(cfg.before)[0] if (cfg.before and not cfg.reward) else None
        results["pairs"] = pair_metrics(model, cfg.pair_data, reference, cfg.reward, cfg.max_samples)
    if cfg.prompts and not cfg.reward:
        results["samples"] = generate(model, tok, list(cfg.prompts), cfg.max_new_tokens)
    return results


def flat_metrics(results: Dict) -> Dict[str, float]:
    """The numeric results as ``section/metric`` keys (for the console table and W&B)."""
    out: Dict[str, float] = {}

    def walk(prefix: str, d: Optional[Dict]):
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}/", v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}{k}"] = v
    walk("", {k: v for k, v in results.items() if k != "samples"})
    return out
