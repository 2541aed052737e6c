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

from tidal.config import DPOConfig, PretrainConfig, RewardConfig, SFTConfig
from tidal.config.validate import validate_dpo, validate_pretrain, validate_reward, validate_sft
from tidal.registry import Registry


@dataclass(frozen=True)
class Stage:
    name: str
    title: str  # what the job says when the stage is done
    schema: type  # the config dataclass
    validate: Callable[[Any], Any]  # cfg -> cfg, or raises ConfigError naming the keys
    objective_path: str  # its objective class, "module:Class" (tidal.objectives)
    needs_pretrained: bool  # post-training: starts from model.pretrained

    @property
    def objective(self) -> type:
        """The objective class (imported on first use: a job checks its arguments before
        torch is imported); a run builds one with ``objective.from_config(cfg)``."""
        import importlib

        module, name = self.objective_path.split(":")
        return getattr(importlib.import_module(module), name)

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
