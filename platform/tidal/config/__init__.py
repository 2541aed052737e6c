"""Typed, frozen config schemas and their validation (no Hydra/OmegaConf in here)."""
from tidal.config.convert import ConfigError, allowed_keys, fingerprint, from_dict, to_dict
from tidal.config.schema import (
    AlgorithmConfig,
    CriticConfig,
    DataConfig,
    DPOConfig,
    DPOParams,
    EvalConfig,
    ExportConfig,
    LoggerConfig,
    LoRAConfig,
    ModelConfig,
    OptimConfig,
    PairDataConfig,
    PrepareConfig,
    PretrainConfig,
    PromptDataConfig,
    RewardConfig,
    RLHFConfig,
    RLRewardConfig,
    RolloutConfig,
    RunConfig,
    ScalingConfig,
    ScheduleConfig,
    SFTConfig,
    SFTDataConfig,
    SearchConfig,
    SearchParam,
    SweepConfig,
    TokenizerConfig,
    TrainConfig,
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
