"""A sweep's search space: validation against the swept job's schema, Ray Tune domains,
and the trial config (the job's config with the sampled values set)."""
from __future__ import annotations

import copy
from typing import Any, Dict, List

from tidal.config import ConfigError, SweepConfig, allowed_keys, from_dict

TYPES = ("loguniform", "uniform", "randint", "choice")
ALGORITHMS = ("grid", "random", "optuna")
SCHEDULERS = ("asha", "pbt", "fifo")


def job_metrics(job: str) -> List[str]:
    """What the job reports at each evaluation (a sweep ranks trials by one of these)."""
    from tidal import stages

    stage = stages.get(job)
    keys = list(stage.objective.stats)
    out = ["val_loss", "val_ppl"] + [f"val_{k}" for k in keys] + ["loss"]
    if stage.data_kind == "lm":  # bits per byte: the corpus records its bytes
        out.insert(2, "val_bpb")
    return out + keys


def set_key(d: Dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def get_key(d: Dict, dotted: str) -> Any:
    for p in dotted.split("."):
        d = d[p]
    return d


def coerce(param, value: Any) -> Any:
    """A sampled value in the type the config expects (Tune gives numpy scalars)."""
    if param.type == "randint":
        return int(value)
    if param.type in ("loguniform", "uniform"):
        return float(value)
    return value.item() if hasattr(value, "item") else value


def trial_dict(base: Dict, sweep: SweepConfig, params: Dict[str, Any]) -> Dict:
    d = copy.deepcopy(base)
    for p in sweep.search.space:
        if p.key in params:
            set_key(d, p.key, coerce(p, params[p.key]))
    return d


def _corners(sweep: SweepConfig) -> List[Dict[str, Any]]:
    """Values that probe each dimension's ends (and every choice), for up-front validation."""
    out = []
    for p in sweep.search.space:
        vals = list(p.values) if p.type == "choice" else [p.low, p.high]
        for v in vals:
            out.append({p.key: coerce(p, v)})
    return out


def check(sweep: SweepConfig, base: Dict) -> List[str]:
    """Every problem with the sweep, before any trial starts (an empty list when none)."""
    p: List[str] = []
    from tidal import stages

    if sweep.job not in stages.STAGES:
        return [f"job: '{sweep.job}' is not one of {', '.join(stages.STAGES)}"]
    stage = stages.get(sweep.job)
    schema, validate = stage.schema, stage.validate
    from tidal.config.validate import check_credentials, check_name

    check_name(p, "name", sweep.name)
    check_credentials(p, sweep)
    if stage.needs_pretrained and not (base.get("model") or {}).get("pretrained"):
        p.append(f"overrides: the {sweep.job} job starts from an HF model directory; add "
                 "model.pretrained=<dir> (e.g. a pretraining run's hf/ export) to the overrides")
    metrics = job_metrics(sweep.job)
    if sweep.metric not in metrics:
        p.append(f"metric: '{sweep.metric}' is not reported by the {sweep.job} job; "
                 f"it reports {', '.join(metrics)}")
    if sweep.mode not in ("min", "max"):
        p.append(f"mode: '{sweep.mode}' is not one of min, max")
    _check_settings(sweep, p)
    _check_space(sweep, schema, p)
    if p:
        return p
    # every corner of the space must make a valid config of the job
    for corner in _corners(sweep):
        try:
            validate(from_dict(schema, trial_dict(base, sweep, corner)))
        except ConfigError as e:
            (key, value), = corner.items()
            p += [f"search.space ({key}={value!r}): {msg}" for msg in e.problems]
    return p


def _check_settings(sweep: SweepConfig, p: List[str]) -> None:
    """The search, scheduler and driver settings."""
    s, sc = sweep.search, sweep.scheduler
    if s.algorithm not in ALGORITHMS:
        p.append(f"search.algorithm: '{s.algorithm}' is not one of {', '.join(ALGORITHMS)}")
    if s.num_samples < 1:
        p.append(f"search.num_samples: must be >= 1, got {s.num_samples}")
    if sc.name not in SCHEDULERS:
        p.append(f"scheduler.name: '{sc.name}' is not one of {', '.join(SCHEDULERS)}")
    if sc.name == "pbt" and s.algorithm == "optuna":
        p.append("scheduler.name: pbt draws its first population itself; use "
                 "search.algorithm=random or grid with it")
    for key, v, lo in (("grace_period", sc.grace_period, 1), ("reduction_factor", sc.reduction_factor, 2),
                       ("perturbation_interval", sc.perturbation_interval, 1)):
        if v < lo:
            p.append(f"scheduler.{key}: must be >= {lo}, got {v}")
    if not 0 < sc.quantile_fraction <= 0.5:
        p.append(f"scheduler.quantile_fraction: must be in (0, 0.5], got {sc.quantile_fraction}")
    if sweep.concurrency is not None and sweep.concurrency < 1:
        p.append(f"concurrency: must be >= 1 or null, got {sweep.concurrency}")
    if "://" in sweep.output_dir:
        p.append(f"output_dir: '{sweep.output_dir}': a sweep keeps its Tune state and trials on a "
                 "file system path; on several nodes use a directory every node mounts (NFS)")
    if sweep.max_failures < 0:
        p.append(f"max_failures: must be >= 0, got {sweep.max_failures}")
    if not s.space:
        p.append("search.space: empty; name at least one key to sweep, e.g. "
                 "{key: optim.lr, type: loguniform, low: 1e-4, high: 1e-2} (presets: sweep=lr_schedule)")


def _check_space(sweep: SweepConfig, schema, p: List[str]) -> None:
    """Each searched key: a key of the job's config, a known type, a sound range or values."""
    from tidal.optim import OPTIMIZERS, SCHEDULES

    s = sweep.search
    seen = set()
    for i, prm in enumerate(s.space):
        where = f"search.space[{i}]"
        if prm.key in seen:
            p.append(f"{where}.key: '{prm.key}' appears twice")
        seen.add(prm.key)
        if allowed_keys(schema, prm.key) is not None:
            p.append(f"{where}.key: '{prm.key}' is not a key of the {sweep.job} config")
            continue
        if prm.key.startswith("data."):
            p.append(f"{where}.key: '{prm.key}': trials share one prepared data set; sweep "
                     "training settings (optim, schedule, train, model.lora), not data")
        if sweep.scheduler.name == "pbt" and prm.key.startswith("model."):
            p.append(f"{where}.key: '{prm.key}': pbt forks trials from each other's checkpoints, "
                     "which needs the same model in every trial")
        if sweep.scheduler.name == "pbt" and prm.key == "optim.name":
            p.append(f"{where}.key: '{prm.key}': pbt forks trials from each other's checkpoints, "
                     "whose optimizer state only the same optimizer can continue; search it with "
                     "asha or fifo")
        if prm.type not in TYPES:
            p.append(f"{where}.type: '{prm.type}' is not one of {', '.join(TYPES)}")
            continue
        if prm.type == "choice":
            if not prm.values:
                p.append(f"{where}.values: a choice needs at least one value")
        else:
            if prm.low is None or prm.high is None or not prm.low < prm.high:
                p.append(f"{where}: {prm.type} needs low < high, got low={prm.low} high={prm.high}")
            elif prm.type == "loguniform" and prm.low <= 0:
                p.append(f"{where}.low: loguniform needs low > 0, got {prm.low}")
        registry = {"schedule.name": SCHEDULES, "optim.name": OPTIMIZERS}.get(prm.key)
        for v in prm.values if registry is not None else ():
            if v not in registry:
                p.append(f"{where}.values: '{v}' is not a registered {registry.kind}; "
                         f"allowed: {', '.join(sorted(registry))}")


def _domain(p):
    from ray import tune

    if p.type == "loguniform":
        return tune.loguniform(p.low, p.high)
    if p.type == "uniform":
        return tune.uniform(p.low, p.high)
    return tune.randint(int(p.low), int(p.high) + 1)


def tune_space(sweep: SweepConfig) -> Dict[str, Any]:
    """Ray Tune domains keyed by the dotted config keys."""
    from ray import tune

    grid = sweep.search.algorithm == "grid"
    return {p.key: (tune.grid_search(list(p.values)) if grid else tune.choice(list(p.values)))
            if p.type == "choice" else _domain(p) for p in sweep.search.space}


def mutations(sweep: SweepConfig) -> Dict[str, Any]:
    """PBT's mutation space: continuous values are perturbed or resampled, choices resampled."""
    return {p.key: list(p.values) if p.type == "choice" else _domain(p) for p in sweep.search.space}
