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
    """The policy's engine: the schedule spans every optimizer step of the run (none in
    PPO's value-model warm-up iterations)."""
    a = cfg.algorithm
    iterations = cfg.train.max_steps - (cfg.critic.warmup_iterations if a.estimator == "gae" else 0)
    train = replace(cfg.train, max_steps=iterations * a.epochs * a.minibatches)
    return EngineSpec(cfg.model, cfg.optim, cfg.schedule, cfg.scaling, train,
                      cfg.data.seq_len + cfg.rollout.max_tokens)


def critic_init(cfg) -> str:
    """The directory PPO's value model starts from: the reward model's (``critic.init``
    reward, or auto with a reward model), the policy's, or the directory ``critic.init``
    names (an earlier run's value export)."""
    from tidal.config.schema_rl import CRITIC_INITS

    c = cfg.critic.init
    if c not in CRITIC_INITS:
        return c
    path = cfg.reward.model if c in ("reward", "auto") and cfg.reward.model else cfg.model.pretrained
    if not path:
        raise ValueError("critic.init: the value model starts from a pretrained directory (the reward "
                         "model's or the policy's); neither reward.model nor model.pretrained is set")
    return path


def critic_spec(cfg) -> EngineSpec:
    """PPO's value model: the policy's shape and sharding, its own optimizer and schedule,
    from ``critic_init``'s weights, without LoRA (the critic trains fully)."""
    from tidal.config.schema import LoRAConfig

    policy, a = engine_spec(cfg), cfg.algorithm
    model = replace(cfg.model, pretrained=critic_init(cfg), lora=LoRAConfig(rank=0))
    train = replace(cfg.train, max_steps=cfg.train.max_steps * a.epochs * a.minibatches)  # every iteration
    return replace(policy, model=model, optim=cfg.critic.optim, schedule=cfg.critic.schedule, train=train)


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
    bounds = config.get("engine_bounds")
    group = EngineGroup(config["engines"], r.timeout_s, r.sync_timeout_s, r.sync_bucket_mb << 20,
                        restart=config.get("engine_restart"), bounds=tuple(bounds) if bounds else None,
                        keeper=config.get("engine_keeper"))
    pool = None
    if config.get("reward_model"):
        from tidal.rlhf.reward_model import RewardModelPool

        rc = cfg.reward
        pool = RewardModelPool(config["reward_model"], rc.model_actors, rc.model_batch_size, rc.timeout_s)
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    driver = RolloutDriver(cfg, group, RewardScorer(cfg.reward, pool), tok)
    driver.pool = pool
    return driver


def _push_and_check(ctx: WorkerContext, engine, source: RolloutSource, probe: List[int]) -> Dict:
    version = source.iteration
    group = source.driver.group if source.driver else None
    if group is not None and ctx.injector.once("stall_sync", version):  # a drill: an engine hangs
        group.actors[0].arm_stall.remote()
    info = S.push(engine, group, version)
    info.update(S.check_parity(engine, group, probe, sync_tolerance(ctx.cfg, engine.precision), version))
    return info


def _sync(ctx: WorkerContext, engine, source: RolloutSource, probe: List[int]) -> Dict:
    """Push the policy to every engine and check it arrived (collective); a failed sync (a
    deadline, a checksum or parity mismatch, a lost engine) is retried ``rollout.retries``
    times on restarted engines (``sync.with_retries``)."""
    group = source.driver.group if source.driver else None
    info = S.with_retries(lambda: _push_and_check(ctx, engine, source, probe), group, ctx.cfg.rollout.retries,
                          ctx.rank, ctx.world, ctx.emit, source.iteration)
    source.engine_version = source.iteration
    return info


def _grow(ctx: WorkerContext, source: RolloutSource) -> int:
    """Elastic rollout pool: rank 0 requests engines up to the maximum and admits the ones
    that have started; every rank learns how many joined (they need the weights now)."""
    joined = source.driver.group.grow() if ctx.rank == 0 else []
    if joined:
        ctx.emit({"event": "engines_joined", "step": source.iteration, "joined": len(joined),
                  "engines": len(source.driver.group.actors)})
    return C.broadcast(len(joined), ctx.world)


# the value model's step metrics, as the iteration reports them
VALUE_KEYS = {"loss": "value_loss", "grad_norm": "value_grad_norm", "lr": "value_lr",
              "vf_clip_frac": "vf_clip_frac", "value": "value_mean"}


def _learn(ctx: WorkerContext, engine, source: RolloutSource, critic_guard=None) -> Dict:
    """The iteration's optimizer steps (the policy's, and after each the value model's when
    there is one; only the value model's during ``critic.warmup_iterations``);
    ``{"anomaly": ...}`` when a guard vetoed one."""
    a, t = ctx.cfg.algorithm, ctx.cfg.train
    critic = engine.companions.get("value")
    frozen = critic is not None and source.iteration < ctx.cfg.critic.warmup_iterations
    steps = []
    engine.objective.reset_range()
    engine.objective.kl_coef = source.kl.value
    for _ in range(a.epochs):
        for mb in range(a.minibatches):
            source.minibatch = mb
            batches = source.batches(ctx.rank, ctx.world, t.micro_batch_size)
            m = {"policy_frozen": 1} if frozen else train_step(
                engine, batches, guard=ctx.guard.check, loss_scale=ctx.injector.loss_scale(engine.step + 1))
            if "anomaly" in m:
                return m
            if critic is not None:
                v = train_step(critic, batches, guard=critic_guard.check)
                if "anomaly" in v:
                    return {**v, "anomaly": f"value model: {v['anomaly']}"}
                m.update({name: v[k] for k, name in VALUE_KEYS.items() if k in v})
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


def _build(ctx: WorkerContext, config: Dict[str, Any]):
    """The policy engine (and PPO's value model beside it), the reference, and the rollout
    source (rank 0 drives the engines); returns them with the critic's guard and the
    tokenizer directory."""
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
    critic_guard = None
    if cfg.algorithm.estimator == "gae":  # PPO: the value model trains beside the policy
        from tidal.objectives.value import ValueObjective
        from tidal.train.guards import DivergenceGuard

        critic = build_engine(critic_spec(cfg), tk["vocab_size"], tk["eos_token_id"], tk["pad_token_id"],
                              rank, world, ctx.device, head="reward")
        critic.objective = ValueObjective.from_config(cfg)
        engine.companions["value"] = critic
        critic_guard = DivergenceGuard(cfg.train.guard)
    reference = R.build_reference(cfg, engine, manifest) if cfg.algorithm.kl_coef > 0 else None
    tok_dir = tokenizer_path(manifest, data_dir)
    driver = _driver(cfg, config, tok_dir) if rank == 0 else None
    pad = tk["pad_token_id"] if tk["pad_token_id"] is not None else tk["eos_token_id"]
    source = RolloutSource(cfg, read_prompts(data_dir, "train"), read_prompts(data_dir, "val")[:64],
                           rank, world, ctx.device, pad, driver)
    return engine, critic_guard, reference, source, tok_dir


def rl_loop_per_worker(config: Dict[str, Any]) -> None:
    ctx = WorkerContext.open(config)
    if ctx is None:
        return
    cfg = ctx.cfg
    engine, critic_guard, reference, source, tok_dir = _build(ctx, config)
    ctx.attach(engine, source, {"config_fingerprint": fingerprint(cfg), "data_manifest": config["manifest_hash"],
                                "config": redact(to_dict(cfg))}, tok_dir, count=lambda: source.iteration,
               stage=source.kl)
    ctx.restore(prompts=len(source.prompts))
    probe = source.prompt_at(0)["ids"][: cfg.data.seq_len]
    source.emit, source.injector = ctx.emit, ctx.injector
    source.resync = lambda: _sync(ctx, engine, source, probe)
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
        learned = _learn(ctx, engine, source, critic_guard)
        if "anomaly" in learned:
            learned["step"] = source.iteration + 1
            if not ctx.recover(learned):
                return
            if critic_guard is not None:
                critic_guard.reset()
            sync_info = _sync(ctx, engine, source, probe)
            continue
        learn_s = time.time() - t1
        source.advance()
        ctx.injector.maybe_kill("kill", source.iteration)
        last = source.iteration == end
        joined = _grow(ctx, source)
        sync_info = _sync(ctx, engine, source, probe) if joined or source.needs_sync(last) else {}
        metrics.update(learned, **sync_info, learn_s=learn_s, step=source.iteration,
                       iteration_s=time.time() - t0)
        metrics["sync_share"] = sync_info.get("sync_s", 0.0) / metrics["iteration_s"]  # rank 0 knows
        if t.eval_every and (source.iteration % t.eval_every == 0 or last):
            metrics.update(source.held_out())
        _emit_samples(ctx, payload, source.iteration)
        ctx.report(metrics, last)
        ctx.checkpoint_if_due(metrics, last)
    ctx.finish()
    if source.driver is not None and source.driver.pool is not None:
        source.driver.pool.shutdown()
    if t.export_hf and (config.get("export_dir") or config.get("adapter_dir")):
        export_hf(engine.model, ctx.rank, tok_dir, config.get("export_dir"), config.get("adapter_dir"))
        ctx.emit({"event": "exported", "step": source.iteration, "path": config.get("export_dir"),
                  "adapter": config.get("adapter_dir")})
    critic = engine.companions.get("value")
    if t.export_hf and critic is not None and config.get("value_dir"):  # PPO: critic.init=<this> takes it back
        export_hf(critic.model, ctx.rank, tok_dir, config["value_dir"])
        ctx.emit({"event": "exported", "step": source.iteration, "path": config["value_dir"], "part": "value"})
