"""Fused GPU kernels for the model's layers (``model.kernels``).

``liger``: Liger-Kernel's Triton RMSNorm, SwiGLU MLP and rotary embedding replace the Hugging
Face ones in the llama, qwen2 and mistral families (Liger patches the modeling classes, so it
is applied before the model is built), and its fused linear cross-entropy computes the
next-token loss without materialising the logits (``tidal.objectives.logprobs.model_nll_sum``
switches to it for a model marked ``tidal_fused_loss = "liger"``). CUDA only: the CPU path
keeps tidal's chunked torch loss and the Hugging Face layers.
"""
from __future__ import annotations

import importlib.util
import os
import torch

LIGER = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2",
         "mistral": "apply_liger_kernel_to_mistral"}


def model_type(cfg) -> str:
    if cfg.pretrained:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(os.path.expanduser(cfg.pretrained), local_files_only=True).model_type
    return cfg.arch


def apply(cfg, device: torch.device) -> bool:
    """Patch the model family's layers before the model is built (``cfg``: the model
    section); returns whether the fused loss is to be used."""
    if cfg.kernels == "none":
        return False
    why = "this worker has no CUDA device" if device.type != "cuda" else None
    if why is None and importlib.util.find_spec("liger_kernel") is None:
        why = "liger-kernel is not installed on this worker"
    arch = model_type(cfg)
    if why is None and arch not in LIGER:
        why = f"no Liger kernels for model type {arch!r} (allowed: {', '.join(LIGER)})"
    if why:
        raise RuntimeError(f"model.kernels={cfg.kernels}: {why}")
    import liger_kernel.transformers as lk

    getattr(lk, LIGER[arch])(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                             fused_linear_cross_entropy=False)  # tidal computes the loss itself
    return True
