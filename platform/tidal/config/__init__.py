"""Typed, frozen config schemas and their validation (no Hydra/OmegaConf in here)."""
from tidal.config.convert import ConfigError, allowed_keys, fingerprint, from_dict, to_dict
from tidal.config.schema import (
    DataConfig,
    DPOConfig,
    DPOParams,
    LoggerConfig,
    LoRAConfig,
    ModelConfig,
    OptimConfig,
    PairDataConfig,
    PretrainConfig,
    RewardConfig,
    RunConfig,
    ScalingConfig,
    ScheduleConfig,
    SFTConfig,
    SFTDataConfig,
    TokenizerConfig,
    TrainConfig,
)
from tidal.config.schema_rl import (
    AlgorithmConfig,
    CriticConfig,
    PromptDataConfig,
    RLHFConfig,
    RLRewardConfig,
    RolloutConfig,
)
from tidal.config.schema_tools import (
    EvalConfig,
    ExportConfig,
    PrepareConfig,
    SearchConfig,
    SearchParam,
    SweepConfig,
    TrialSchedulerConfig,
)
from tidal.config.validate import (validate_dpo, validate_eval, validate_export, validate_prepare, validate_pretrain,
                                   validate_reward, validate_sft)
from tidal.config.validate_rl import validate_rlhf

__all__ = [
    "ConfigError", "allowed_keys", "fingerprint", "from_dict", "to_dict",
    "DataConfig", "ExportConfig", "LoggerConfig", "LoRAConfig", "ModelConfig", "OptimConfig", "PrepareConfig",
    "PretrainConfig", "RunConfig", "ScalingConfig", "ScheduleConfig", "TokenizerConfig",
    "SFTConfig", "SFTDataConfig", "TrainConfig", "validate_export", "validate_prepare",
    "validate_pretrain", "validate_sft", "validate_reward", "validate_dpo", "DPOConfig", "DPOParams",
    "PairDataConfig", "RewardConfig", "EvalConfig", "validate_eval", "SearchConfig", "SearchParam",
    "SweepConfig", "TrialSchedulerConfig", "AlgorithmConfig", "CriticConfig", "PromptDataConfig", "RLHFConfig",
    "RLRewardConfig", "RolloutConfig", "validate_rlhf",
]
