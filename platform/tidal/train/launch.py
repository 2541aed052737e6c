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
from typing import Dict, Optional

import yaml

from tidal.config import PretrainConfig, fingerprint, to_dict
from tidal.data import io as tio
from tidal.data.prepare import data_key, default_output_dir, load_manifest, manifest_hash, prepare
from tidal.tracking import plots, run_card
from tidal.tracking.sinks import MetricsLog, Progress, WandbSink


def init_ray() -> None:
    """Join ``RAY_ADDRESS`` when set (a cluster, or a ``ray job submit`` job), else start a
    local runtime."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = None
    if os.environ.get("TIDAL_SHIP_CODE"):  # tidal is not installed on the cluster: ship it
        import tidal

        runtime_env = {"py_modules": [os.path.dirname(tidal.__file__)]}
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True,
             logging_level="WARNING", runtime_env=runtime_env)


def ensure_data(data_cfg, root: str, log=print) -> tuple[str, Dict]:
    """The prepared data directory and its manifest, preparing it first when missing.
    Refuses shards that were prepared with a different data config."""
    data_dir = default_output_dir(data_cfg, root if tio.is_cloud(root) else os.path.abspath(root))
    manifest = load_manifest(data_dir)
    if manifest is None:
        log(f"no prepared data at {data_dir}: preparing '{data_cfg.name}'")
        manifest = prepare(data_cfg, data_dir, log=log)
    elif manifest.get("data_key") != data_key(data_cfg):
        raise ValueError(
            f"data.output_dir: {data_dir} holds data prepared with another data config "
            f"(key {manifest.get('data_key')}, this config: {data_key(data_cfg)}; its config is in "
            f"{tio.join(data_dir, 'manifest.json')}); point data.output_dir elsewhere or remove it")
    return data_dir, manifest


def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Local paths made absolute (Ray workers run in other directories; pyarrow needs them)."""
    def fix(path):
        if path is None or tio.is_cloud(path):
            return path
        return os.path.abspath(os.path.expanduser(path))

    run = replace(cfg.run, output_dir=fix(cfg.run.output_dir), storage_path=fix(cfg.run.storage_path),
                  resume_from=fix(cfg.run.resume_from))
    return replace(cfg, run=run, data=replace(cfg.data, output_dir=fix(cfg.data.output_dir)))


def _use_gpu(cfg: PretrainConfig) -> bool:
    import ray

    if cfg.scaling.use_gpu is not None:
        return cfg.scaling.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def _poll(hub, log: MetricsLog, wandb: WandbSink, bar: Progress, stop: threading.Event,
          events: list) -> None:
    import ray

    while True:
        finished = stop.is_set()
        for rec in ray.get(hub.drain.remote()):
            if "event" in rec:
                events.append(rec)
                if rec["event"] == "start":
                    log.truncate_after(rec["step"])
                    bar.note(f"{rec['world_size']} worker(s), step {rec['step']}"
                             + (" (restored)" if rec["restored"] else ""))
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
            "data": f"{manifest['name']} at {data_dir}",
            "data manifest sha256": manifest_hash(manifest),
            "tokenizer sha256": manifest["tokenizer"]["sha256"],
            "train / val samples": f"{manifest['counts']['train']['samples']:,} / "
                                   f"{manifest['counts']['val']['samples']:,} of {manifest['seq_len']} tokens",
            "seed": cfg.train.seed, "deterministic": cfg.train.deterministic,
            "workers": f"{cfg.scaling.workers} ({'GPU' if use_gpu else 'CPU'}, "
                       f"{start.get('precision', '?')}), grad accum {start.get('grad_accum', '?')}",
            "git commit": run_card.git_commit(os.path.dirname(__file__)),
            "config fingerprint": fingerprint(cfg)}


def summarize(log: MetricsLog, result, export_dir: Optional[str], run_dir: str) -> Dict:
    steps = [r for r in log.records if "tokens_per_s" in r]
    steady = steps[min(2, len(steps) - 1):] if steps else []
    out = {"steps": steps[-1]["step"] if steps else 0,
           "final_train_loss": log.last("loss"), "final_val_loss": log.last("val_loss"),
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


def run_pretrain(cfg: PretrainConfig, log=print) -> Dict:
    """Train ``cfg`` on Ray Train and return the run summary."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from tidal.tracking.hub import MetricsHub
    from tidal.train.loop import train_loop_per_worker

    cfg = absolute_paths(cfg)
    init_ray()
    root = cfg.run.output_dir
    storage = cfg.run.storage_path or root
    # Prepared data sits beside the checkpoints, so that every node reaches it when the
    # storage is shared (s3://, gs://, NFS).
    data_dir, manifest = ensure_data(cfg.data, storage, log)
    run_dir = os.path.join(root, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    export_dir = tio.join(storage, cfg.run.name, "hf") if cfg.train.export_hf else None
    config = to_dict(cfg)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    use_gpu = _use_gpu(cfg)
    hub = MetricsHub.remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "data_dir": data_dir, "hub": hub, "use_gpu": use_gpu,
                           "export_dir": export_dir, "manifest_hash": manifest_hash(manifest)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
    )
    metrics_log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
    wandb = WandbSink(cfg.logger, cfg.run.name, run_dir, config)
    bar = Progress(cfg.train.max_steps, cfg.logger.progress)
    stop, events = threading.Event(), []
    poller = threading.Thread(target=_poll, args=(hub, metrics_log, wandb, bar, stop, events), daemon=True)
    poller.start()
    t0 = time.time()
    result = None
    try:
        result = trainer.fit()
    finally:
        stop.set()
        poller.join(timeout=30)
        bar.close()
        summary = summarize(metrics_log, result, export_dir, run_dir)
        summary["wall_time_s"] = round(time.time() - t0, 1)
        if metrics_log.records:
            summary["loss_plot"] = plots.loss_curve(metrics_log.records, os.path.join(run_dir, "loss.png"),
                                                    f"{cfg.run.name}: {cfg.model.name} on {cfg.data.name}")
        wandb_dir = wandb.finish(summary)
        if wandb_dir:
            summary["wandb_dir"] = wandb_dir
        run_card.write(os.path.join(run_dir, "run_card.md"), config,
                       _facts(cfg, manifest, data_dir, events, use_gpu), summary)
    return summary
