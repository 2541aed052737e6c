"""Typed, frozen configuration schemas of the jobs around training: evaluation, data
preparation, export and sweeps. The training stages' schemas are in
:mod:`tidal.config.schema` and :mod:`tidal.config.schema_rl`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional

from tidal.config.schema import DataConfig, LoggerConfig, RunConfig


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate an HF model directory (see ``jobs/evaluate.py``)."""

    model_dir: str = "???"  # an HF directory (a run's hf/ export)
    reward: bool = False  # the model is a reward model (sequence classifier)
    before: Optional[str] = None  # forgetting check baseline, and the DPO reference
    text_data: Optional[str] = None  # a prepared pretraining data directory (its val split)
    sft_data: Optional[str] = None  # a prepared SFT data directory (its val split)
    pair_data: Optional[str] = None  # a prepared pair data directory (its val split)
    max_samples: int = 64
    prompts: List[str] = field(default_factory=lambda: [
        "Explain what a Python list comprehension is.", "Name three colors."])
    max_new_tokens: int = 32
    output: Optional[str] = None  # default: <model>/../eval-<model dir name>/
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass(frozen=True)
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="prepare"))


@dataclass(frozen=True)
class ExportConfig:
    """Convert a tidal checkpoint directory into a Hugging Face directory."""

    checkpoint: str = "???"
    # model: the trained model; value: PPO's value model (an HF sequence classifier)
    part: Literal["model", "value"] = "model"
    output: Optional[str] = None  # default: <checkpoint>/../hf-<checkpoint name> (value-<name> for part=value)
    # replace an output directory that is not a tidal export (its files are moved aside to
    # <output>.replaced-<time>, never deleted); a previous tidal export is always replaceable
    overwrite: bool = False


@dataclass(frozen=True)
class SearchParam:
    """One dimension of a sweep's search space: a dotted key of the swept job's config."""

    key: str = "???"  # e.g. optim.lr, schedule.name, schedule.warmup_steps
    type: str = "choice"  # loguniform | uniform | randint (low..high inclusive) | choice
    low: Optional[float] = None
    high: Optional[float] = None
    values: List[Any] = field(default_factory=list)  # choice: the candidates


@dataclass(frozen=True)
class SearchConfig:
    # grid: every combination of the choice values (num_samples repeats of it; other kinds
    # are drawn at random for each);
    # random: num_samples draws; optuna: num_samples trials proposed by Optuna's TPE
    algorithm: str = "random"
    num_samples: int = 4
    seed: int = 0
    space: List[SearchParam] = field(default_factory=list)


@dataclass(frozen=True)
class TrialSchedulerConfig:
    """How trials are cut short or forked; times are training steps."""

    name: str = "asha"  # asha (early stopping) | pbt (population based training) | fifo (none)
    grace_period: int = 10  # asha: steps before a trial can be stopped
    reduction_factor: int = 2  # asha: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = 10  # pbt: steps between exploit/explore decisions
    quantile_fraction: float = 0.25  # pbt: the bottom share copies the top share
    resample_probability: float = 0.25  # pbt: resample a mutated value instead of perturbing it
    synch: bool = False  # pbt: decide for the whole population at each interval (waits for the slowest)


@dataclass(frozen=True)
class SweepConfig:
    """Ray Tune over the training function of a job (see ``jobs/sweep.py``)."""

    name: str = "sweep"  # the experiment's name, and the W&B group of its trials
    job: str = "pretrain"  # the job swept: pretrain | sft | reward | dpo
    overrides: List[str] = field(default_factory=list)  # the job's config, Hydra syntax
    metric: str = "val_loss"  # reported by the job at each evaluation
    mode: str = "min"  # min | max
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: TrialSchedulerConfig = field(default_factory=TrialSchedulerConfig)
    concurrency: Optional[int] = None  # trials at once; None: as many as the cluster's CPUs fit
    max_failures: int = 1  # retries of a failed trial (from its last checkpoint); then failed
    output_dir: str = "outputs"  # <output_dir>/<name>/: trials, Tune state, results, plots
    resume: bool = True  # restore an interrupted sweep of this name (Tuner.restore)
