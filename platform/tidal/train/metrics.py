"""Throughput, FLOPs and model FLOPs utilization (MFU)."""
from __future__ import annotations

import resource
import sys
from typing import Optional

import torch

# Dense bf16 tensor-core peak FLOP/s per device (no sparsity), from vendor data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 NVL": 835.0e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,
    "GH200": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "L40": 181.05e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,  # fp16
}


def flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with the weights (forward + backward)
    plus 12·L·d·T for attention scores and values (PaLM appendix B). N counts the weights
    that take part in matmuls: the input embedding is a lookup, so it is left out unless it
    is tied to the output head (see ``matmul_params``)."""
    return 6.0 * num_params + 12.0 * num_layers * hidden * seq_len


def peak_flops(device_name: str) -> Optional[float]:
    """Peak bf16 FLOP/s for a device name as CUDA reports it, or None if unknown."""
    name = device_name.upper()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.upper() in name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_s_per_device: float, flops_token: float, peak: Optional[float]) -> Optional[float]:
    if not peak:
        return None
    return tokens_per_s_per_device * flops_token / peak


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matmuls: all but an untied input-embedding table."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    return total if tied else total - emb.numel()
