"""The worker context: what every learner loop on Ray Train shares.

A loop (the shard loop in ``tidal.train.loop``; the RL learner loop) builds its engine and
batch source, then leans on a :class:`WorkerContext` for everything that is not its own
business: who this rank is, restoring the newest committed checkpoint, reporting to the
driver, checkpointing (and committing), divergence guards and rollback, preemption notices,
the driver's stop request, and fault drills.

Per-step metrics go to the driver through the metrics hub (a small actor, fire-and-forget);
``ray.train.report`` is called only with checkpoints, since it is a barrier across workers.
Fault tolerance lives here:

- restore from the newest *committed and verified* checkpoint of the run (never Ray's
  notion of "latest", which may be a save that a crash cut short);
- a checkpoint is committed by rank 0 after every rank's upload (see ``integrity``);
- divergence guards veto a bad update, roll back and skip the offending batches;
- a failure that repeats at the same step stops the run with a report instead of looping;
- Ray Train's preemption notice triggers an immediate checkpoint.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from tidal.optim.optimizers import state_bytes_per_param
from tidal.parallel import collectives as C
from tidal.train import checkpoint as ckpt
from tidal.train import integrity
from tidal.train.faults import Injector
from tidal.train.guards import DivergenceGuard


def device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def choose_checkpoint(rank: int, world: int, run_dir: str, resume_from: Optional[str]) -> Dict:
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


def restore(engine, path: str, source, stage=None) -> Dict:
    """Load ``path`` (verified in storage by rank 0) into the engine and the source from
    this rank's copy of it, after checking the copy against the commit record: sizes, the
    signature, and the digests of the small files that say what to read (a shard swapped
    after the check is caught by its size, or is as good as any other data file)."""
    from ray.train import Checkpoint

    with Checkpoint(path).as_directory() as local:
        problems = integrity.verify(local, full=integrity.REQUIRED, copy=local != path)
        if problems:
            raise ValueError(f"checkpoint {path} changed after it was verified: {'; '.join(problems[:3])}")
        state = ckpt.load(engine, local)
    if source.name not in state["states"]:
        raise ValueError(f"checkpoint {path} holds no '{source.name}' state (it has "
                         f"{', '.join(sorted(state['states']))}): it was not written by a training "
                         "run of this kind, so where its data stopped is unknown")
    source.load_state_dict(state["states"][source.name])
    if stage is not None and "stage" in state["states"]:
        stage.load_state_dict(state["states"]["stage"])
    return state


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


def repeated_failure(hub, limit: int) -> Optional[str]:
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


class WorkerContext:
    """One Ray Train worker's run services. ``open`` says who this rank is (and stops a
    crash loop before any work); ``attach`` hands it the engine, the batch source and the
    checkpoint metadata; ``restore`` loads the newest committed checkpoint into both; then,
    each step, the loop calls ``stop_requested``, ``recover`` (after a vetoed update),
    ``report`` and ``checkpoint_if_due``, and ``finish`` at the end."""

    def __init__(self, config: Dict[str, Any], rank: int, world: int):
        self.config, self.rank, self.world = config, rank, world
        self.cfg, self.hub, self.run_dir = config["cfg"], config.get("hub"), config["run_storage"]
        self.injector = Injector(self.cfg.train.inject_faults, self.run_dir, rank)
        self.guard = DivergenceGuard(self.cfg.train.guard)
        self.device = device(config["use_gpu"])
        self.engine = self.source = self.saver = None
        self.rollbacks = 0
        self.answered = None  # the preemption notice already answered with a checkpoint

    @classmethod
    def open(cls, config: Dict[str, Any]) -> Optional["WorkerContext"]:
        """This worker's context, or None when the run must not go on (its last attempts
        all failed at the same step: a ``fatal`` event says why)."""
        import ray.train

        tctx = ray.train.get_context()
        rank, world = tctx.get_world_rank(), tctx.get_world_size()
        if config.get("signed") and integrity.signing_key() is None:
            raise RuntimeError(f"{integrity.KEY_ENV} is set on the driver but not on this worker "
                               f"(rank {rank}): set it on every node, or pass it to the job with ray "
                               "job submit --runtime-env-json '{\"env_vars\": {...}}'")
        ctx = cls(config, rank, world)
        limit = ctx.cfg.scaling.same_step_failures
        fatal = C.broadcast(repeated_failure(ctx.hub, limit) if rank == 0 else None, world)
        if fatal:
            ctx.emit({"event": "fatal", "reason": fatal})
            return None
        return ctx

    def emit(self, record: Dict) -> None:
        """A metrics record or an event to the driver (rank 0 speaks for the run)."""
        if self.hub is not None and self.rank == 0:
            self.hub.push.remote(record)

    def attach(self, engine, source, meta: Dict, tok_dir: Optional[str],
               count: Optional[Callable[[], int]] = None, stage=None) -> None:
        """``count``: the run's progress counter, which the cadences (logging,
        checkpoints) and the driver's step column follow; optimizer steps by default (an RL
        run counts iterations, each of which may hold several optimizer steps). ``stage``:
        the stage's own state (``state_dict``/``load_state_dict``, JSON values, e.g. RL's KL
        controller), checkpointed as the ``stage`` named state and restored with the rest."""
        self.engine, self.source, self.stage, self.meta = engine, source, stage, meta
        self.count = count or (lambda: engine.step)

        def states() -> Dict:
            return {source.name: source.state_dict(), **({"stage": stage.state_dict()} if stage else {})}

        self.saver = ckpt.Checkpointer(engine, self.run_dir, meta, tok_dir, self.injector, self.hub,
                                       states=states, count=self.count)
        self.stop_watch = StopWatch(self.hub, self.rank, self.world, engine.device)

    def restore(self, **start_facts) -> Optional[str]:
        """Load the newest committed checkpoint (or ``run.resume_from``) into the engine and
        the source; report the start. Returns the checkpoint's path, if any."""
        chosen = choose_checkpoint(self.rank, self.world, self.run_dir, self.cfg.run.resume_from)
        if chosen["path"] is not None:
            state = restore(self.engine, chosen["path"], self.source, self.stage)
            if state.get("data_manifest") not in (None, self.meta["data_manifest"]):
                raise ValueError(f"checkpoint {chosen['path']} was trained on other data (manifest "
                                 f"{state['data_manifest'][:12]}, now {self.meta['data_manifest'][:12]}): "
                                 "its data position would point at different samples")
        for s in chosen["skipped"]:
            self.emit({"event": "checkpoint_skipped", **s})
        e = self.engine
        self.emit({"event": "start", "step": self.count(), "world_size": self.world,
                   "num_params": e.num_params, "grad_accum": e.grad_accum,
                   "trainable_params": e.trainable_params,
                   "optim_state_bytes_per_param": state_bytes_per_param(e.model.parameters(),
                                                                        e.spec.optim.name),
                   "restored": chosen["path"] is not None, "checkpoint": chosen["path"],
                   **self.source.state_dict(), "precision": e.precision, **start_facts})
        return chosen["path"]

    def stop_requested(self) -> bool:
        """The driver asked the run to stop: the pending checkpoint is finished first."""
        if not self.stop_watch():
            return False
        self.saver.wait()
        self.emit({"event": "stopped", "step": self.count(),
                   "reason": "the driver asked the run to stop"})
        return True

    def recover(self, metrics: Dict) -> bool:
        """After the guard vetoed an update: roll back to the last committed checkpoint and
        past the batches that led to the anomaly. False when the rollbacks are used up (the
        run stops with a ``fatal`` event)."""
        nxt, limit = metrics["step"], self.cfg.train.guard.max_rollbacks
        for kind in ("nan", "spike"):
            self.injector.fired(kind, nxt)
        self.rollbacks += 1
        if self.rollbacks > limit:
            self.emit({"event": "fatal", "step": nxt, "reason": (
                f"step {nxt}: {metrics['anomaly']}; train.guard.max_rollbacks={limit} rollbacks "
                "already made: the run is diverging (lower optim.lr, raise warmup, or check the data)")})
            self.saver.wait()
            return False
        self.saver.wait()
        before = self.source.state_dict()
        path = C.broadcast(integrity.latest_valid(self.run_dir)[0] if self.rank == 0 else None, self.world)
        if path is not None:
            restore(self.engine, path, self.source, self.stage)  # model, optimizer, step, data position, RNG
        skipped = self.source.skip_failed(before)  # what is never trained on
        self.guard.reset()
        self.emit({"event": "rollback", "step": nxt, "reason": metrics["anomaly"],
                   "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                   "to_step": self.count(), "checkpoint": path, **skipped})
        return True

    def report(self, metrics: Dict, last: bool) -> None:
        step, every = self.count(), self.cfg.train.log_every
        if step % every == 0 or last or "val_loss" in metrics:
            self.emit(metrics)
        elif self.hub is not None and self.rank == 0:
            self.hub.heartbeat.remote(step)

    def checkpoint_if_due(self, metrics: Dict, last: bool) -> None:
        """Commit a finished async save; checkpoint at the cadence, at the end, and once per
        preemption notice."""
        import ray.train

        self.saver.poll()
        step, t, s = self.count(), self.cfg.train, self.cfg.scaling
        due = last or (t.checkpoint_every and step % t.checkpoint_every == 0)
        if not due and s.preemption_check_every and step % s.preemption_check_every == 0:
            info = ray.train.get_preemption_info()  # a barrier: every rank asks together
            notice = None if info is None else (tuple(info.preempted_node_ids), info.deadline_ms)
            if notice is not None and notice != self.answered:  # one checkpoint per notice
                self.answered = notice
                due = True
                self.emit({"event": "preemption", "step": step, "nodes": info.preempted_node_ids,
                           "deadline_ms": info.deadline_ms})
        if due:
            self.saver.save(metrics)

    def finish(self) -> None:
        self.saver.wait()
