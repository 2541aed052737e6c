"""Typed, frozen configuration schemas of the RL stage (``jobs/rlhf.py``): prompts, rollout
engines, rewards, the algorithm and PPO's critic. The sections every stage shares are in
:mod:`tidal.config.schema`, whose conventions hold here too."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from tidal.config.schema import (GuardConfig, OptimConfig, PostDataConfig, PostTrainingConfig, RunConfig,
                                 ScheduleConfig, TrainConfig, _optim, _run)


@dataclass(frozen=True)
class PromptDataConfig(PostDataConfig):
    """Prompts for RL: chat ``messages`` (the prompt is every turn before the last
    assistant reply, if any), Alpaca records (instruction + input), plain ``prompt``
    records, or the prompt part of HH-RLHF transcripts; other fields of a record (e.g.
    ``answer``) reach the reward functions as metadata. By default instructions derived from
    the Python docs. ``seq_len``: prompts longer than this many tokens (chat template
    applied) are set aside and counted."""

    name: str = "pydocs_prompts"
    sources: List[str] = field(default_factory=lambda: ["embedded:pydocs_instruct"])
    seq_len: int = 96
    val_fraction: float = 0.1  # held-out prompts: the reward the run reports as held-out


@dataclass(frozen=True)
class RolloutConfig:
    """vLLM rollout engines (Ray actors) and the weight sync to them."""

    # engines: a count, or elastic bounds "min..max": the pool starts with min and takes
    # engines as the cluster has room for them (the autoscaler adds nodes for the ones
    # waiting), drops lost ones and asks again, without restarting the learners
    engines: Any = 1
    resources: Dict[str, float] = field(default_factory=dict)  # per engine, e.g. {rollout_node: 1}
    n: int = 4  # samples per prompt (the group of group estimators)
    prompts_per_iteration: int = 16
    max_tokens: int = 32  # response tokens per sample
    temperature: float = 1.0  # top-p/top-k stay off: log-probs comparable with the learner's
    cpus_per_engine: int = 1
    kv_cache_gib: float = 0.25  # CPU: the engine's KV cache in host memory
    gpu_memory_utilization: float = 0.5  # GPU engines
    start_timeout_s: float = 600.0  # an engine's start (model load) deadline
    timeout_s: float = 600.0  # one iteration's generation deadline
    sync_timeout_s: float = 300.0  # one weight sync's deadline
    # a failed sync (deadline, checksum, lost engine) is retried this many times, after
    # restarting the engines that are lost or failed it; generation lost to a dead engine
    # is regenerated (same seeds, same samples) up to this many times too
    retries: int = 2
    sync_bucket_mb: int = 64  # parameters gathered and sent in buckets of at most this size
    # after each sync the engines' log-probs of a fixed probe sequence must match the
    # learner's within this (mean absolute difference); null: 1e-3 in fp32, 5e-2 in bf16
    sync_check_tol: Optional[float] = None
    # asynchronous mode: 0 = synchronous (generate, then train); k >= 1: the engines generate
    # the next iteration while the learners train, with a policy at most k versions old
    # (weights synced every k iterations); older samples are rejected, the rest corrected by
    # truncated importance sampling (algorithm.tis; token level when off)
    max_staleness: int = 0
    samples_every: int = 5  # iterations between samples.jsonl records (0: never)
    samples_per_record: int = 4


@dataclass(frozen=True)
class RLRewardConfig:
    """What scores a completion: a weighted sum of parts. ``model``: a reward-model export
    (``jobs/reward.py``), "auto" for the newest one (training one first if there is none),
    or null for none; ``rules``: built-in rule rewards (``tidal.rlhf.rewards.RULES``);
    ``functions``: user functions by import path, ``module:function``, called as
    ``fn(prompts, completions, metadata) -> list of floats``."""

    model: Optional[str] = "auto"
    model_weight: float = 1.0
    model_actors: int = 1
    model_batch_size: int = 32
    rules: List[str] = field(default_factory=list)
    rule_weights: List[float] = field(default_factory=list)  # one per rule; empty: 1.0 each
    functions: List[str] = field(default_factory=list)
    function_weights: List[float] = field(default_factory=list)  # one per function; empty: 1.0 each
    answer_field: str = "answer"  # the metadata field exact_match / prefix_match compare with
    format_pattern: str = r"\S"  # format: 1 when the completion matches (re.search)
    length_target: int = 16  # length: -|tokens - target| / target
    on_error: Literal["drop", "stop"] = "drop"  # a reward that raises: drop the samples, or stop
    timeout_s: float = 300.0


@dataclass(frozen=True)
class AlgorithmConfig:
    """The RL algorithm: an advantage estimator and a clipped policy loss (``algorithm=``
    picks a preset from ``conf/algorithm``)."""

    name: str = "grpo"
    # gae: PPO, per-token advantages from a value model (the ``critic`` section)
    estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "gae"] = "grpo"
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low: DAPO's clip-higher
    dual_clip: Optional[float] = None  # e.g. 3.0: bound the loss of negative advantages
    kl_coef: float = 0.03  # KL to the reference policy; 0: no reference model
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in_reward: bool = False  # true: a per-token reward penalty (k1 style) instead of a loss term
    # the KL coefficient: fixed at kl_coef, or adaptive (Ziegler et al.): moved towards the
    # per-sequence KL kl_target over kl_horizon samples; checkpointed with the run
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    kl_target: float = 6.0
    kl_horizon: int = 10000
    entropy_coef: float = 0.0
    epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimizer steps per pass
    drop_equal_groups: bool = False  # DAPO dynamic sampling: groups with equal rewards train nothing
    std_eps: float = 1e-6
    # truncated importance sampling against the rollout engine's log-probs
    tis: Literal["off", "token", "sequence"] = "off"
    tis_cap: float = 2.0
    # PPO (estimator gae): discount and GAE lambda over response tokens, advantages whitened
    # over the batch, the critic's clipped value loss (null: unclipped)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    value_clip: Optional[float] = 0.2
    # a response cut at rollout.max_tokens was scored as it is: its episode ends there (as in
    # OpenRLHF and TRL); true adds the value of the state after it (for rewards that are not
    # final at the cut)
    bootstrap_truncated: bool = False
    # PPO: the scores standardized over the iteration's kept samples before the KL penalty is
    # added, so the penalty's weight does not depend on the reward's scale (a reward model's
    # scores can span 1e-3 or 10)
    reward_norm: bool = False


CRITIC_INITS = ("auto", "reward", "policy")  # critic.init's keywords; anything else is a directory


@dataclass(frozen=True)
class CriticConfig:
    """PPO's value model: the same network with a scalar head on every token, trained in
    the learner workers beside the policy with its own optimizer and schedule. ``init``:
    ``reward`` starts from the reward model's weights (``reward.model``), ``policy`` from the
    policy's (a new head), ``auto`` the reward model when there is one; a directory: a value
    model exported by an earlier PPO run (its ``value/``), to go on where that run stopped."""

    init: str = "auto"  # auto, reward, policy, or a value-model directory
    # the first iterations train only the value model (the policy waits, as OpenRLHF's
    # freezing_actor_steps): advantages from a value model that has not fit yet are noise
    warmup_iterations: int = 0
    optim: OptimConfig = _optim(1e-4)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="constant", warmup_steps=0))


@dataclass(frozen=True)
class RLHFConfig(PostTrainingConfig):
    """RL from a reward (GRPO family): vLLM rollout engines, rewards, and learners on the
    training engine. ``train.max_steps`` counts iterations (generate, score, learn, sync);
    ``eval_every`` and ``checkpoint_every`` too. ``model.pretrained`` empty: the newest SFT
    export (running the earlier stages first)."""

    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RLRewardConfig = field(default_factory=RLRewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)  # used by algorithm=ppo (estimator gae)
    # the tiny CPU preset's rate: measured to raise the held-out reward of the default
    # lifecycle within 20 iterations (1e-5 moved nothing); larger models want ~1e-6
    optim: OptimConfig = _optim(2e-4)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="constant", warmup_steps=0))
    # the guards keep their non-finite checks; spikes are off: a policy loss is signed and
    # near zero, and gradient norms fall towards zero as groups' rewards become equal
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=20, micro_batch_size=8, eval_every=10, checkpoint_every=10,
        guard=GuardConfig(loss_spike_factor=0.0, grad_spike_factor=0.0)))
    run: RunConfig = _run("rlhf")
