"""Sharded initialisation: build the model on the meta device, shard it (FSDP2), then
materialise only this rank's shards, from a seeded initialisation or from the safetensors
files of ``model.pretrained``.

Building the whole model on every worker before sharding it costs a full fp32 copy per
worker in host memory: eight GPU workers of one node would hold eight copies of an 8B model
(8 x 32 GB). Here a worker allocates its own shards (``to_empty`` on its device) and fills
them a block of rows at a time, so its peak is its shards plus one block.

Initialisation does not depend on the world size: each parameter's values come from
generators seeded by the run's seed, the parameter's name and a block of 128 rows, so a
rank generates only the blocks its rows fall in, and every world size (and the unsharded
path, :func:`seeded_init_`) gives the same weights. The rule is Hugging Face's
``_init_weights`` for these families: linear and embedding weights ~ N(0, init_std), the
embedding's padding row and biases zero, norm weights one.

A pretrained model is read tensor slice by tensor slice (``safe_open(...).get_slice``):
a rank reads only the rows of its shards. Models that need more than loading (a vocabulary
resized for new tokens, LoRA adapters, a reward or value head) take the full path.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from typing import Dict, Iterator, Optional, Tuple

import torch

BLOCK_ROWS = 128


def _kind(module: torch.nn.Module, pname: str) -> str:
    if pname == "bias":
        return "zeros"
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        return "normal"
    return "ones"  # RMSNorm / LayerNorm weights


def _params(model: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Module, str, torch.nn.Parameter]]:
    """``(qualified name, owning module, local name, parameter)`` once per parameter (a tied
    one under its first name, as ``named_parameters`` gives it)."""
    seen = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{mname}.{pname}" if mname else pname), module, pname, p


def _rows(p: torch.Tensor) -> Tuple[int, int]:
    """The global rows ``[start, end)`` this rank holds of ``p`` (all of a plain tensor;
    FSDP2 shards dim 0 in ``torch.chunk`` pieces)."""
    n = p.shape[0] if p.dim() else 1
    if not hasattr(p, "device_mesh"):
        return 0, n
    (placement,) = p.placements
    if not placement.is_shard(0):
        raise ValueError(f"unexpected placement {placement} (FSDP2 shards dim 0)")
    mesh = p.device_mesh
    per = math.ceil(n / mesh.size())
    start = min(n, mesh.get_local_rank() * per)
    return start, min(n, start + per)


def _seed(seed: int, name: str, block: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + block) % (2 ** 63)


def _blocks(start: int, end: int, n: int) -> Iterator[Tuple[int, int, int]]:
    """``(block, lo, hi)``: the 128-row blocks of an ``n``-row tensor that rows ``[start, end)``
    touch, each clipped to those rows."""
    for b in range(start // BLOCK_ROWS, (end - 1) // BLOCK_ROWS + 1 if end > start else 0):
        yield b, max(start, b * BLOCK_ROWS), min(end, (b + 1) * BLOCK_ROWS, n)


def fill_rows_(dest: torch.Tensor, name: str, kind: str, shape: torch.Size, start: int, end: int,
               seed: int, std: float, padding_idx: Optional[int] = None) -> torch.Tensor:
    """Write rows ``[start, end)`` of parameter ``name``'s initial value into ``dest``
    (``end - start`` rows), a block at a time: the same values whoever asks for which rows,
    and never more than one block of temporary memory."""
    rest = tuple(shape[1:])
    if kind in ("ones", "zeros"):
        return dest.fill_(1.0 if kind == "ones" else 0.0)
    for b, lo, hi in _blocks(start, end, shape[0]):
        first = b * BLOCK_ROWS
        g = torch.Generator().manual_seed(_seed(seed, name, b))
        block = torch.randn((min(first + BLOCK_ROWS, shape[0]) - first,) + rest, generator=g)
        dest[lo - start:hi - start].copy_(block[lo - first:hi - first].mul_(std))
    if padding_idx is not None and start <= padding_idx < end:
        dest[padding_idx - start] = 0
    return dest


def init_rows(name: str, kind: str, shape: torch.Size, start: int, end: int, seed: int, std: float,
              padding_idx: Optional[int] = None) -> torch.Tensor:
    """Rows ``[start, end)`` of parameter ``name``'s initial value (fp32, CPU)."""
    out = torch.empty((end - start,) + tuple(shape[1:]))
    return fill_rows_(out, name, kind, shape, start, end, seed, std, padding_idx)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


@torch.no_grad()
def seeded_init_(model: torch.nn.Module, seed: int, std: float) -> None:
    """Initialise every parameter of ``model`` (plain or FSDP2-sharded, materialised) with
    the seeded rule: each rank fills only its rows."""
    for name, module, pname, p in _params(model):
        shape = p.shape if p.dim() else torch.Size([1])
        start, end = _rows(p)
        pad = getattr(module, "padding_idx", None) if isinstance(module, torch.nn.Embedding) else None
        local = _local(p)
        fill_rows_(local.view((end - start,) + tuple(shape[1:])), name, _kind(module, pname), shape, start, end,
                   seed, std, pad)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class _Safetensors:
    """The tensors of a local HF directory's safetensors files (one file, or a sharded set
    with its index), read row range by row range with plain reads into the destination:
    no memory map, so the file's pages are never counted in this worker's memory, and no
    code is ever loaded (the format is a JSON header and raw bytes)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{directory}: no model.safetensors (or index) to read shards from")
        self.entries: Dict[str, Tuple[str, int, Dict]] = {}  # name -> (path, data start, entry)
        for file in files:
            path = os.path.join(directory, file)
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    self.entries[name] = (path, 8 + size, entry)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def fill_rows_(self, dest: torch.Tensor, name: str, start: int, end: int) -> None:
        """Rows ``[start, end)`` of tensor ``name`` into ``dest`` (contiguous), a block at a time."""
        path, data, entry = self.entries[name]
        shape, dtype = list(entry["shape"]) or [1], _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"model.pretrained: {name} is {entry['dtype']}; readable: {', '.join(_DTYPES)}")
        if shape[1:] != list(dest.shape[1:]) or end > shape[0]:
            raise ValueError(f"model.pretrained: {name} is {shape} in the files, the model wants rows "
                             f"[{start}, {end}) of {[end - start, *dest.shape[1:]]}")
        row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        with open(path, "rb", buffering=0) as f:
            for _, lo, hi in _blocks(start, end, shape[0]):
                target = dest[lo - start:hi - start]
                direct = dtype == dest.dtype and dest.device.type == "cpu"  # else staged on the host
                buf = target if direct else torch.empty(target.shape, dtype=dtype)
                f.seek(data + entry["data_offsets"][0] + lo * row)
                view = memoryview(buf.view(torch.uint8).numpy()).cast("B")
                if f.readinto(view) != len(view):
                    raise ValueError(f"model.pretrained: {path} ends inside {name}")
                if buf is not target:
                    target.copy_(buf)


@torch.no_grad()
def load_shards_(model: torch.nn.Module, directory: str) -> None:
    """Fill every parameter of ``model`` (materialised, plain or sharded) with its rows from
    the safetensors files in ``directory`` (HF names, as ``AutoModelForCausalLM`` saves them)."""
    files = _Safetensors(directory)
    missing = [name for name, _, _, _ in _params(model) if name not in files]
    if missing:
        raise ValueError(f"model.pretrained: {directory} has no tensor for {missing[:3]} "
                         f"({len(missing)} missing)")
    for name, _, _, p in _params(model):
        start, end = _rows(p)
        shape = p.shape if p.dim() else torch.Size([1])
        files.fill_rows_(_local(p).view((end - start,) + tuple(shape[1:])), name, start, end)


def eligible(cfg, head: str, vocab_size: int) -> bool:
    """Whether this model can be built on the meta device (see the module's docstring)."""
    if not getattr(cfg, "meta_init", False) or head != "lm" or cfg.lora.rank:
        return False
    if cfg.pretrained:
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(os.path.expanduser(cfg.pretrained), local_files_only=True)
        return not (vocab_size and conf.vocab_size < vocab_size)  # a resize draws new rows
    return True


def build_meta(cfg, vocab_size: int, eos_id: int, pad_id: Optional[int]) -> torch.nn.Module:
    """The causal LM with its parameters on the meta device (no memory) and its buffers
    (rotary frequencies) real, on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from tidal.models.build import hf_config

    conf = hf_config(cfg, vocab_size, eos_id, pad_id)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32, attn_implementation="sdpa")
    model.tie_weights()  # tied embeddings: the patched constructors leave two meta tensors
    model.config.use_cache = False
    return model


def materialize_(model: torch.nn.Module, device: torch.device, cfg, seed: int) -> None:
    """Allocate this rank's shards on ``device`` and fill them (seeded, or from
    ``cfg.pretrained``); buffers keep the values they were built with."""
    buffers: Dict[str, torch.Tensor] = {n: b.detach().clone() for n, b in model.named_buffers()}
    first, ties = {}, []  # a parameter shared by two modules (tied embeddings) stays shared
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in first:
                ties.append((module, pname, *first[id(p)]))
            else:
                first[id(p)] = (module, pname)
    model.to_empty(device=device)
    for module, pname, owner, oname in ties:
        if getattr(module, pname) is not getattr(owner, oname):
            setattr(module, pname, getattr(owner, oname))
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    if cfg.pretrained:
        load_shards_(model, os.path.expanduser(cfg.pretrained))
    else:
        seeded_init_(model, seed, cfg.init_std)
