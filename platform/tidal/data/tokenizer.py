"""Tokenizers: load a local HF tokenizer directory, or train a byte-level BPE and save it."""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

from tidal.config.schema import TokenizerConfig

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str):
    """Train a byte-level BPE of ``cfg.vocab_size`` on ``texts`` and save it in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def capped():
        used = 0
        for t in texts:
            if used >= cfg.train_max_chars:
                return
            used += len(t)
            yield t

    tok.train_from_iterator(capped(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                 pad_token=PAD, unk_token=None)
    hf.model_max_length = 1 << 30
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf


def load(path: str):
    """Load a local tokenizer directory (no hub access)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.expanduser(path), local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; packing needs one between documents")
    return tok


def tokenizer_hash(path: str) -> str:
    """sha256 over the tokenizer's defining files, in name order."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".json", ".txt", ".model")):
            h.update(name.encode())
            with open(os.path.join(path, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()
