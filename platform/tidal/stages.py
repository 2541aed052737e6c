"""The stage registry: every training stage as one object.

A stage names its config schema, its validation, its objective, the kind of prepared data
it trains on (and how that data is made ready), and whether it starts from a pretrained
model. Jobs (``jobs/``), the launcher and sweeps run a stage by name or object; the worker
builds the stage's objective from the name it is given. Adding a stage means a module for
its objective, one ``register`` call here and one conf file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

from tidal.config import DPOConfig, PretrainConfig, RewardConfig, RLHFConfig, SFTConfig
from tidal.config.validate import validate_dpo, validate_pretrain, validate_reward, validate_sft
from tidal.config.validate_rl import validate_rlhf
from tidal.registry import Registry


@dataclass(frozen=True)
class Stage:
    name: str
    title: str  # what the job says when the stage is done
    schema: type  # the config dataclass
    validate: Callable[[Any], Any]  # cfg -> cfg, or raises ConfigError naming the keys
    objective_path: str  # its objective class, "module:Class" (tidal.objectives)
    needs_pretrained: bool  # post-training: starts from model.pretrained
    loop_path: str = "tidal.train.loop:train_loop_per_worker"  # each Ray Train worker runs it
    # the stage's long-lived actors, started by the driver before the workers (the RL
    # graph's rollout engines): "module:function", (cfg, manifest, use_gpu, log) ->
    # (additions to the workers' config, close)
    services_path: Optional[str] = None
    # CPUs the services take beside the workers (a local runtime is sized to hold both)
    service_cpus: Callable[[Any], float] = lambda cfg: 0.0

    @property
    def objective(self) -> type:
        """The objective class (imported on first use: a job checks its arguments before
        torch is imported); a run builds one with ``objective.from_config(cfg)``."""
        return _load(self.objective_path)

    @property
    def loop(self) -> Callable:
        return _load(self.loop_path)

    def start_services(self, cfg, manifest: Dict, use_gpu: bool, log=print) -> Tuple[Dict, Callable[[], None]]:
        if self.services_path is None:
            return {}, lambda: None
        return _load(self.services_path)(cfg, manifest, use_gpu, log)

    @property
    def data_kind(self) -> str:
        """lm (a packed corpus), sft (conversations) or pairs (preferences)."""
        return self.objective.data_kind

    def prepare_data(self, cfg, storage: str, log=print,
                     resuming: Optional[str] = None) -> Tuple[str, Dict]:
        """The prepared data directory and manifest this stage trains on (prepared first
        when missing or when its inputs changed)."""
        from tidal.data.ready import ensure_data, ensure_post_data

        if self.data_kind == "lm":
            return ensure_data(cfg.data, storage, log, resuming)
        return ensure_post_data(cfg, storage, self.data_kind, log, resuming)


def _load(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


STAGES: Registry = Registry("stage")


def register(stage: Stage) -> Stage:
    return STAGES.register(stage.name)(stage)


def get(stage: Union[str, Stage]) -> Stage:
    """A stage by name (or the stage itself)."""
    if isinstance(stage, Stage):
        return stage
    return STAGES.get_or_raise(stage)


_LM, _PREF = "tidal.objectives.causal_lm", "tidal.objectives.preference"
register(Stage("pretrain", "pretraining finished", PretrainConfig, validate_pretrain, f"{_LM}:LMObjective", False))
register(Stage("sft", "SFT finished", SFTConfig, validate_sft, f"{_LM}:SFTObjective", True))
register(Stage("reward", "reward model finished", RewardConfig, validate_reward, f"{_PREF}:RewardObjective", True))
register(Stage("dpo", "DPO finished", DPOConfig, validate_dpo, f"{_PREF}:DPOObjective", True))


def _rl_cpus(cfg) -> float:
    r = cfg.rollout
    from tidal.config.schema import worker_bounds

    return worker_bounds(r.engines)[0] * r.cpus_per_engine + (cfg.reward.model_actors if cfg.reward.model else 0)


register(Stage("rlhf", "RLHF finished", RLHFConfig, validate_rlhf, "tidal.objectives.policy:PolicyObjective", True,
               loop_path="tidal.rlhf.learner:rl_loop_per_worker", services_path="tidal.rlhf.graph:start",
               service_cpus=_rl_cpus))
