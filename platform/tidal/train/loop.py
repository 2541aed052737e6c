"""The shard loop: a stage that reads prepared shards (pretraining, SFT, reward modelling,
DPO), top to bottom: build the engine and the batch source, restore, then per step train,
guard, evaluate, report and checkpoint; export at the end.

Everything that is not about this loop (restore, checkpoints and their commit, reporting,
guards and rollback, preemption, the driver's stop request, fault drills) is the worker
context's (``tidal.train.worker``), which the RL learner loop shares.
"""
from __future__ import annotations

import time
from typing import Any, Dict

import numpy as np
import torch

from tidal import stages
from tidal.config import fingerprint, to_dict
from tidal.config.redact import redact
from tidal.data.loader import GlobalSampleLoader
from tidal.data.prepare import load_manifest, tokenizer_path
from tidal.objectives.batch import to_batch
from tidal.train import reference as R
from tidal.train.engine import build_engine, evaluate, train_step
from tidal.train.export import export_hf
from tidal.train.source import ShardSource
from tidal.train.worker import WorkerContext


def _eval_plan(engine, loader: GlobalSampleLoader) -> tuple[int, int]:
    """(validation samples, forwards per rank): fixed by config, not by world size."""
    micro = engine.spec.train.micro_batch_size
    total = min(len(loader.val), engine.spec.train.eval_batches * engine.global_batch)
    per_rank = -(-total // engine.world)
    return total, max(1, -(-per_rank // micro))


def _shard_source(ctx: WorkerContext, engine, objective, manifest: Dict, data_dir: str) -> ShardSource:
    """The source of prepared samples as batches for ``objective``; DPO's reference is set
    up here (a frozen copy, or its log-probs precomputed once and looked up per batch)."""
    cfg, config = ctx.cfg, ctx.config
    loader = GlobalSampleLoader(data_dir, manifest, cfg.train.seed, engine.global_batch)
    table = None
    if getattr(objective, "needs_reference", False):
        objective.reference = R.build_reference(cfg, engine, manifest)
        if cfg.dpo.reference == "precompute":
            table = R.precomputed(cfg, engine, objective.reference, loader, ctx.run_dir,
                                  config["manifest_hash"], ctx.hub, config.get("reference_digest"))
            objective.reference = None  # frees the frozen copy for the whole run
            import gc

            gc.collect()  # FSDP2's state holds reference cycles
            if engine.device.type == "cuda":
                torch.cuda.empty_cache()

    def make_batch(samples):
        batch = to_batch(objective.data_kind, samples, engine.device, manifest["tokenizer"]["pad_token_id"])
        if table is not None:
            batch["ref_logps"] = table.lookup(samples, engine.device)
        return batch

    return ShardSource(loader, make_batch)


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    ctx = WorkerContext.open(config)
    if ctx is None:
        return
    cfg, data_dir, rank, world = ctx.cfg, config["data_dir"], ctx.rank, ctx.world
    manifest = load_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"worker {rank}: no prepared data at {data_dir}; on several nodes "
                                "the data must be on shared storage (run.storage_path=s3://...)")
    samples = cfg.train.global_batch_tokens // cfg.data.seq_len
    if samples % world:
        raise ValueError(f"train.global_batch_tokens={cfg.train.global_batch_tokens} "
                         f"({samples} sequences) cannot be split over {world} workers")
    t, tk = cfg.train, manifest["tokenizer"]
    objective = stages.get(config["stage"]).objective.from_config(cfg)
    engine = build_engine(cfg, tk["vocab_size"], tk["eos_token_id"], tk["pad_token_id"], rank, world,
                          ctx.device, head=objective.head)
    engine.objective = objective
    source = _shard_source(ctx, engine, objective, manifest, data_dir)
    shape = manifest.get("sample_shape", [cfg.data.seq_len + 1])
    blank = lambda: source.make_batch(np.zeros((1, *shape), dtype=np.int64))  # noqa: E731 - a rank without val samples
    val = manifest["counts"]["val"]
    bytes_per_token = val["bytes"] / val["tokens"] if val.get("bytes") else None
    tok_dir = tokenizer_path(manifest, data_dir)
    ctx.attach(engine, source, {"config_fingerprint": fingerprint(cfg), "data_manifest": config["manifest_hash"],
                                "config": redact(to_dict(cfg))}, tok_dir)
    ctx.restore(val_samples=len(source.loader.val))

    val_total, val_forwards = _eval_plan(engine, source.loader)
    end = t.stop_at_step or t.max_steps
    while engine.step < end:
        if ctx.stop_requested():
            return
        t0 = time.perf_counter()
        batches = source.batches(rank, world, t.micro_batch_size)
        waited = time.perf_counter() - t0  # the step waited this long for its data
        metrics = train_step(engine, batches, guard=ctx.guard.check,
                             loss_scale=ctx.injector.loss_scale(engine.step + 1))
        metrics.update(data_wait_s=waited, guard_rollbacks=ctx.rollbacks)
        if "anomaly" in metrics:
            if not ctx.recover(metrics):
                return
            continue
        source.advance()
        ctx.injector.maybe_kill("kill", engine.step)
        metrics["epoch"] = source.epoch()
        last = engine.step == end
        if val_total and (engine.step % t.eval_every == 0 or last):  # no val split: no val_*
            batches = source.val_batches(val_total, rank, world, t.micro_batch_size)
            metrics.update(evaluate(engine, batches, val_forwards, bytes_per_token, blank))
        ctx.report(metrics, last)
        ctx.checkpoint_if_due(metrics, last)
    ctx.finish()
    if t.export_hf and (config.get("export_dir") or config.get("adapter_dir")):
        export_hf(engine.model, rank, tok_dir, config.get("export_dir"), config.get("adapter_dir"))
        ctx.emit({"event": "exported", "step": engine.step, "path": config.get("export_dir"),
                  "adapter": config.get("adapter_dir")})
