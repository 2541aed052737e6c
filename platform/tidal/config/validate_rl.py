"""Checks of the RL stage's config (jobs/rlhf.py): the rollout engines' model, the rewards,
the KL and the critic, the split of prompts over engines; the sections every stage shares
go through ``validate_common``."""
from __future__ import annotations

import os
from typing import List

from tidal.config.schema import worker_bounds
from tidal.config.schema_rl import CRITIC_INITS
from tidal.config.validate import _check, _done, check_optim, check_post_data, check_schedule, validate_common

VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _model_conf(cfg):
    """The starting model's HF config (model.pretrained), or None when not readable."""
    if not cfg.model.pretrained or not os.path.isdir(os.path.expanduser(cfg.model.pretrained)):
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(os.path.expanduser(cfg.model.pretrained), local_files_only=True)
    except Exception:  # noqa: BLE001 - check_pretrained reports it
        return None


def _check_rollout_model(cfg, p: List[str]) -> None:
    """Prompt + response within the model's positions; on CPU, a head size vLLM runs."""
    r, conf = cfg.rollout, _model_conf(cfg)
    if conf is None:
        return
    max_pos = getattr(conf, "max_position_embeddings", None)
    if max_pos and cfg.data.seq_len + r.max_tokens > max_pos:
        p.append(f"rollout.max_tokens: prompts of up to data.seq_len={cfg.data.seq_len} tokens plus "
                 f"{r.max_tokens} response tokens exceed model.pretrained's {max_pos} positions; "
                 f"allowed: data.seq_len + rollout.max_tokens <= {max_pos}")
    local = cfg.scaling.use_gpu is False or (cfg.scaling.use_gpu is None and not os.environ.get("RAY_ADDRESS"))
    heads, hidden = getattr(conf, "num_attention_heads", 0), getattr(conf, "hidden_size", 0)
    head = getattr(conf, "head_dim", None) or (hidden // heads if heads else 0)
    if local and head not in VLLM_CPU_HEAD_SIZES:
        import torch

        if not torch.cuda.is_available():
            p.append(f"model.pretrained: head size {head} is not one vLLM's CPU engine runs "
                     f"(allowed: {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); train a model with "
                     "another hidden_size / num_heads, or run on GPUs (scaling.use_gpu=true)")


def validate_rlhf(cfg):
    """RL: prompts, the rollout engines, the reward and the algorithm; the rollout batch
    must split evenly into minibatches and over every worker count allowed."""
    p: List[str] = []
    r, a = cfg.rollout, cfg.algorithm
    check_post_data(cfg.data, p, "embedded:pydocs_instruct")
    for key in ("prompts_per_iteration", "max_tokens", "sync_bucket_mb"):
        _check(p, getattr(r, key) >= 1, f"rollout.{key}", ">= 1", getattr(r, key))
    _check(p, r.cpus_per_engine >= 1 or (r.cpus_per_engine == 0 and r.resources), "rollout.cpus_per_engine",
           ">= 1 (0 only with rollout.resources, which then place the engines)", r.cpus_per_engine)
    try:
        lo, hi = worker_bounds(r.engines)
        ok = 1 <= lo <= hi
    except ValueError:
        ok = False
    _check(p, ok, "rollout.engines", "a count >= 1 or elastic bounds 'min..max' with 1 <= min <= max", r.engines)
    if a.estimator == "gae":
        _check(p, r.n >= 1, "rollout.n", ">= 1", r.n)
    else:
        _check(p, r.n >= 2, "rollout.n", f">= 2 (the '{a.estimator}' estimator compares samples within a "
               "prompt's group)", r.n)
    _check(p, r.temperature > 0, "rollout.temperature", "> 0", r.temperature)
    for key in ("kv_cache_gib", "start_timeout_s", "timeout_s", "sync_timeout_s"):
        _check(p, getattr(r, key) > 0, f"rollout.{key}", "> 0", getattr(r, key))
    _check(p, 0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "in (0, 1]",
           r.gpu_memory_utilization)
    if r.sync_check_tol is not None:
        _check(p, r.sync_check_tol > 0, "rollout.sync_check_tol", "> 0 or null", r.sync_check_tol)
    _check(p, r.samples_every >= 0, "rollout.samples_every", ">= 0 (0: never)", r.samples_every)
    _check(p, r.retries >= 0, "rollout.retries", ">= 0", r.retries)
    _check(p, r.max_staleness >= 0, "rollout.max_staleness", ">= 0 (0: synchronous)", r.max_staleness)
    _check(p, 0 < a.clip_low < 1, "algorithm.clip_low", "in (0, 1)", a.clip_low)
    _check(p, a.clip_high > 0, "algorithm.clip_high", "> 0", a.clip_high)
    if a.dual_clip is not None:
        _check(p, a.dual_clip > 1, "algorithm.dual_clip", "> 1 or null", a.dual_clip)
    for key in ("kl_coef", "entropy_coef"):
        _check(p, getattr(a, key) >= 0, f"algorithm.{key}", ">= 0", getattr(a, key))
    for key in ("epochs", "minibatches"):
        _check(p, getattr(a, key) >= 1, f"algorithm.{key}", ">= 1", getattr(a, key))
    _check(p, a.std_eps > 0, "algorithm.std_eps", "> 0", a.std_eps)
    _check(p, a.tis_cap >= 1, "algorithm.tis_cap", ">= 1", a.tis_cap)
    _check_kl_and_critic(cfg, p)
    _check_rollout_split(cfg, p)
    if cfg.reward.model is None and any(str(f).strip().startswith("kill_reward@") for f in cfg.train.inject_faults):
        p.append("train.inject_faults: kill_reward kills a reward-model actor, but reward.model is null "
                 "(no reward-model actors to kill)")
    if cfg.reward.model not in (None, "auto") and not os.path.isdir(os.path.expanduser(cfg.reward.model)):
        p.append(f"reward.model: directory '{cfg.reward.model}' does not exist; allowed: a reward-model "
                 "export (jobs/reward.py's hf/), auto (the newest one) or null")
    from tidal.rlhf.rewards import check_reward_config

    p.extend(check_reward_config(cfg.reward))
    _check_rollout_model(cfg, p)
    return _done(cfg, validate_common(cfg, p, shard_batches=False))


def _check_kl_and_critic(cfg, p: List[str]) -> None:
    a, c = cfg.algorithm, cfg.critic
    if a.kl_controller == "adaptive":
        _check(p, a.kl_coef > 0, "algorithm.kl_coef", "> 0 (the adaptive controller's starting value)",
               a.kl_coef)
        _check(p, a.kl_target > 0, "algorithm.kl_target", "> 0 (nats per sequence)", a.kl_target)
        _check(p, a.kl_horizon >= 1, "algorithm.kl_horizon", ">= 1 (samples)", a.kl_horizon)
    if a.estimator != "gae":
        return
    _check(p, 0 <= a.gamma <= 1, "algorithm.gamma", "in [0, 1]", a.gamma)
    _check(p, 0 <= a.lam <= 1, "algorithm.lam", "in [0, 1]", a.lam)
    if a.value_clip is not None:
        _check(p, a.value_clip > 0, "algorithm.value_clip", "> 0 or null", a.value_clip)
    if c.init == "reward" and cfg.reward.model is None:
        p.append("critic.init: 'reward' needs a reward model (reward.model is null); allowed: policy, "
                 "auto, or set reward.model")
    elif c.init not in CRITIC_INITS:
        p.extend(_value_model_problems(c.init, _model_conf(cfg)))
    _check(p, 0 <= c.warmup_iterations < cfg.train.max_steps, "critic.warmup_iterations",
           f">= 0 and < train.max_steps ({cfg.train.max_steps}): the policy must train", c.warmup_iterations)
    check_optim(c.optim, "critic.optim", p, cfg.scaling.use_gpu)
    check_schedule(c.schedule, "critic.schedule", cfg.train.max_steps, p)


def _value_model_problems(path: str, policy_conf) -> List[str]:
    """``critic.init`` given as a directory: a complete value-model export (an HF sequence
    classifier with one output, as a PPO run's ``value/``) over the policy's vocabulary."""
    key, allowed = "critic.init", f"allowed: {', '.join(CRITIC_INITS)}, or a value-model directory"
    local = os.path.expanduser(path)
    if not os.path.isdir(local):
        return [f"{key}: '{path}' is neither a keyword nor a directory that exists; {allowed}"]
    from tidal.train.publish import check_readable

    bad = check_readable(local)
    if bad:
        return [f"{key}: '{path}' is not a complete export: {'; '.join(bad[:3])}"]
    try:
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(local, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, named for the user
        return [f"{key}: '{path}' holds no loadable model config (config.json): {str(e).splitlines()[0]}"]
    archs = getattr(conf, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or getattr(conf, "num_labels", 0) != 1:
        return [f"{key}: '{path}' is not a value model (an HF sequence classifier with one output, as a "
                f"PPO run's value/ export or a reward model); it is {', '.join(archs) or 'of no architecture'}"]
    if policy_conf is not None and conf.vocab_size != policy_conf.vocab_size:
        return [f"{key}: '{path}' has a vocabulary of {conf.vocab_size} tokens, the policy (model.pretrained) "
                f"{policy_conf.vocab_size}: the value model reads the policy's tokens"]
    return []


def _check_rollout_split(cfg, p: List[str]) -> None:
    r, a = cfg.rollout, cfg.algorithm
    seqs = r.prompts_per_iteration * r.n
    if a.minibatches < 1 or seqs % a.minibatches:
        p.append(f"algorithm.minibatches: {a.minibatches} does not divide the {seqs} sequences of an "
                 f"iteration (rollout.prompts_per_iteration x rollout.n)")
        return
    try:
        lo, hi = worker_bounds(cfg.scaling.workers)
    except ValueError:
        return
    bad = [w for w in range(max(lo, 1), hi + 1) if (seqs // a.minibatches) % w]
    if bad:
        p.append(f"rollout.prompts_per_iteration: minibatches of {seqs // a.minibatches} sequences cannot "
                 f"be split evenly over {', '.join(map(str, bad))} workers (scaling.workers="
                 f"{cfg.scaling.workers}); make rollout.prompts_per_iteration x rollout.n / "
                 "algorithm.minibatches a multiple of every worker count")
