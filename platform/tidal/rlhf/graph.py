"""The RL graph's long-lived parts, started by the job's driver before the learners:
the vLLM rollout engines (Ray actors that outlive a learner restart) and the reward
model's location. The learner group (Ray Train) receives their handles."""
from __future__ import annotations

import time
from typing import Callable, Dict, Tuple

from tidal.rlhf.rollout import EngineKeeper, EngineSettings, _wait


def engine_settings(cfg, manifest: Dict, use_gpu: bool) -> EngineSettings:
    from tidal.parallel import resolve_precision

    precision = resolve_precision(cfg.scaling.precision, "cuda" if use_gpu else "cpu")
    r = cfg.rollout
    return EngineSettings(model_dir=cfg.model.pretrained, dtype="float32" if precision == "fp32" else "bfloat16",
                          max_model_len=cfg.data.seq_len + r.max_tokens, seed=cfg.train.seed, use_gpu=use_gpu,
                          kv_cache_bytes=int(r.kv_cache_gib * (1 << 30)),
                          gpu_memory_utilization=r.gpu_memory_utilization,
                          eos_id=manifest["tokenizer"]["eos_token_id"])


def start(cfg, manifest: Dict, use_gpu: bool, log=print) -> Tuple[Dict, Callable[[], None]]:
    """``(train_loop_config additions, close)``: the engines started and ready."""
    import ray

    from tidal.config.schema import worker_bounds

    r = cfg.rollout
    lo, hi = worker_bounds(r.engines)
    t0 = time.time()
    log(f"starting {lo} rollout engine(s) (vLLM, {'GPU' if use_gpu else 'CPU'})"
        + (f"; up to {hi} as the cluster has room" if hi > lo else ""))
    restart = {"settings": engine_settings(cfg, manifest, use_gpu), "cpus": r.cpus_per_engine,
               "gpus": 1 if use_gpu else 0, "timeout_s": r.start_timeout_s, "resources": dict(r.resources)}
    # the keeper creates (and so owns) every engine of the run: they outlive learner restarts
    keeper = ray.remote(num_cpus=0)(EngineKeeper).remote(restart)
    actors = ray.get(keeper.spawn.remote(lo), timeout=60)
    _wait([a.info.remote() for a in actors], r.start_timeout_s, f"starting {lo} rollout engine(s)")
    ray.get(keeper.remember.remote(actors, []), timeout=60)
    log(f"rollout engines ready in {time.time() - t0:.0f} s")

    def close() -> None:
        try:
            ray.get(keeper.shutdown.remote(), timeout=300)
        except Exception:  # noqa: BLE001 - the keeper is gone: kill what we know of
            for a in actors:
                ray.kill(a)
        ray.kill(keeper)

    # the learners restart lost engines and grow the pool through the keeper
    return {"engines": actors, "engine_keeper": keeper, "engine_restart": restart, "engine_bounds": [lo, hi],
            "reward_model": cfg.reward.model}, close
