"""Run a sweep: Ray Tune over the swept job's training function (``run_trial``)."""
from __future__ import annotations

import copy
import os
from typing import Dict

from tidal.config import ConfigError, from_dict, to_dict
from tidal.sweep import report
from tidal import stages
from tidal.sweep.space import check, mutations, tune_space
from tidal.sweep import trial

EXPERIMENT = "experiment"


def sweep_dir(sweep) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(sweep.output_dir)), sweep.name)


def prepare_base(sweep, base: Dict) -> Dict:
    """The job config every trial starts from: runs under ``<sweep dir>/trials``, paths
    absolute. Raises ConfigError when the sweep or the job config is wrong."""
    problems = check(sweep, base)
    if problems:
        raise ConfigError(problems)
    from tidal.train.launch import absolute_paths

    stage = stages.get(sweep.job)
    d = copy.deepcopy(base)
    d["run"]["output_dir"] = os.path.join(sweep_dir(sweep), "trials")
    d["run"]["resume_from"] = None
    return to_dict(absolute_paths(stage.validate(from_dict(stage.schema, d))))


def _scheduler(sweep, max_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    if s.name == "asha":
        return ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=min(s.grace_period, max_steps),
                             reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=mutations(sweep),
                                       quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability,
                                       custom_explore_fn=lambda config: clip(sweep, config),
                                       synch=s.synch)
    return FIFOScheduler()


def clip(sweep, config: Dict) -> Dict:
    """PBT perturbs by x0.8/x1.2 without bounds: keep every value inside its range (the
    space was validated at its corners), randint values whole."""
    for p in sweep.search.space:
        if p.type != "choice" and p.key in config:
            v = min(max(config[p.key], p.low), p.high)
            config[p.key] = int(round(v)) if p.type == "randint" else v
    return config


def _concurrency(sweep, base: Dict) -> int:
    import ray

    from tidal.config.schema import worker_bounds

    if sweep.concurrency:
        return sweep.concurrency
    workers = worker_bounds(base["scaling"]["workers"])[1]
    res = ray.cluster_resources()
    fit = int(res.get("CPU", 1) // (workers * base["scaling"]["cpus_per_worker"]))
    if base["scaling"]["use_gpu"] or (base["scaling"]["use_gpu"] is None and res.get("GPU", 0) > 0):
        fit = min(fit, int(res.get("GPU", 0) // workers))  # one GPU per worker
    return max(1, fit)


def run_sweep(sweep, base: Dict, log=print) -> Dict:
    """Run (or resume) the sweep and return its summary; results under ``sweep_dir``."""
    from ray import tune

    from tidal.train.launch import init_ray

    base = prepare_base(sweep, base)
    root = sweep_dir(sweep)
    os.makedirs(root, exist_ok=True)
    exp_path = os.path.join(root, "tune", EXPERIMENT)
    restoring = tune.Tuner.can_restore(exp_path)
    if restoring and not sweep.resume:
        raise ConfigError([f"name: '{sweep.name}' already has a sweep at {exp_path}; use "
                           "another name, or resume=true to continue it"])
    init_ray()
    # One prepared data set for every trial, made here before any trial starts.
    stage = stages.get(sweep.job)
    cfg = from_dict(stage.schema, base)
    storage = cfg.run.storage_path or cfg.run.output_dir
    data_dir, _ = stage.prepare_data(cfg, storage, log)
    log(f"data for every trial: {data_dir}")

    # the trial itself only waits on its run; the CPUs are held by that run's Ray Train workers
    fn = tune.with_resources(trial.trainable(base, sweep), {"cpu": 0.01})
    if restoring:
        log(f"resuming sweep '{sweep.name}' from {exp_path}: finished trials are kept, the others "
            "continue from their last checkpoints")
        tuner = tune.Tuner.restore(exp_path, trainable=fn, resume_unfinished=True,
                                   resume_errored=True)
    else:
        search_alg = None
        if sweep.search.algorithm == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=sweep.search.seed)
        elif sweep.search.algorithm == "random":
            from ray.tune.search.basic_variant import BasicVariantGenerator

            search_alg = BasicVariantGenerator(random_state=sweep.search.seed)
        tuner = tune.Tuner(
            fn, param_space=tune_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.search.num_samples,
                search_alg=search_alg, scheduler=_scheduler(sweep, cfg.train.max_steps),
                max_concurrent_trials=_concurrency(sweep, base),
                # a fresh process per trial: its cleanup ends its run (a reused one would not)
                reuse_actors=False),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=os.path.join(root, "tune"),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None), verbose=1))
    grid = tuner.fit()
    rows = report.collect(grid, sweep, base)
    report.table(rows, sweep)
    out = {"sweep_dir": root, "trials": len(rows),
           "completed": sum(r["status"] == "completed" for r in rows),
           "stopped_early": sum(r["status"].startswith("stopped") for r in rows),
           "failed": sum(r["status"].startswith("failed") for r in rows)}
    out.update(report.best_summary(rows, sweep) or {})
    out.update(report.write(rows, sweep, base, root))
    return out
