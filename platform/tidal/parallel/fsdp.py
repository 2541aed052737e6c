"""FSDP2 wrapping: the one place ``fully_shard`` appears."""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def make_mesh(device_type: str, world_size: int) -> DeviceMesh:
    """A 1-D data-parallel mesh (FSDP shards over all ranks)."""
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))


def resolve_precision(precision: str, device_type: str) -> str:
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found by the model's own ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"cannot find decoder blocks in {type(model).__name__}")
    return blocks


def apply(model: torch.nn.Module, mesh: DeviceMesh, precision: str,
          activation_checkpointing: bool = False, compile_blocks: bool = False) -> torch.nn.Module:
    """Shard each decoder block, then the root, with the given precision policy
    (``compile_blocks``: each block is first compiled in place with ``torch.compile``, as
    torchtitan does; its parameters keep their names).

    bf16: parameters are gathered and computed in bf16, gradients reduced in fp32, the
    optimizer keeps fp32 master weights. fp32: everything in fp32 (the CPU default).
    On a one-rank fp32 mesh there is nothing to shard, and FSDP's copies would only cost
    time, so the model stays a plain module (DCP checkpoints are the same either way:
    keys are parameter names, and they reshard onto any world size).
    """
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile_blocks:
        for block in decoder_blocks(model):
            block.compile()
    if mesh.size() == 1 and precision == "fp32":
        return model
    mp = None
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed right away by the root's backward.
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model
