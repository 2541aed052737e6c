"""One sweep trial: a normal training run of the swept job with the trial's values, on
its own Ray Train workers, reporting each evaluation to Ray Tune.

Every evaluation step is also a committed checkpoint; Tune receives a small pointer to it
(``tidal_checkpoint.json``), never a copy of the shards. A trial started with a Tune
checkpoint (PBT exploiting another trial, a retry after a failure, a restored sweep) is a
new run that resumes from the pointed-to checkpoint: the step, data cursor, optimizer and
RNG continue from there, with the trial's (possibly mutated) values.
"""
from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
import uuid
from typing import Any, Dict

from tidal.config import from_dict
from tidal.data import io as tio
from tidal import stages
from tidal.sweep.space import trial_dict

POINTER = "tidal_checkpoint.json"
REPORTED = ("step", "tokens_seen", "lr", "loss", "epoch")
_ACTIVE: Dict[str, Any] = {}  # this trial process's run: its cancel event and thread


def trainable(base: Dict, sweep):
    """``run_trial`` as a Tune trainable whose cleanup (a trial stopped by the scheduler,
    or the sweep ending) ends the run cleanly before the trial's process goes: its Ray
    Train workers and their placement group are released rather than left behind."""
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    base_cls = wrap_function(tune.with_parameters(run_trial, base=base, sweep=sweep))

    class TidalTrial(base_cls):
        def cleanup(self):
            # the module's registry itself (this class travels by value, with copies of
            # the globals it names)
            from tidal.sweep import trial as module

            run = module._ACTIVE.pop("run", None)
            if run is not None and run["thread"].is_alive():
                run["cancel"].set()
                run["thread"].join(timeout=300)
            super().cleanup()

    TidalTrial.__name__ = TidalTrial.__qualname__ = "trial"
    return TidalTrial


def run_trial(params: Dict[str, Any], base: Dict, sweep) -> None:
    """The Tune function trainable (``params``: this trial's sampled values)."""
    from ray import tune

    from tidal.train import integrity
    from tidal.train.launch import run_stage

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    stage = stages.get(sweep.job)
    d = trial_dict(base, sweep, params)
    run_id = f"{sweep.name}-{trial_id}"
    name = run_id
    start = tune.get_checkpoint()
    if start is not None:  # continue from a checkpoint (PBT donor, retry, restored sweep)
        with start.as_directory() as local:
            with open(os.path.join(local, POINTER)) as f:
                pointer = json.load(f)
        name = f"{run_id}-from{pointer['step']}-{uuid.uuid4().hex[:6]}"
        d["run"]["resume_from"] = pointer["checkpoint"]
        d["run"]["allow_changes"] = [p.key for p in sweep.search.space]  # e.g. PBT's mutations
    d["run"]["name"] = name
    d["logger"].update(group=sweep.name, run_id=run_id, progress=False,
                       tags=list(d["logger"].get("tags", [])) + [f"sweep:{sweep.name}"])
    t = d["train"]
    t["checkpoint_every"] = t["eval_every"]  # every report carries a checkpoint
    t["async_checkpoint"] = False
    t["keep_checkpoints"] = max(t["keep_checkpoints"], -(-t["max_steps"] // t["eval_every"]) + 1)
    cfg = stage.validate(from_dict(stage.schema, d))
    run_storage = tio.join(cfg.run.storage_path or cfg.run.output_dir, cfg.run.name)

    records: "queue.Queue[Dict]" = queue.Queue()
    outcome: Dict[str, Any] = {}
    cancel = threading.Event()

    def train():
        try:
            outcome["summary"] = run_stage(stage, cfg, log=lambda m: print(f"[{trial_id}] {m}"),
                                           on_record=records.put, cancel=cancel)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            outcome["error"] = e

    worker = threading.Thread(target=train, daemon=True, name=f"tidal-{trial_id}")
    _ACTIVE["run"] = {"cancel": cancel, "thread": worker}
    worker.start()
    last_val: Dict[str, Any] = {}
    while worker.is_alive() or not records.empty():
        try:
            rec = records.get(timeout=0.5)
        except queue.Empty:
            continue
        if "event" not in rec:
            if sweep.metric in rec:
                last_val = rec
            continue
        if rec["event"] != "checkpoint" or last_val.get("step") != rec["step"]:
            continue
        path = tio.join(run_storage, integrity.checkpoint_name(rec["step"]))
        metrics = {k: v for k, v in last_val.items()
                   if k in REPORTED or k.startswith("val_") or k == sweep.metric}
        metrics.update(run_name=name, wall_s=time.time())
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, POINTER), "w") as f:
                json.dump({"checkpoint": path, "step": rec["step"], "run": name}, f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
