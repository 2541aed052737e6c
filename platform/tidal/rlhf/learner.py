"""The RL learner loop: the second loop on the worker context, top to bottom.

Per iteration: generate (rank 0 drives the vLLM engines) -> score -> log-probs and
advantages -> ``epochs x minibatches`` optimizer steps of the training engine -> weight sync
to every engine (versioned, checksummed, parity-checked) -> report and checkpoint. The
engine, the guards, checkpoints (with the rollout source's iteration as a named state),
restore, preemption and fault drills are the ones every training stage uses.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Dict, List

import torch

from tidal.config import fingerprint, to_dict
from tidal.parallel import collectives as C
from tidal.config.redact import redact
from tidal.data.prepare import load_manifest, tokenizer_path
from tidal.rlhf import sync as S
from tidal.rlhf.source import RolloutDriver, RolloutSource
from tidal.train.engine import EngineSpec, build_engine, train_step
from tidal.train.export import export_hf
from tidal.train.worker import WorkerContext


def engine_spec(cfg) -> EngineSpec:
    """The policy's engine: the schedule spans every optimizer step of the run."""
    a = cfg.algorithm
    train = replace(cfg.train, max_steps=cfg.train.max_steps * a.epochs * a.minibatches)
    return EngineSpec(cfg.model, cfg.optim, cfg.schedule, cfg.scaling, train,
                      cfg.data.seq_len + cfg.rollout.max_tokens)


def sync_tolerance(cfg, precision: str) -> float:
    if cfg.rollout.sync_check_tol is not None:
        return cfg.rollout.sync_check_tol
    return 1e-3 if precision == "fp32" else 5e-2


def _driver(cfg, config: Dict, tok_dir: str) -> RolloutDriver:
    """Rank 0's engine group, rewards and tokenizer."""
    from transformers import AutoTokenizer

    from tidal.rlhf.rewards import RewardScorer
    from tidal.rlhf.rollout import EngineGroup

    r = cfg.rollout
    group = EngineGroup(config["engines"], r.timeout_s, r.sync_timeout_s, r.sync_bucket_mb << 20)
    pool = None
    if config.get("reward_model"):
        from tidal.rlhf.reward_model import RewardModelPool

        rc = cfg.reward
        pool = RewardModelPool(config["reward_model"], rc.model_actors, rc.model_batch_size, rc.timeout_s)
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    driver = RolloutDriver(cfg, group, RewardScorer(cfg.reward, pool), tok)
    driver.pool = pool
    return driver


def _sync(ctx: WorkerContext, engine, source: RolloutSource, probe: List[int]) -> Dict:
    version = source.iteration
    info = S.push(engine, source.driver.group if source.driver else None, version)
    info.update(S.check_parity(engine, source.driver.group if source.driver else None, probe,
                               sync_tolerance(ctx.cfg, engine.precision), version))
    return info


def _learn(ctx: WorkerContext, engine, source: RolloutSource) -> Dict:
    """The iteration's optimizer steps; ``{"anomaly": ...}`` when a guard vetoed one."""
    a, t = ctx.cfg.algorithm, ctx.cfg.train
    steps = []
    engine.objective.reset_range()
    for _ in range(a.epochs):
        for mb in range(a.minibatches):
            source.minibatch = mb
            m = train_step(engine, source.batches(ctx.rank, ctx.world, t.micro_batch_size),
                           guard=ctx.guard.check, loss_scale=ctx.injector.loss_scale(engine.step + 1))
            if "anomaly" in m:
                return m
            steps.append(m)
    out = {k: sum(s[k] for s in steps) / len(steps) for k in steps[-1]
           if isinstance(steps[-1][k], (int, float)) and k not in ("step", "time", "tokens_seen")}
    out.update(optimizer_step=engine.step, tokens_seen=engine.tokens_seen, time=time.time())
    lo, hi = engine.objective.ratio_range
    both = C.all_max(torch.tensor([-lo, hi], dtype=torch.float64, device=engine.device), ctx.world)
    if torch.isfinite(both).all():
        out.update(ratio_min=-float(both[0]), ratio_max=float(both[1]))
    return out


def _emit_samples(ctx: WorkerContext, payload: Dict, iteration: int) -> None:
    every, k = ctx.cfg.rollout.samples_every, ctx.cfg.rollout.samples_per_record
    if ctx.rank != 0 or not every or iteration % every:
        return
    samples = [{"prompt": payload["prompt_text"][i], "completion": payload["completions"][i],
                "reward": payload["rewards"][i], "parts": {n: v[i] for n, v in payload["parts"].items()},
                "dropped": payload["dropped"][i], "policy_version": payload["versions"][i]}
               for i in range(min(k, len(payload["rewards"])))]
    ctx.emit({"event": "samples", "iteration": iteration, "samples": samples})


def rl_loop_per_worker(config: Dict[str, Any]) -> None:
    ctx = WorkerContext.open(config)
    if ctx is None:
        return
    cfg, rank, world = ctx.cfg, ctx.rank, ctx.world
    from tidal import stages
    from tidal.rlhf.prompts import read_prompts
    from tidal.train import reference as R

    data_dir = config["data_dir"]
    manifest = load_manifest(data_dir)
    tk = manifest["tokenizer"]
    objective = stages.get(config["stage"]).objective.from_config(cfg)
    engine = build_engine(engine_spec(cfg), tk["vocab_size"], tk["eos_token_id"], tk["pad_token_id"], rank,
                          world, ctx.device, head="lm")
    engine.objective = objective
    reference = R.build_reference(cfg, engine, manifest) if cfg.algorithm.kl_coef > 0 else None
    tok_dir = tokenizer_path(manifest, data_dir)
    driver = _driver(cfg, config, tok_dir) if rank == 0 else None
    pad = tk["pad_token_id"] if tk["pad_token_id"] is not None else tk["eos_token_id"]
    source = RolloutSource(cfg, read_prompts(data_dir, "train"), read_prompts(data_dir, "val")[:64],
                           rank, world, ctx.device, pad, driver)
    ctx.attach(engine, source, {"config_fingerprint": fingerprint(cfg), "data_manifest": config["manifest_hash"],
                                "config": redact(to_dict(cfg))}, tok_dir, count=lambda: source.iteration)
    ctx.restore(prompts=len(source.prompts))
    probe = source.prompt_at(0)["ids"][: cfg.data.seq_len]
    sync_info = _sync(ctx, engine, source, probe)  # the engines serve this iteration's policy
    end, t = cfg.train.stop_at_step or cfg.train.max_steps, cfg.train
    if source.iteration == 0 and t.eval_every:  # the starting policy's held-out reward
        ctx.emit({"event": "held_out_start", "step": 0, **source.held_out()})
    while source.iteration < end:
        if ctx.stop_requested():
            return
        t0 = time.time()
        metrics = source.collect(engine, reference)
        payload = metrics.pop("_samples")
        t1 = time.time()
        learned = _learn(ctx, engine, source)
        if "anomaly" in learned:
            learned["step"] = source.iteration + 1
            if not ctx.recover(learned):
                return
            sync_info = _sync(ctx, engine, source, probe)
            continue
        learn_s = time.time() - t1
        source.advance()
        ctx.injector.maybe_kill("kill", source.iteration)
        sync_info = _sync(ctx, engine, source, probe)
        metrics.update(learned, **sync_info, learn_s=learn_s, step=source.iteration,
                       iteration_s=time.time() - t0)
        metrics["sync_share"] = sync_info.get("sync_s", 0.0) / metrics["iteration_s"]  # rank 0 knows
        last = source.iteration == end
        if t.eval_every and (source.iteration % t.eval_every == 0 or last):
            metrics.update(source.held_out())
        _emit_samples(ctx, payload, source.iteration)
        ctx.report(metrics, last)
        ctx.checkpoint_if_due(metrics, last)
    ctx.finish()
    if source.driver is not None and source.driver.pool is not None:
        source.driver.pool.shutdown()
    if t.export_hf and (config.get("export_dir") or config.get("adapter_dir")):
        export_hf(engine.model, rank, tok_dir, config.get("export_dir"), config.get("adapter_dir"))
        ctx.emit({"event": "exported", "step": source.iteration, "path": config.get("export_dir"),
                  "adapter": config.get("adapter_dir")})
