"""Build or load Hugging Face causal LMs as plain ``nn.Module`` objects.

No distributed code here: parallelism is applied from outside (``tidal.parallel``).
"""
from __future__ import annotations

import os

import torch

from tidal.config.schema import ModelConfig


def _arch_config_cls(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]


def hf_config(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int | None):
    """A transformers config for the architecture and shape in ``cfg``."""
    if cfg.pretrained:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(os.path.expanduser(cfg.pretrained), local_files_only=True)
    return _arch_config_cls(cfg.arch)(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=False,
    )


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int | None,
                seed: int, head: str = "lm") -> torch.nn.Module:
    """A randomly initialized model (same weights on every rank for a given seed), or the
    weights of ``cfg.pretrained``. ``head="reward"``: the same network with a scalar head
    (``AutoModelForSequenceClassification``, one label) instead of the LM head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if head == "reward":
        if not cfg.pretrained:
            raise ValueError("model.pretrained: a reward model starts from a pretrained HF directory")
        model = AutoModelForSequenceClassification.from_pretrained(
            os.path.expanduser(cfg.pretrained), num_labels=1, local_files_only=True,
            dtype=torch.float32, attn_implementation="sdpa")
        old = model.get_input_embeddings().num_embeddings
        if vocab_size and old < vocab_size:
            model.resize_token_embeddings(vocab_size)
            model.tidal_new_tokens = list(range(old, vocab_size))
        model.config.pad_token_id = pad_id if pad_id is not None else eos_id
        model.config.use_cache = False
        model.config.architectures = [type(model).__name__]  # exports as a classifier
        return model
    if cfg.pretrained:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.expanduser(cfg.pretrained), local_files_only=True, dtype=torch.float32,
            attn_implementation="sdpa")
        old = model.get_input_embeddings().num_embeddings
        if vocab_size and old < vocab_size:
            # tokens added since (e.g. chat role markers): new rows drawn from the old rows'
            # mean and covariance, the same on every rank (seeded above)
            model.resize_token_embeddings(vocab_size)
            model.tidal_new_tokens = list(range(old, vocab_size))  # LoRA trains these rows
    else:
        from tidal.models.materialize import seeded_init_

        conf = hf_config(cfg, vocab_size, eos_id, pad_id)
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32,
                                                 attn_implementation="sdpa")
        if cfg.meta_init:  # not sharded here (e.g. LoRA): the weights the sharded path draws
            seeded_init_(model, seed, cfg.init_std)
    model.config.use_cache = False
    return model


def count_params(model: torch.nn.Module) -> int:
    """Parameter count of the full model (``DTensor.numel()`` is the global size)."""
    return sum(p.numel() for p in model.parameters())


def shape_of(model: torch.nn.Module) -> dict:
    """Layers, width and vocabulary of an HF causal LM (for FLOPs and the run card)."""
    c = model.config
    return {"num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size, "num_heads": c.num_attention_heads,
            "arch": c.model_type}
