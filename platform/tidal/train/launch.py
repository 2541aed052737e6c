"""The Ray-facing edge of training: start/join Ray, prepare data, run the TorchTrainer,
stream metrics to the driver's sinks, and write the run directory.

Run directory (``<run.output_dir>/<run.name>``, also Ray Train's storage for the run by
default): ``config.yaml``, ``run_card.md``, ``metrics.jsonl``, ``loss.png``,
``checkpoint_<step>/`` (newest K), ``hf/`` (the Hugging Face export), ``wandb/``.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import replace
from typing import Callable, Dict, Optional

import yaml

from tidal.config import PretrainConfig, fingerprint, to_dict
from tidal.config.schema import worker_bounds
from tidal.data import io as tio
from tidal.data.prepare import manifest_hash
from tidal.tracking import plots, run_card
from tidal.config.redact import redact
from tidal.tracking.sinks import EventLog, MetricsLog, Progress, SampleLog, WandbSink
from tidal.train import integrity
from tidal.train import lease as run_lease
from tidal.train.resources import ensure_placeable, init_ray  # noqa: F401 - init_ray: public here too

# What a checkpoint means: changing these under a resumed run is refused unless the user
# names them in run.allow_changes. Scaling, logging, evaluation and checkpoint cadence,
# stop_at_step and run options may change freely (an elastic run changes its world size).
PROTECTED = ("model.", "data.", "optim.", "schedule.", "train.max_steps", "train.global_batch_tokens",
             "train.seed")
UNPROTECTED = ("data.output_dir", "model.name", "model.allow_tokenizer_mismatch")
SHAPE_KEYS = ("model.arch", "model.pretrained", "model.hidden_size", "model.num_layers", "model.num_heads",
              "model.num_kv_heads", "model.intermediate_size", "model.tie_embeddings", "data.tokenizer.",
              "model.lora.rank", "model.lora.target_modules")


class RunStopped(RuntimeError):
    """Training stopped itself with a report (repeating failure, divergence)."""


def _flat(d: Dict, prefix: str = "") -> Dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_drift(old: Dict, new: Dict, allow) -> tuple[list, list]:
    """``(refused, allowed)`` differences between a checkpoint's config and this run's, as
    ``key: checkpoint -> now`` lines, judged by PROTECTED and ``run.allow_changes``."""
    a, b = _flat(old), _flat(new)
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or not key.startswith(PROTECTED) or key in UNPROTECTED:
            continue
        line = f"{key}: {a.get(key, '(absent)')!r} in the checkpoint -> {b.get(key, '(absent)')!r} now"
        ok = "*" in allow or any(key == x or key.startswith(x.rstrip(".") + ".") for x in allow)
        if ok and key.startswith(SHAPE_KEYS):
            refused.append(line + " (changes the parameter shapes or tokens: a checkpoint cannot "
                                  "be loaded into it; start a new run from its HF export with "
                                  "model.pretrained)")
        elif ok:
            allowed.append(line)
        else:
            refused.append(line)
    return refused, allowed


def check_resume(cfg: PretrainConfig, run_storage: str, log=print) -> Optional[str]:
    """Before any training: the checkpoint this run would resume from, refusing one whose
    config means something else (unless run.allow_changes names the differences)."""
    path, skipped = integrity.latest_valid(run_storage, full=False)
    for s in skipped:
        log(f"checkpoint {s['checkpoint']} will be skipped: {'; '.join(s['problems'][:3])}")
    if path is None and cfg.run.resume_from:
        problems = integrity.verify(cfg.run.resume_from, full=False)
        if problems:
            raise ValueError(f"run.resume_from: {cfg.run.resume_from} is not a committed, intact "
                             f"checkpoint: {'; '.join(problems[:5])}")
        path = cfg.run.resume_from
    if path is None:
        return None
    import json

    state = json.loads(tio.read_bytes(tio.join(path, "trainer_state.json")))
    if "config" in state:
        refused, allowed = config_drift(state["config"], redact(to_dict(cfg)), list(cfg.run.allow_changes))
        if refused:
            raise ValueError(
                f"resuming from {path} with a config that changes what the checkpoint means:\n  "
                + "\n  ".join(refused) + "\nrevert these, start a new run (another run.name), or "
                "name intended changes in run.allow_changes (e.g. run.allow_changes=[optim.lr])")
        for line in allowed:
            log(f"allowed change on resume: {line}")
    return path


def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Local paths made absolute (Ray workers run in other directories; pyarrow needs them)."""
    def fix(path):
        if path is None or tio.is_cloud(path):
            return path
        return os.path.abspath(os.path.expanduser(path))

    run = replace(cfg.run, output_dir=fix(cfg.run.output_dir), storage_path=fix(cfg.run.storage_path),
                  resume_from=fix(cfg.run.resume_from))
    out = replace(cfg, run=run, data=replace(cfg.data, output_dir=fix(cfg.data.output_dir)),
                  model=replace(cfg.model, pretrained=fix(cfg.model.pretrained)))
    if hasattr(cfg, "critic"):  # RL: the reward model's and the value model's directories
        from tidal.config.schema_rl import CRITIC_INITS

        reward, init = cfg.reward.model, cfg.critic.init
        out = replace(out, reward=replace(cfg.reward, model=reward if reward in (None, "auto") else fix(reward)),
                      critic=replace(cfg.critic, init=init if init in CRITIC_INITS else fix(init)))
    return out


def _use_gpu(cfg: PretrainConfig) -> bool:
    import ray

    if cfg.scaling.use_gpu is not None:
        return cfg.scaling.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def _poll(hub, log: MetricsLog, wandb: WandbSink, bar: Progress, stop: threading.Event,
          events: list, event_log: EventLog, on_record: Optional[Callable[[Dict], None]] = None,
          cancel: Optional[threading.Event] = None, samples=None) -> None:
    import ray

    forwarded = False
    while True:
        finished = stop.is_set()
        if cancel is not None and cancel.is_set() and not forwarded:
            hub.request_stop.remote()
            forwarded = True
        for rec in ray.get(hub.drain.remote()):
            if on_record is not None:
                on_record(rec)
            if rec.get("event") == "samples" and samples is not None:
                samples.add(rec)  # RL generations: samples.jsonl, not the event log
                continue
            if "event" in rec:
                events.append(rec)
                event_log.add(rec)
                kind = rec["event"]
                if kind == "start":
                    log.truncate_after(rec["step"])
                    bar.note(f"{rec['world_size']} worker(s), step {rec['step']}"
                             + (" (restored)" if rec["restored"] else ""))
                elif kind == "rollback":
                    log.truncate_after(rec["to_step"])
                    bar.note(f"step {rec['step']}: {rec['reason']}; rolled back to step "
                             f"{rec['to_step']}, skipping {rec['skipped_batches']} batch(es)")
                elif kind in ("fatal", "checkpoint_skipped", "preemption"):
                    bar.note(f"{kind}: {rec.get('reason') or rec.get('problems') or rec.get('nodes')}")
                continue
            log.add(rec)
            wandb.log(rec)
            bar.update(rec, log.last("val_loss"))
        if finished:
            return
        stop.wait(0.5)


def _facts(cfg: PretrainConfig, manifest: Dict, data_dir: str, events: list, use_gpu: bool) -> Dict:
    start = next((e for e in reversed(events) if e["event"] == "start"), {})
    return {"run_name": cfg.run.name, "model": f"{cfg.model.name} ({cfg.model.arch})",
            "parameters": f"{start.get('num_params', 0):,}" if start else "?",
            **({"trainable parameters": f"{start['trainable_params']:,} (LoRA rank {cfg.model.lora.rank})"}
               if cfg.model.lora.rank and "trainable_params" in start else {}),
            "data": f"{manifest['name']} at {data_dir}",
            "data manifest sha256": manifest_hash(manifest),
            "tokenizer sha256": manifest["tokenizer"]["sha256"],
            "train / val samples": f"{manifest['counts']['train']['samples']:,} / "
                                   f"{manifest['counts']['val']['samples']:,} of {manifest['seq_len']} tokens",
            "seed": cfg.train.seed, "deterministic": cfg.train.deterministic,
            "workers": f"{cfg.scaling.workers} ({'GPU' if use_gpu else 'CPU'}, "
                       f"{start.get('precision', '?')}), grad accum {start.get('grad_accum', '?')}",
            "optimizer": _optimizer_fact(cfg.optim, start.get("optim_state_bytes_per_param")),
            "git commit": run_card.git_commit(os.path.dirname(__file__)),
            "config fingerprint": fingerprint(cfg), **_rl_facts(cfg, manifest)}


def _optimizer_fact(o, state_bytes) -> str:
    """The optimizer and its state per trainable parameter (the workers' formula over the
    parameter shapes: fp32 state, step counters left out)."""
    out = f"{o.name}, lr {o.lr:g}, weight decay {o.weight_decay:g}"
    if state_bytes is not None:
        out += f"; state {state_bytes:.3g} bytes per trainable parameter (from the shapes)"
    return out


def _rl_summary(log: MetricsLog, events: list) -> Dict:
    """An RL run's rewards: the last iteration's, and the held-out one before and after."""
    if log.last("reward_mean") is None:
        return {}
    start = [e for e in events if e["event"] == "held_out_start" and "val_reward" in e]
    out = {"final_reward": log.last("reward_mean"), "final_val_reward": log.last("val_reward"),
           "start_val_reward": start[0]["val_reward"] if start else None, "final_kl": log.last("kl"), "final_kl_seq": log.last("kl_seq")}
    return {k: v for k, v in out.items() if v is not None}


def _rl_facts(cfg, manifest: Dict) -> Dict:
    """An RL run's card also says what it was rewarded by, on which prompts, from which model."""
    if not hasattr(cfg, "reward"):
        return {}
    rw = cfg.reward
    parts = ([f"model {rw.model} x{rw.model_weight:g}"] if rw.model else []) + [
        f"{name} x{w:g}" for name, w in zip(rw.rules, rw.rule_weights or [1.0] * len(rw.rules))] + [
        f"{fn} x{w:g}" for fn, w in zip(rw.functions, rw.function_weights or [1.0] * len(rw.functions))]
    return {"prompt set sha256": manifest.get("prompt_hash"), "reward": " + ".join(parts),
            "algorithm": f"{cfg.algorithm.name} ({cfg.algorithm.estimator}, {cfg.algorithm.loss_agg}, "
                         f"KL {cfg.algorithm.kl_coef:g} {cfg.algorithm.kl_estimator})",
            "rollout": f"{cfg.rollout.engines} vLLM engine(s), {cfg.rollout.prompts_per_iteration} prompts x "
                       f"{cfg.rollout.n} samples, {cfg.rollout.max_tokens} tokens",
            "policy lineage": run_card.lineage(cfg.model.pretrained),
            **({"value model from": _critic_source(cfg)} if cfg.algorithm.estimator == "gae" else {})}


def _critic_source(cfg) -> str:
    from tidal.rlhf.learner import critic_init

    try:
        path = critic_init(cfg)
    except ValueError as e:
        return str(e)
    return path if path == cfg.critic.init else f"{cfg.critic.init}: {path}"


def summarize(log: MetricsLog, result, export_dir: Optional[str], run_dir: str) -> Dict:
    steps = [r for r in log.records if "tokens_per_s" in r]
    steady = steps[min(2, len(steps) - 1):] if steps else []
    out = {"steps": steps[-1]["step"] if steps else 0,
           "final_train_loss": log.last("loss"),
           "final_val_loss": log.last("val_loss"),
           "final_val_ppl": log.last("val_ppl"), "final_val_bpb": log.last("val_bpb"),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
           "tokens_per_s_per_worker": statistics.median(r["tokens_per_s_per_worker"] for r in steady)
           if steady else None,
           "tokens_seen": steps[-1]["tokens_seen"] if steps else 0,
           "checkpoint": result.checkpoint.path if result is not None and result.checkpoint else None,
           "hf_export": export_dir, "run_dir": run_dir,
           "metrics": os.path.join(run_dir, "metrics.jsonl")}
    if steady and "mfu" in steady[-1]:
        out["mfu"] = statistics.median(r["mfu"] for r in steady)
    return {k: v for k, v in out.items() if v is not None}


def scaling_config(cfg: PretrainConfig, use_gpu: bool, **extra):
    """Ray Train's ScalingConfig: a fixed worker count, or elastic (min, max) bounds."""
    import ray.train

    lo, hi = worker_bounds(cfg.scaling.workers)
    kw = dict(num_workers=lo if lo == hi else (lo, hi), use_gpu=use_gpu,
              resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    if lo != hi:
        kw["elastic_resize_monitor_interval_s"] = cfg.scaling.resize_check_s
    kw.update(extra)
    return ray.train.ScalingConfig(**kw)


def run_stage(stage, cfg, log=print, on_record: Optional[Callable[[Dict], None]] = None,
              cancel: Optional[threading.Event] = None) -> Dict:
    """Train ``cfg`` as ``stage`` (a ``tidal.stages.Stage`` or its name) on Ray Train and
    return the run summary. ``on_record`` sees every step record and event as the driver
    receives it (a sweep trial forwards them to Ray Tune); setting ``cancel`` ends the run
    cleanly at the next step (its workers and their resources are released). The run's
    lease is held throughout: a second driver on the same run name is refused before any
    Ray work."""
    from tidal import stages

    stage = stages.get(stage)
    if stage.needs_pretrained and not cfg.model.pretrained:
        raise ValueError(f"model.pretrained: {stage.name} starts from an HF model directory (e.g. "
                         "a pretraining or SFT run's hf/ export)")
    cfg = absolute_paths(cfg)
    storage = cfg.run.storage_path or cfg.run.output_dir
    run_storage = tio.join(storage, cfg.run.name)
    exports = _export_dirs(cfg, storage)
    cancel = cancel or threading.Event()
    lease = run_lease.acquire(run_storage, cfg.run.name, cfg.run.lease_stale_s, cfg.run.take_over,
                              log, on_lost=lambda holder: cancel.set())
    try:
        summary = _run(cfg, log, stage, on_record, cancel, run_storage, exports)
    finally:
        run_lease.release(lease)
    if lease.lost.is_set():
        raise RunStopped(f"run '{cfg.run.name}' stopped: another driver took over its lease "
                         f"({run_lease._describe(lease.taken_by or {})})")
    return summary


def _export_dirs(cfg, storage: str) -> Dict[str, Optional[str]]:
    """Where the run's exports go (``export_dir``: the HF model; ``adapter_dir``: a LoRA
    run's PEFT adapter; ``value_dir``: PPO's value model, an HF sequence classifier that
    ``critic.init`` takes back), refused up front if those places hold foreign files."""
    from tidal.train.publish import check_destination

    lora, on = cfg.model.lora, cfg.train.export_hf
    ppo = getattr(getattr(cfg, "algorithm", None), "estimator", None) == "gae"
    exports = {"export_dir": tio.join(storage, cfg.run.name, "hf") if on and not (lora.rank and not lora.merge_export)
               else None,
               "adapter_dir": tio.join(storage, cfg.run.name, "adapter") if on and lora.rank else None,
               "value_dir": tio.join(storage, cfg.run.name, "value") if on and ppo else None}
    for d in exports.values():
        if d:
            check_destination(d, overwrite=False, key="train.export_hf")
    return exports


def _run(cfg, log, stage, on_record, cancel: threading.Event, run_storage: str,
         exports: Dict[str, Optional[str]]) -> Dict:
    from tidal.tracking.hub import MetricsHub

    root = cfg.run.output_dir
    storage = cfg.run.storage_path or root
    resume = check_resume(cfg, run_storage, log)  # before any Ray work
    if resume:
        log(f"resuming from {resume}")
    init_ray(service_cpus=stage.service_cpus(cfg))
    use_gpu = _use_gpu(cfg)
    ensure_placeable(cfg, use_gpu, log)
    # Prepared data sits beside the checkpoints, so that every node reaches it when the
    # storage is shared (s3://, gs://, NFS).
    data_dir, manifest = stage.prepare_data(cfg, storage, log, resuming=resume)
    run_dir = os.path.join(root, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    config = redact(to_dict(cfg))  # every persisted copy: no credentials
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    hub = MetricsHub.remote()
    services, close_services = stage.start_services(cfg, manifest, use_gpu, log)
    trainer = _trainer(cfg, stage, hub, use_gpu, storage, run_storage, data_dir, manifest, exports, services)
    metrics_log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), log)
    event_log = EventLog(os.path.join(run_dir, "events.jsonl"), log)
    wandb = WandbSink(cfg.logger, cfg.run.name, run_dir, config)
    bar = Progress(cfg.train.max_steps, cfg.logger.progress, every=cfg.logger.progress_every)
    stop, events = threading.Event(), []
    poller = threading.Thread(target=_poll, args=(hub, metrics_log, wandb, bar, stop, events, event_log,
                                                  on_record, cancel, SampleLog(run_dir)), daemon=True)
    poller.start()
    t0 = time.time()
    result = None
    try:
        result = trainer.fit()
    finally:
        stop.set()
        poller.join(timeout=30)
        close_services()
        bar.close()
        summary = summarize(metrics_log, result, exports["export_dir"], run_dir)
        summary.update({k: exports[d] for k, d in (("adapter", "adapter_dir"), ("value_export", "value_dir"))
                        if exports[d]})
        summary["wall_time_s"] = round(time.time() - t0, 1)
        summary.update(_resilience(events, run_storage))
        summary.update(_rl_summary(metrics_log, events))
        _write_results(cfg, summary, metrics_log, wandb, events, config, manifest, data_dir, run_dir, use_gpu)
    fatal = [e for e in events if e["event"] == "fatal"]
    if fatal:
        raise RunStopped(f"run '{cfg.run.name}' stopped: {fatal[-1]['reason']} (summary in "
                         f"{os.path.join(run_dir, 'run_card.md')}, events in "
                         f"{os.path.join(run_dir, 'events.jsonl')})")
    return summary


def _trainer(cfg, stage, hub, use_gpu: bool, storage: str, run_storage: str, data_dir: str,
             manifest: Dict, exports: Dict[str, Optional[str]], services: Dict):
    """Ray Train's TorchTrainer for the run: the stage's loop on every worker."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        stage.loop,
        train_loop_config={"cfg": cfg, "data_dir": data_dir, "hub": hub, "use_gpu": use_gpu,
                           **exports,
                           "manifest_hash": manifest_hash(manifest),
                           "run_storage": run_storage, "stage": stage.name,
                           "signed": integrity.signing_key() is not None,
                           "reference_digest": _reference_digest(cfg, stage.name), **services},
        scaling_config=scaling_config(cfg, use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            # tidal prunes: only committed checkpoints count towards train.keep_checkpoints
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            # Ray Train's per-report INFO lines would drown the progress bar; ours say more
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )


def _write_results(cfg, summary: Dict, metrics_log: MetricsLog, wandb: WandbSink, events: list,
                   config: Dict, manifest: Dict, data_dir: str, run_dir: str, use_gpu: bool) -> None:
    """The loss plot, the W&B summary and the run card (also after a failed run)."""
    if any(e.get("val_samples") == 0 for e in events if e["event"] == "start"):
        summary["final_val_loss"] = "none (no validation split: too little data to hold one out)"
    if metrics_log.records:
        summary["loss_plot"] = plots.loss_curve(metrics_log.records, os.path.join(run_dir, "loss.png"),
                                                f"{cfg.run.name}: {cfg.model.name} on {cfg.data.name}")
    if any("update_ratio" in r for r in metrics_log.records):
        summary["dynamics_plot"] = plots.dynamics_curves(metrics_log.records, os.path.join(run_dir, "dynamics.png"),
                                                         f"{cfg.run.name}: training dynamics")
    if any("reward_mean" in r for r in metrics_log.records):
        summary["rl_plot"] = plots.rl_curves(metrics_log.records, os.path.join(run_dir, "rl.png"),
                                             f"{cfg.run.name}: reward, KL, response length",
                                             summary.get("start_val_reward"))
    wandb_dir = wandb.finish(summary)
    if wandb_dir:
        summary["wandb_dir"] = wandb_dir
    run_card.write(os.path.join(run_dir, "run_card.md"), config,
                   redact(_facts(cfg, manifest, data_dir, events, use_gpu)), summary)


def _reference_digest(cfg, stage: str) -> Optional[str]:
    """DPO's precomputed reference is keyed by the reference weights' content, not only
    their path: a model re-exported in place is never matched with stale log-probs."""
    if stage != "dpo" or cfg.dpo.reference != "precompute" or not cfg.model.pretrained:
        return None
    import hashlib
    import json

    from tidal.train.publish import MARKER

    h = hashlib.sha256()
    root = cfg.model.pretrained
    if os.path.exists(os.path.join(root, MARKER)):  # a tidal export lists its digests: no re-read
        files = json.load(open(os.path.join(root, MARKER)))["files"]
        h.update(json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode())
        return h.hexdigest()
    for name in sorted(os.listdir(root)):
        if name.endswith((".safetensors", ".bin", ".json")) and name != "tidal_export.json":
            h.update(name.encode() + b"\0" + tio.sha256_file(os.path.join(root, name))[0].encode())
    return h.hexdigest()


def _resilience(events: list, run_storage: str) -> Dict:
    """What happened to the run besides training (events.jsonl holds every event)."""
    starts = [e for e in events if e["event"] == "start"]
    saves = [e for e in events if e["event"] == "checkpoint"]
    out = {"restarts": max(0, len(starts) - 1),
           "world_sizes": [e["world_size"] for e in starts],
           "rollbacks": [{k: e[k] for k in ("step", "reason", "to_step", "skipped_samples")}
                         for e in events if e["event"] == "rollback"],
           "checkpoints_skipped": [{"checkpoint": e["checkpoint"], "problems": e["problems"]}
                                   for e in events if e["event"] == "checkpoint_skipped"]}
    if saves:
        out["checkpoint_blocking_s"] = round(statistics.median(e["blocking_s"] for e in saves), 4)
    latest, _ = integrity.latest_valid(run_storage, full=False)
    if latest:
        out["checkpoint"] = latest
    return out
