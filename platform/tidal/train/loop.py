"""The worker loop, top to bottom: build state, restore, step, report, checkpoint, export.

Runs inside each Ray Train worker. Per-step metrics go to the driver through the metrics
hub (a small actor, fire-and-forget); ``ray.train.report`` is called only with checkpoints,
since it is a barrier across workers.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict

import torch

from tidal.config import fingerprint
from tidal.data.loader import GlobalSampleLoader
from tidal.data.prepare import load_manifest, tokenizer_path
from tidal.train import checkpoint as ckpt
from tidal.train.engine import build_engine, evaluate, train_step
from tidal.train.export import export_hf


def _device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _eval_plan(engine, loader: GlobalSampleLoader) -> tuple[int, int]:
    """(validation samples, forwards per rank): fixed by config, not by world size."""
    micro = engine.cfg.train.micro_batch_size
    total = min(len(loader.val), engine.cfg.train.eval_batches * engine.global_batch)
    per_rank = -(-total // engine.world)
    return total, max(1, -(-per_rank // micro))


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    import ray.train
    from ray.train import Checkpoint

    cfg, data_dir, hub = config["cfg"], config["data_dir"], config.get("hub")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    manifest = load_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"worker {rank}: no prepared data at {data_dir}; on several nodes "
                                "the data must be on shared storage (run.storage_path=s3://...)")
    per_step = world * cfg.train.micro_batch_size
    if (cfg.train.global_batch_tokens // cfg.data.seq_len) % per_step:
        raise ValueError(f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not "
                         f"divisible into {world} workers x {cfg.train.micro_batch_size} sequences "
                         f"of {cfg.data.seq_len} tokens")
    eos, pad = manifest["tokenizer"]["eos_token_id"], manifest["tokenizer"]["pad_token_id"]
    engine = build_engine(cfg, manifest["tokenizer"]["vocab_size"], eos, pad, rank, world,
                          _device(config["use_gpu"]))
    loader = GlobalSampleLoader(data_dir, manifest, cfg.train.seed, engine.global_batch)
    val = manifest["counts"]["val"]
    bytes_per_token = val["bytes"] / val["tokens"] if val.get("bytes") else None
    tok_dir = tokenizer_path(manifest, data_dir)
    meta = {"config_fingerprint": fingerprint(cfg), "data_manifest": config["manifest_hash"]}

    # The run's own latest checkpoint wins (a restart after a failure, or a relaunch with the
    # same run name); run.resume_from only seeds a run that has none yet.
    restored = ray.train.get_checkpoint()
    if restored is None and cfg.run.resume_from:
        restored = Checkpoint(cfg.run.resume_from)
    if restored is not None:
        with restored.as_directory() as path:
            state = ckpt.load(engine, path)
        if state.get("data_manifest") not in (None, meta["data_manifest"]):
            raise ValueError(f"checkpoint {restored.path} was trained on other data (manifest "
                             f"{state['data_manifest'][:12]}, now {meta['data_manifest'][:12]}): "
                             "its data cursor would point at different samples")
    if hub is not None and rank == 0:
        hub.push.remote({"event": "start", "step": engine.step, "world_size": world,
                         "num_params": engine.num_params, "grad_accum": engine.grad_accum,
                         "restored": restored is not None, "precision": engine.extra["precision"]})

    t = cfg.train
    val_total, val_forwards = _eval_plan(engine, loader)
    end = t.stop_at_step or t.max_steps
    while engine.step < end:
        metrics = train_step(engine, list(loader.micro_batches(engine.cursor, rank, world,
                                                               t.micro_batch_size)))
        metrics["epoch"] = loader.epoch_of(engine.cursor)
        last = engine.step == end
        if engine.step % t.eval_every == 0 or last:
            batches = loader.val_batches(val_total, rank, world, t.micro_batch_size)
            metrics.update(evaluate(engine, batches, val_forwards, bytes_per_token))
        if hub is not None and rank == 0 and (engine.step % t.log_every == 0 or last
                                              or "val_loss" in metrics):
            hub.push.remote(metrics)
        if last or (t.checkpoint_every and engine.step % t.checkpoint_every == 0):
            with tempfile.TemporaryDirectory(prefix="tidal-ckpt-") as tmp:
                ckpt.save(engine, tmp, meta, tok_dir)
                ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                 checkpoint=Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_{engine.step:07d}")
    if t.export_hf and config.get("export_dir"):
        export_hf(engine.model, rank, tok_dir, config["export_dir"])
        if hub is not None and rank == 0:
            hub.push.remote({"event": "exported", "step": engine.step, "path": config["export_dir"]})
