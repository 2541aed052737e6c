"""The worker loop, top to bottom: build state, restore, step, guard, report, checkpoint,
export.

Runs inside each Ray Train worker. Per-step metrics go to the driver through the metrics
hub (a small actor, fire-and-forget); ``ray.train.report`` is called only with checkpoints,
since it is a barrier across workers.

Fault tolerance lives here:
- restore from the newest *committed and verified* checkpoint of the run (never Ray's
  notion of "latest", which may be a save that a crash cut short);
- a checkpoint is committed by rank 0 after every rank's upload (see ``integrity``);
- divergence guards veto a bad update, roll back and skip the offending batches;
- a failure that repeats at the same step stops the run with a report instead of looping;
- Ray Train's preemption notice triggers an immediate checkpoint.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from tidal.config import fingerprint, to_dict
from tidal.config.redact import redact
from tidal.data.loader import GlobalSampleLoader
from tidal.data.prepare import load_manifest, tokenizer_path
from tidal.objectives import OBJECTIVES
from tidal.parallel import collectives as C
from tidal.train import checkpoint as ckpt
from tidal.train import integrity
from tidal.train import reference as R
from tidal.train.engine import build_engine, evaluate, train_step
from tidal.train.export import export_hf
from tidal.train.faults import Injector
from tidal.train.guards import DivergenceGuard


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


def _objective(name: str, cfg):
    if name == "dpo":
        d = cfg.dpo
        return OBJECTIVES[name](beta=d.beta, loss=d.loss, label_smoothing=d.label_smoothing)
    return OBJECTIVES[name]()


def _restore(engine, path: str) -> Dict:
    """Load ``path`` (verified in storage by rank 0) from this rank's copy of it, after
    checking the copy against the commit record: sizes, the signature, and the digests of
    the small files that say what to read (a shard swapped after the check is caught by
    its size, or is as good as any other data file)."""
    from ray.train import Checkpoint

    with Checkpoint(path).as_directory() as local:
        problems = integrity.verify(local, full=integrity.REQUIRED, copy=local != path)
        if problems:
            raise ValueError(f"checkpoint {path} changed after it was verified: {'; '.join(problems[:3])}")
        return ckpt.load(engine, local)


def _choose_checkpoint(rank: int, world: int, run_dir: str, resume_from: Optional[str]) -> Dict:
    """Rank 0 finds the newest committed, intact checkpoint (skipping damaged ones, with
    reasons); every rank gets the same answer."""
    out: Dict[str, Any] = {"path": None, "skipped": []}
    if rank == 0:
        out["path"], out["skipped"] = integrity.latest_valid(run_dir)
        if out["path"] is None and resume_from:
            problems = integrity.verify(resume_from)
            if problems:
                out["error"] = (f"run.resume_from: {resume_from} is not a committed, intact "
                                f"checkpoint: {'; '.join(problems[:5])}")
            else:
                out["path"] = resume_from
    out = C.broadcast(out, world)
    if out.get("error"):
        raise ValueError(out["error"])
    return out


class StopWatch:
    """Whether the driver asked the run to stop (e.g. a sweep's scheduler cut the trial):
    rank 0 polls the hub without blocking, and every rank learns the answer at the same
    step (one tiny all-reduce per step on multi-worker runs)."""

    def __init__(self, hub, rank: int, world: int, device: torch.device):
        self.hub, self.rank, self.world, self.device = hub, rank, world, device
        self.ref = None
        self.asked = False

    def __call__(self) -> bool:
        import ray

        if self.hub is not None and self.rank == 0 and not self.asked:
            if self.ref is None:
                self.ref = self.hub.stop_requested.remote()
            ready, _ = ray.wait([self.ref], timeout=0)
            if ready:
                self.asked = bool(ray.get(self.ref))
                self.ref = None
        return C.any_true(self.asked, self.world, self.device)


def _repeated_failure(hub, limit: int) -> Optional[str]:
    """When the last ``limit`` attempts of this run all died right after the same step."""
    import ray

    if hub is None or limit <= 0:
        return None
    attempts = ray.get(hub.attempts.remote())
    if len(attempts) < limit:
        return None
    recent = attempts[-limit:]
    lasts = {a["last_step"] for a in recent}
    if len(lasts) == 1:
        step = lasts.pop()
        return (f"the last {limit} attempts all failed at step {step + 1} (started from "
                f"steps {', '.join(str(a['start_step']) for a in recent)}): a repeating failure "
                f"(a bad batch or a bug) rather than lost machines; see the worker logs. "
                f"scaling.same_step_failures={limit} stopped the retries")
    return None


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    import ray.train

    cfg, data_dir, hub = config["cfg"], config["data_dir"], config.get("hub")
    run_dir = config["run_storage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("signed") and integrity.signing_key() is None:
        raise RuntimeError(f"{integrity.KEY_ENV} is set on the driver but not on this worker (rank "
                           f"{rank}): set it on every node, or pass it to the job with ray job "
                           "submit --runtime-env-json '{\"env_vars\": {...}}'")
    manifest = load_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"worker {rank}: no prepared data at {data_dir}; on several nodes "
                                "the data must be on shared storage (run.storage_path=s3://...)")
    samples = cfg.train.global_batch_tokens // cfg.data.seq_len
    if samples % world:
        raise ValueError(f"train.global_batch_tokens={cfg.train.global_batch_tokens} "
                         f"({samples} sequences) cannot be split over {world} workers")
    t = cfg.train
    # A failure that keeps repeating at one step ends the run cleanly, with a report.
    fatal = C.broadcast(_repeated_failure(hub, cfg.scaling.same_step_failures) if rank == 0 else None, world)
    if fatal:
        if hub is not None and rank == 0:
            hub.push.remote({"event": "fatal", "reason": fatal})
        return

    eos, pad = manifest["tokenizer"]["eos_token_id"], manifest["tokenizer"]["pad_token_id"]
    objective = _objective(config.get("objective", "lm"), cfg)
    engine = build_engine(cfg, manifest["tokenizer"]["vocab_size"], eos, pad, rank, world,
                          _device(config["use_gpu"]), head=getattr(objective, "head", "lm"))
    engine.extra["skipped"] = []
    engine.extra["sample_shape"] = manifest.get("sample_shape", [cfg.data.seq_len + 1])
    engine.objective = objective
    loader = GlobalSampleLoader(data_dir, manifest, t.seed, engine.global_batch)
    if getattr(objective, "needs_reference", False):
        objective.reference = R.build_reference(cfg, engine, manifest)
        if cfg.dpo.reference == "precompute":
            objective.table = R.precomputed(cfg, engine, objective.reference, loader,
                                                     run_dir, config["manifest_hash"], hub,
                                                     config.get("reference_digest"))
            objective.reference = None  # frees the frozen copy for the whole run
            import gc

            gc.collect()  # FSDP2's state holds reference cycles
            if engine.device.type == "cuda":
                torch.cuda.empty_cache()
    val = manifest["counts"]["val"]
    bytes_per_token = val["bytes"] / val["tokens"] if val.get("bytes") else None
    tok_dir = tokenizer_path(manifest, data_dir)
    meta = {"config_fingerprint": fingerprint(cfg), "data_manifest": config["manifest_hash"],
            "config": redact(to_dict(cfg))}
    injector = Injector(t.inject_faults, run_dir, rank)
    guard = DivergenceGuard(t.guard)
    saver = ckpt.Checkpointer(engine, run_dir, meta, tok_dir, injector, hub)

    chosen = _choose_checkpoint(rank, world, run_dir, cfg.run.resume_from)
    if chosen["path"] is not None:
        state = _restore(engine, chosen["path"])
        if state.get("data_manifest") not in (None, meta["data_manifest"]):
            raise ValueError(f"checkpoint {chosen['path']} was trained on other data (manifest "
                             f"{state['data_manifest'][:12]}, now {meta['data_manifest'][:12]}): "
                             "its data cursor would point at different samples")
    if hub is not None and rank == 0:
        for s in chosen["skipped"]:
            hub.push.remote({"event": "checkpoint_skipped", **s})
        hub.push.remote({"event": "start", "step": engine.step, "world_size": world,
                         "num_params": engine.num_params, "grad_accum": engine.grad_accum,
                         "trainable_params": engine.extra["trainable_params"],
                         "restored": chosen["path"] is not None, "checkpoint": chosen["path"],
                         "cursor": engine.cursor, "precision": engine.extra["precision"],
                         "val_samples": len(loader.val)})

    val_total, val_forwards = _eval_plan(engine, loader)
    end = t.stop_at_step or t.max_steps
    rollbacks = 0
    answered = None  # the preemption notice already answered with a checkpoint
    stop_asked = StopWatch(hub, rank, world, engine.device)
    while engine.step < end:
        if stop_asked():
            saver.wait()
            if hub is not None and rank == 0:
                hub.push.remote({"event": "stopped", "step": engine.step,
                                 "reason": "the driver asked the run to stop"})
            return
        nxt = engine.step + 1
        metrics = train_step(engine, list(loader.micro_batches(engine.cursor, rank, world,
                                                               t.micro_batch_size)),
                             guard=guard.check, loss_scale=injector.loss_scale(nxt))
        if "anomaly" in metrics:
            for kind in ("nan", "spike"):
                injector.fired(kind, nxt)
            rollbacks += 1
            if rollbacks > t.guard.max_rollbacks:
                if hub is not None and rank == 0:
                    hub.push.remote({"event": "fatal", "step": nxt, "reason": (
                        f"step {nxt}: {metrics['anomaly']}; train.guard.max_rollbacks="
                        f"{t.guard.max_rollbacks} rollbacks already made: the run is diverging "
                        "(lower optim.lr, raise warmup, or check the data)")})
                saver.wait()
                return
            _rollback(engine, saver, guard, rank, world, run_dir, metrics, hub)
            continue
        injector.maybe_kill("kill", engine.step)
        metrics["epoch"] = loader.epoch_of(engine.cursor)
        last = engine.step == end
        if val_total and (engine.step % t.eval_every == 0 or last):  # no val split: no val_*
            batches = loader.val_batches(val_total, rank, world, t.micro_batch_size)
            metrics.update(evaluate(engine, batches, val_forwards, bytes_per_token))
        if hub is not None and rank == 0:
            if engine.step % t.log_every == 0 or last or "val_loss" in metrics:
                hub.push.remote(metrics)
            else:
                hub.heartbeat.remote(engine.step)
        saver.poll()
        due = last or (t.checkpoint_every and engine.step % t.checkpoint_every == 0)
        if not due and cfg.scaling.preemption_check_every and \
                engine.step % cfg.scaling.preemption_check_every == 0:
            info = ray.train.get_preemption_info()  # a barrier: every rank asks together
            notice = None if info is None else (tuple(info.preempted_node_ids), info.deadline_ms)
            if notice is not None and notice != answered:  # one checkpoint per notice
                answered = notice
                due = True
                if hub is not None and rank == 0:
                    hub.push.remote({"event": "preemption", "step": engine.step,
                                     "nodes": info.preempted_node_ids,
                                     "deadline_ms": info.deadline_ms})
        if due:
            saver.save(metrics)
    saver.wait()
    if t.export_hf and (config.get("export_dir") or config.get("adapter_dir")):
        export_hf(engine.model, rank, tok_dir, config.get("export_dir"), config.get("adapter_dir"))
        if hub is not None and rank == 0:
            hub.push.remote({"event": "exported", "step": engine.step, "path": config.get("export_dir"),
                             "adapter": config.get("adapter_dir")})


def _rollback(engine, saver: ckpt.Checkpointer, guard: DivergenceGuard, rank: int, world: int,
              run_dir: str, metrics: Dict, hub) -> None:
    """Back to the last committed checkpoint, then past the batches that led to the anomaly."""
    saver.wait()
    bad_step, bad_end = metrics["step"], engine.cursor + engine.global_batch
    path = C.broadcast(integrity.latest_valid(run_dir)[0] if rank == 0 else None, world)
    skipped: List = list(engine.extra.get("skipped", []))
    if path is not None:
        _restore(engine, path)  # model, optimizer, step, cursor, RNG as they were
    window = [engine.cursor, bad_end]  # global sample positions never trained on
    engine.cursor = bad_end
    engine.extra["skipped"] = skipped + [window]
    guard.reset()
    if hub is not None and rank == 0:
        hub.push.remote({"event": "rollback", "step": bad_step, "reason": metrics["anomaly"],
                         "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                         "to_step": engine.step, "checkpoint": path,
                         "skipped_samples": window, "skipped_batches": (window[1] - window[0])
                         // engine.global_batch})
