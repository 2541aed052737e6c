"""Low-rank adapters (peft) on a built model, before FSDP2 wraps it.

The base weights are frozen; LoRA matrices train, and so do the embedding (and output)
rows of tokens added to a base vocabulary (e.g. chat role markers), through peft's trainable
token deltas: a frozen base could not learn to read or emit tokens it has never seen.
Checkpoints hold only the trainable tensors (``trainable_names``); exports write a PEFT
adapter directory and, optionally, the base with the adapters merged in.
"""
from __future__ import annotations

import os
from typing import List, Optional, Set

import torch

from tidal.config.schema import LoRAConfig


def _module_name(model: torch.nn.Module, module) -> Optional[str]:
    for name, m in model.named_modules():
        if m is module and name:
            return name.rsplit(".", 1)[-1]
    return None


def peft_config(cfg: LoRAConfig, head: str, new_tokens: List[int], tied: bool,
                base_path: Optional[str], names=("embed_tokens", "lm_head")):
    from peft import LoraConfig

    targets = cfg.target_modules
    trainable_tokens = None
    if new_tokens:
        trainable_tokens = {names[0]: list(new_tokens)}
        if head == "lm" and not tied and names[1]:
            trainable_tokens[names[1]] = list(new_tokens)
    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM",
        trainable_token_indices=trainable_tokens,
        base_model_name_or_path=os.path.abspath(os.path.expanduser(base_path)) if base_path else None)


def wrap(model: torch.nn.Module, cfg: LoRAConfig, head: str = "lm",
         new_tokens: Optional[List[int]] = None, base_path: Optional[str] = None):
    """``model`` as a ``PeftModel`` with adapters per ``cfg`` (the base frozen)."""
    from peft import get_peft_model

    out = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = out is not None and out.weight is emb.weight
    names = (_module_name(model, emb), _module_name(model, out) if out is not None else None)
    conf = peft_config(cfg, head, list(new_tokens or []), tied, base_path, names)
    try:
        return get_peft_model(model, conf)
    except ValueError as e:  # e.g. target modules that match nothing
        what = (f"model.lora.target_modules={list(cfg.target_modules)}"
                + (f" (and the rows of the {len(new_tokens)} added tokens in {names})" if new_tokens else ""))
        raise ValueError(f"{what}: {e}") from e


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def trainable_names(model: torch.nn.Module) -> Set[str]:
    """State-dict keys of the trainable tensors (the adapters; FSDP2 keeps parameter names)."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class AdaptersOff:
    """The base model inside a ``PeftModel``: calling it runs the forward with the adapters
    disabled, without gradients (DPO's reference, with no second copy of the weights).

    peft's own ``disable_adapter()`` also flips the adapters' ``requires_grad``; under FSDP2
    that lands on whichever copy (sharded or gathered) a module holds at that moment and
    silently freezes some adapters for good. Only the layers' disable flag is switched here."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def __call__(self, *args, **kwargs):
        before = [layer._disable_adapters for layer in self.layers]
        training = self.model.training
        for layer in self.layers:
            layer._disable_adapters = True
        self.model.eval()  # like the frozen reference copy: no dropout
        try:
            with torch.no_grad():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(training)
            for layer, flag in zip(self.layers, before):
                layer._disable_adapters = flag

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()
