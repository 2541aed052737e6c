"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint directory holds the DCP shards of the model and optimizer (each rank writes
its own ``__<rank>_0.distcp``; rank 0 the ``.metadata``), ``trainer_state.json`` (step,
loader cursor, tokens seen, world size, fingerprints) and per-rank RNG states. Everything
loads with ``weights_only`` semantics (``safe_dcp``): tensors, numbers and JSON, never
pickled objects; callers verify the commit record first (``integrity``).
DCP reshards on load, so a checkpoint written by N workers loads into M.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tidal.data import io as tio
from tidal.parallel import collectives as C
from tidal.train import integrity, safe_dcp
from tidal.train.engine import Engine

STATE_FILE = "trainer_state.json"
FORMAT = 2  # named states (engine, source, stage); format 1 kept cursor/skipped at the top
HF_META = "hf_meta"  # config.json + tokenizer: makes a checkpoint exportable on its own


def _rng_state(device: torch.device) -> Dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _model_optim_state(engine: Engine):
    """Model and optimizer state dicts; with LoRA only the trainable tensors (the adapters):
    the frozen base is the ``model.pretrained`` directory, not part of the run's state."""
    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
    if engine.lora:
        keep = set(engine.trainable_names)
        model_sd = {k: v for k, v in model_sd.items() if k in keep}
    return model_sd, optim_sd


def _dcp_state(engine: Engine) -> Dict:
    """What DCP writes and reads: the engine's model and optimizer, and each companion
    engine's (PPO's value model) under its name."""
    model_sd, optim_sd = _model_optim_state(engine)
    state = {"model": model_sd, "optim": optim_sd}
    for name, other in engine.companions.items():
        m, o = _model_optim_state(other)
        state[name] = {"model": m, "optim": o}
    return state


def _counters(engine: Engine) -> Dict:
    return {"step": engine.step, "tokens_seen": engine.tokens_seen}


def save(engine: Engine, path: str, meta: Dict, tokenizer_dir: Optional[str] = None,
         async_group=None, states: Optional[Dict[str, Dict]] = None):
    """Write this rank's part of the checkpoint into ``path`` (a per-rank local dir is fine:
    Ray Train merges the workers' directories in storage). With ``async_group`` (a process
    group of its own, so that the writer thread's collectives never interleave with
    training's) the shards are staged in memory and written by a background thread: the
    returned future completes when they are on disk. Otherwise returns None when done.
    ``states`` are the other named states of the run (``source``: the data position;
    ``stage``: a stage's own, e.g. a KL controller), JSON values kept beside the engine's."""
    os.makedirs(path, exist_ok=True)
    sd = _dcp_state(engine)
    future = None
    if async_group is not None:
        future = dcp.async_save(sd, checkpoint_id=path,
                                process_group=async_group if async_group is not True else None,
                                no_dist=async_group is True)
    else:
        dcp.save(sd, checkpoint_id=path)
    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    torch.save(_rng_state(engine.device), os.path.join(path, "rng", f"rank_{engine.rank}.pt"))
    if engine.rank == 0:
        named = {"engine": _counters(engine), **{f"{k}_engine": _counters(c) for k, c in engine.companions.items()},
                 **(states or {})}
        state = {"format": FORMAT, "step": engine.step, "tokens_seen": engine.tokens_seen,
                 "world_size": engine.world, "states": named, **meta}
        if "source" in named:  # format 1's fields, for readers that predate named states
            state.update(cursor=named["source"].get("cursor"), skipped=named["source"].get("skipped", []))
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
        hf_meta = os.path.join(path, HF_META)
        engine.model.config.save_pretrained(hf_meta)
        for name, other in engine.companions.items():  # e.g. PPO's value model: exportable too
            other.model.config.save_pretrained(f"{hf_meta}_{name}")
        if tokenizer_dir:
            for name in os.listdir(tokenizer_dir):
                shutil.copy2(os.path.join(tokenizer_dir, name), hf_meta)
    return future


def read_state(path: str) -> Dict:
    """``trainer_state.json``, with format 1 (cursor and skipped windows at the top level)
    read as named states."""
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    if "states" not in state:
        state["states"] = {"engine": {"step": state["step"], "tokens_seen": state["tokens_seen"]},
                           "source": {"cursor": state.get("cursor", 0),
                                      "skipped": state.get("skipped", [])}}
    return state


def load(engine: Engine, path: str) -> Dict:
    """Restore model, optimizer, step counters and (when the rank existed) RNG from
    ``path``; returns the trainer state, whose ``states`` the caller hands to the source
    and the stage."""
    state = _dcp_state(engine)
    meta = read_state(path)
    missing = [k for k in engine.companions if f"{k}_engine" not in meta["states"]]
    if missing:
        raise ValueError(f"checkpoint {path} holds no {', '.join(missing)} model: it was written by a "
                         "run without one (e.g. another RL algorithm), so it cannot resume this run")
    safe_dcp.load(state, path)
    for name, e in (("", engine), *engine.companions.items()):
        part = state[name] if name else state
        set_state_dict(e.model, e.optimizer, model_state_dict=part["model"], optim_state_dict=part["optim"],
                       options=StateDictOptions(strict=not e.lora))
        counters = meta["states"][f"{name}_engine" if name else "engine"]
        e.step, e.tokens_seen = counters["step"], counters["tokens_seen"]
    rng_file = os.path.join(path, "rng", f"rank_{engine.rank}.pt")
    if os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and engine.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], engine.device)
    else:  # a new rank after a resize: derive its stream from the seed and the step
        torch.manual_seed(engine.spec.train.seed * 1_000_003 + engine.step * 101 + engine.rank)
    return meta


class Checkpointer:
    """Saves (sync or async), uploads through ``ray.train.report``, commits, prunes.
    Checkpoints are named by ``count``, the run's progress counter (optimizer steps by
    default; an RL run's iterations, which need not move the optimizer step one for one)."""

    def __init__(self, engine, run_dir: str, meta: Dict, tok_dir: str, injector, hub,
                 states: Optional[Callable[[], Dict[str, Dict]]] = None,
                 count: Optional[Callable[[], int]] = None):
        self.engine, self.run_dir, self.meta, self.tok_dir = engine, run_dir, meta, tok_dir
        self.count = count or (lambda: engine.step)
        self.states = states or dict  # the run's other named states at save time
        self.injector, self.hub = injector, hub
        self.keep = engine.spec.train.keep_checkpoints
        self.pending: Optional[tuple] = None
        self.group = None
        if engine.spec.train.async_checkpoint:
            # the writer thread gets a process group of its own (gloo: it moves host memory)
            self.group = dist.new_group(backend="gloo") if C.distributed(engine.world) else True
        self.last_saved = -1

    def save(self, metrics: Dict) -> None:
        """Checkpoint the current step (collective). Sync: write, digest, upload, commit.
        Async: stage the shards in memory and return; a background thread writes and digests
        them, and a later ``poll`` uploads and commits once every rank is done."""
        self.wait()
        e = self.engine
        t0 = time.perf_counter()
        step = self.count()
        name = integrity.checkpoint_name(step)
        target = tio.join(self.run_dir, name)
        if e.rank == 0 and tio.exists(target):  # an earlier attempt's unfinished save
            tio.remove_tree(target)
        C.barrier(e.world)
        tmp = tempfile.mkdtemp(prefix="tidal-ckpt-")
        future = save(e, tmp, self.meta, self.tok_dir, async_group=self.group, states=self.states())
        self.last_saved = step
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if future is None:
            integrity.write_rank_manifest(tmp, e.rank)
            self._finish(step, name, tmp, scalars, time.perf_counter() - t0, False)
            return
        done = threading.Event()

        def write_and_digest():
            try:
                future.result()
                integrity.write_rank_manifest(tmp, e.rank)
            finally:
                done.set()

        threading.Thread(target=write_and_digest, daemon=True).start()
        self.pending = (step, name, tmp, future, scalars, done, time.perf_counter() - t0)

    def poll(self) -> None:
        """Commit a finished async save (collective: every rank must have finished writing)."""
        if self.pending is not None and C.all_true(self.pending[5].is_set(), self.engine.world, self.engine.device):
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        step, name, tmp, future, scalars, done, blocked = self.pending
        self.pending = None
        t0 = time.perf_counter()
        done.wait()
        future.result()  # re-raises a failed write
        self._finish(step, name, tmp, scalars, blocked + time.perf_counter() - t0, True)

    def _finish(self, step: int, name: str, tmp: str, scalars: Dict, blocked: float,
                is_async: bool) -> None:
        import ray.train
        from ray.train import Checkpoint

        e = self.engine
        t0 = time.perf_counter()
        ray.train.report(scalars, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        self.injector.maybe_kill("kill_in_save", step)
        C.barrier(e.world)  # every rank's shard is in storage
        if e.rank == 0:
            integrity.commit(tio.join(self.run_dir, name), e.world, step)
            integrity.prune(self.run_dir, self.keep)
        shutil.rmtree(tmp, ignore_errors=True)
        blocked += time.perf_counter() - t0
        if self.hub is not None and e.rank == 0:
            # seconds the training loop spent on this checkpoint, all phases together
            self.hub.push.remote({"event": "checkpoint", "step": step, "blocking_s": blocked,
                                  "async": is_async})
