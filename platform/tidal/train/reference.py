"""DPO's precomputed reference: one pass of the reference model over every pair before
training (``dpo.reference=precompute``), so that no reference model stays in memory while
the policy trains.

Per sample it keeps the reference's summed log-prob and labelled-token count for the chosen
and the rejected reply. The table is written to ``<run>/reference_logps/`` (arrays first,
``meta.json`` last) and reused by every restart of the run whose data and starting model
match; lookups are by the sample's content, so they are independent of order, world size
and resizes.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from tidal.config import to_dict
from tidal.data import io as tio
from tidal.objectives.batch import to_batch
from tidal.parallel import collectives as C

META = "meta.json"


def sample_key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.int64).tobytes(), digest_size=12).digest()


class ReferenceTable:
    """Sample content -> ``(logp_chosen, logp_rejected, tokens_chosen, tokens_rejected)``."""

    def __init__(self, rows: Dict[bytes, Tuple[float, float, float, float]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, samples: np.ndarray, device: torch.device) -> torch.Tensor:
        """``[B, 4]`` float64 for pair samples ``[B, 4, L]`` (as prepared)."""
        out = []
        for row in samples:
            if not row.any():  # a zero-weight padding sample (a rank without val samples)
                out.append((0.0, 0.0, 0.0, 0.0))
                continue
            hit = self.rows.get(sample_key(row))
            if hit is None:
                raise KeyError("a pair sample is missing from the precomputed reference "
                               "log-probs (the data changed after they were computed?)")
            out.append(hit)
        return torch.tensor(out, dtype=torch.float64, device=device)


def _split_batches(samples, rank: int, world: int, micro: int) -> Tuple[Iterator, int]:
    idx = np.arange(len(samples))[rank::world]
    per_rank = math.ceil(len(samples) / world)
    num = math.ceil(per_rank / micro) if per_rank else 0

    def it():
        for i in range(0, len(idx), micro):
            yield samples.take(idx[i:i + micro])
    return it(), num


@torch.no_grad()
def compute(reference, loader, rank: int, world: int, micro: int, device: torch.device,
            logps_fn) -> Dict[bytes, Tuple[float, float, float, float]]:
    """Every rank scores its share of train and val samples; all ranks get the whole table.
    Each rank runs the same number of forwards (FSDP all-gathers are collectives)."""
    mine = []
    for split in (loader.train, loader.val):
        batches, num = _split_batches(split, rank, world, micro)
        last = None
        for _ in range(num):
            mb = next(batches, None)
            real = mb is not None
            mb = mb if real else (last if last is not None else split.take(np.array([0])))
            last = mb
            sums, counts = logps_fn(reference, to_batch("pairs", mb, device))
            if real:
                for row, s, c in zip(mb, sums.tolist(), counts.tolist()):
                    mine.append((sample_key(row), (s[0], s[1], c[0], c[1])))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    return {k: v for part in parts for k, v in part}


def save(root: str, table: Dict, meta: Dict) -> None:
    if tio.exists(tio.join(root, META)):  # never let an old marker vouch for new arrays
        tio.remove(tio.join(root, META))
    keys = np.frombuffer(b"".join(table), dtype=np.uint8).reshape(len(table), 12)
    vals = np.asarray(list(table.values()), dtype=np.float64).reshape(len(table), 4)
    tio.save_npy(tio.join(root, "keys.npy"), keys)
    tio.save_npy(tio.join(root, "values.npy"), vals)
    tio.write_bytes(tio.join(root, META), json.dumps(meta, indent=2).encode())  # last: marks it done


def load(root: str, meta: Dict) -> Optional[Dict]:
    """The saved table when it was computed for the same data and starting model."""
    path = tio.join(root, META)
    if not tio.exists(path):
        return None
    if json.loads(tio.read_bytes(path)) != meta:
        return None
    keys = np.asarray(tio.load_npy(tio.join(root, "keys.npy")))
    vals = np.asarray(tio.load_npy(tio.join(root, "values.npy")))
    return {bytes(k): tuple(v) for k, v in zip(keys, vals.tolist())}


def build_reference(cfg, engine, manifest):
    """The frozen starting model (DPO's reference), sharded like the policy, no gradients.
    With LoRA it is the policy's own base with the adapters switched off."""
    if engine.lora:
        from tidal.models.lora import AdaptersOff

        return AdaptersOff(engine.model)
    from tidal.models import build_model
    from tidal.parallel import apply as apply_fsdp
    from tidal.parallel import make_mesh

    tk = manifest["tokenizer"]
    ref = build_model(cfg.model, tk["vocab_size"], tk["eos_token_id"], tk["pad_token_id"], cfg.train.seed)
    ref.to(engine.device)
    ref.requires_grad_(False)
    apply_fsdp(ref, make_mesh(engine.device.type, engine.world), engine.precision)
    return ref.eval()


def precomputed(cfg, engine, reference, loader, run_dir: str, manifest_hash: str, hub,
                           reference_digest: Optional[str]):
    """The reference's log-probs for every pair, computed once per run (and reused by its
    restarts); see ``tidal.train.reference``."""
    from tidal.objectives.preference import reference_sums

    root = tio.join(run_dir, "reference_logps")
    meta = {"data_manifest": manifest_hash, "model": to_dict(cfg.model), "seed": cfg.train.seed,
            "reference_weights": reference_digest}
    rank, world = engine.rank, engine.world
    table = C.broadcast(load(root, meta) is not None if rank == 0 else None, world)
    t0 = time.perf_counter()
    if table:
        rows = load(root, meta)
    else:
        rows = compute(reference, loader, rank, world, cfg.train.micro_batch_size, engine.device,
                         reference_sums)
        if rank == 0:
            save(root, rows, meta)
        C.barrier(world)
    if hub is not None and rank == 0:
        hub.push.remote({"event": "reference_precomputed", "pairs": len(rows), "reused": bool(table),
                         "seconds": round(time.perf_counter() - t0, 2), "path": root})
    return ReferenceTable(rows)
