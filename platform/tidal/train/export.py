"""Export a sharded model as a Hugging Face directory (safetensors + config + tokenizer)."""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tidal.data import io as tio


def export_hf(model: torch.nn.Module, rank: int, tokenizer_dir: str, dest: str) -> None:
    """Gather the full state dict (a collective: every rank calls this) and let rank 0 write
    ``dest`` — a local directory or a cloud URI — that ``from_pretrained`` loads."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = model.config
    config.use_cache = True
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(full, assign=True, strict=True)
    plain.tie_weights()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    local = dest if not tio.is_cloud(dest) else tempfile.mkdtemp(prefix="tidal-hf-")
    if os.path.isdir(local):
        shutil.rmtree(local)
    plain.save_pretrained(local, safe_serialization=True)
    tok.save_pretrained(local)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(local)
    if tio.is_cloud(dest):
        import pyarrow.fs as pafs

        fs, path = tio.resolve(dest)
        pafs.copy_files(local, path, destination_filesystem=fs)
        shutil.rmtree(local)
