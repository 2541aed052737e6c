"""Export to a Hugging Face directory (safetensors + config + tokenizer + generation config).

Two ways in: at the end of training from the live sharded model (``export_hf``), or later,
in one process, from any tidal checkpoint directory (``export_checkpoint``).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tidal.data import io as tio


def _auto_class(config):
    """The HF auto class that rebuilds ``config``: a reward model exports as a sequence
    classifier (loadable with ``AutoModelForSequenceClassification``), others as causal LMs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def _plain_model(config, state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    config.use_cache = True
    with torch.device("meta"):
        model = _auto_class(config).from_config(config, dtype=torch.float32)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    return model


def write_hf(model: torch.nn.Module, tokenizer_dir: str, dest: str, overwrite: bool = False,
             source: Optional[Dict] = None) -> str:
    """Write ``model`` and its tokenizer as an HF directory at ``dest`` (local or cloud),
    published whole with its completion marker (``tidal.train.publish``)."""
    from transformers import AutoTokenizer, GenerationConfig

    from tidal.train.publish import publish

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)

    def write(local: str) -> None:
        model.save_pretrained(local, safe_serialization=True)
        tok.save_pretrained(local)
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id).save_pretrained(local)

    return publish(dest, write, overwrite=overwrite, source=source)


def export_hf(model: torch.nn.Module, rank: int, tokenizer_dir: str, dest: Optional[str],
              adapter_dest: Optional[str] = None) -> None:
    """Gather the full state dict (a collective: every rank calls this); rank 0 writes.
    A LoRA model writes its PEFT adapter directory at ``adapter_dest`` and the merged
    model at ``dest`` (None: adapter only)."""
    from tidal.models import lora

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    if lora.is_peft(model):
        plain = plain_peft(model.config, full, model.peft_config["default"])
        write_peft(plain, tokenizer_dir, adapter_dest, dest)
    else:
        write_hf(_plain_model(model.config, full), tokenizer_dir, dest)


def export_checkpoint(checkpoint_dir: str, dest: str, overwrite: bool = False, part: str = "model") -> str:
    """Convert a (sharded, any world size) tidal checkpoint to an HF directory, in this
    process: the trained model, or with ``part="value"`` a PPO run's value model (an HF
    sequence classifier). The checkpoint is verified (commit record, digests, signature)
    before anything in it is read; a destination an export may not replace is refused
    before any work."""
    from transformers import AutoConfig

    from tidal.train import integrity
    from tidal.train.checkpoint import HF_META

    from tidal.train.publish import check_destination

    integrity.require_valid(checkpoint_dir)  # nothing is read from it before this
    check_destination(dest, overwrite)
    if tio.is_cloud(checkpoint_dir):  # fetched (or cached): the copy is what is read
        checkpoint_dir = tio.local_dir(checkpoint_dir)
        integrity.require_valid(checkpoint_dir, copy=True)
    meta = os.path.join(checkpoint_dir, HF_META)
    if part != "model":
        return _export_companion(checkpoint_dir, meta, part, dest, overwrite)
    config = AutoConfig.from_pretrained(meta, local_files_only=True)
    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        run_cfg = json.load(f).get("config", {})
    if run_cfg.get("model", {}).get("lora", {}).get("rank"):
        check_destination(f"{dest}-adapter", overwrite)
        return _export_lora_checkpoint(checkpoint_dir, meta, config, run_cfg, dest, overwrite)
    model = _checkpoint_model(checkpoint_dir, config)
    return write_hf(model, meta, dest, overwrite, source={"checkpoint": checkpoint_dir})


def _checkpoint_model(checkpoint_dir: str, config, part: Optional[str] = None) -> torch.nn.Module:
    """A plain model built from ``config`` with the checkpoint's weights: the trained model's,
    or those of the companion engine ``part`` (kept under its name); only those entries are
    read."""
    from tidal.train import safe_dcp

    model = _auto_class(config).from_config(config, dtype=torch.float32)
    entries = {"model": model.state_dict()}
    state = {part: entries} if part else entries
    safe_dcp.load(state, checkpoint_dir)
    model.load_state_dict(entries["model"])
    model.tie_weights()
    model.config.use_cache = True
    return model


def _export_companion(checkpoint_dir: str, meta: str, part: str, dest: str, overwrite: bool) -> str:
    """A companion engine's model (PPO's ``value``), kept in the checkpoint under its name
    with its config in ``hf_meta_<part>``; the tokenizer is the run's."""
    from transformers import AutoConfig

    own = f"{meta}_{part}"
    if not os.path.isdir(own):
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} holds no {part} model (its run had none: only "
                                "PPO runs have a value model); allowed: part=model")
    model = _checkpoint_model(checkpoint_dir, AutoConfig.from_pretrained(own, local_files_only=True), part)
    return write_hf(model, meta, dest, overwrite, source={"checkpoint": checkpoint_dir, "part": part})


def _export_lora_checkpoint(checkpoint_dir: str, meta: str, config, run_cfg: Dict, dest: str,
                            overwrite: bool) -> str:
    """A LoRA checkpoint holds only the adapters: rebuild the base from the run's
    ``model.pretrained``, load the adapters, write ``<dest>`` (merged) and ``<dest>-adapter``."""
    from tidal.config import ModelConfig, from_dict
    from tidal.models import build_model, lora
    from tidal.train import safe_dcp

    mc = from_dict(ModelConfig, run_cfg["model"])
    if not mc.pretrained or not os.path.isdir(os.path.expanduser(mc.pretrained)):
        raise FileNotFoundError(f"{checkpoint_dir} holds LoRA adapters for the base model "
                                f"{mc.pretrained!r}, which is not there: the base is needed to export")
    head = "reward" if _auto_class(config).__name__.endswith("SequenceClassification") else "lm"
    base = build_model(mc, config.vocab_size, config.eos_token_id, config.pad_token_id,
                       run_cfg.get("train", {}).get("seed", 0), head=head)
    model = lora.wrap(base, mc.lora, head, getattr(base, "tidal_new_tokens", []), mc.pretrained)
    keep = lora.trainable_names(model)
    state = {"model": {k: v for k, v in model.state_dict().items() if k in keep}}
    safe_dcp.load(state, checkpoint_dir)
    model.load_state_dict(state["model"], strict=False)
    write_peft(model, meta, f"{dest}-adapter", dest, overwrite)
    return dest


def plain_peft(config, state, adapter_conf):
    """A single-process ``PeftModel`` from the full state dict of a sharded one."""
    import copy

    from peft import get_peft_model

    config.use_cache = True
    with torch.device("meta"):
        base = _auto_class(config).from_config(config, dtype=torch.float32)
    model = get_peft_model(base, copy.deepcopy(adapter_conf))
    model.load_state_dict(state, assign=True, strict=True)
    return model


def write_peft(model, tokenizer_dir: str, adapter_dest: Optional[str],
               merged_dest: Optional[str], overwrite: bool = False) -> None:
    """A single-process ``PeftModel`` as the PEFT adapter directory (adapter weights, config
    naming the base, tokenizer) at ``adapter_dest`` and as an HF directory of the base with
    the adapters merged in at ``merged_dest`` (either may be None); each is published whole
    with its completion marker (``tidal.train.publish``)."""
    from transformers import AutoTokenizer

    from tidal.train.publish import check_destination, publish

    for dest in (adapter_dest, merged_dest):  # both refused before either is written
        if dest:
            check_destination(dest, overwrite)
    if adapter_dest:
        def write(local: str) -> None:
            model.save_pretrained(local)
            AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(local)

        publish(adapter_dest, write, overwrite=overwrite, source={"kind": "peft-adapter"})
    if merged_dest:
        merged = model.merge_and_unload()
        merged.tie_weights()
        write_hf(merged, tokenizer_dir, merged_dest, overwrite)
