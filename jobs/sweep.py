"""Sweep a job's hyperparameters (learning-rate schedules first) with Ray Tune: every trial
is a normal run of that job with the trial's values, on its own Ray Train workers.

    python jobs/sweep.py                                  # preset sweep=lr_schedule on pretraining
    python jobs/sweep.py sweep=wsd search.num_samples=8   # WSD cooldown, Optuna proposals
    python jobs/sweep.py sweep=pbt                        # population based training
    python jobs/sweep.py job=sft 'overrides=[model.pretrained=outputs/<run>/hf]'
    python jobs/sweep.py name=<an interrupted sweep>      # resumes it (Tuner.restore)
    ray job submit --working-dir . -- python jobs/sweep.py name=lr1
"""
import _hydra
import hydra
from omegaconf import OmegaConf

from tidal import stages
from tidal.config import ConfigError, SweepConfig

_hydra.register("sweep_schema", SweepConfig)
for _stage in stages.STAGES.values():  # the swept job's conf file names its schema
    _hydra.register(f"{_stage.name}_schema", _stage.schema)


def job_config(sweep) -> dict:
    """The swept job's own config (its conf/<job>.yaml with ``sweep.overrides``)."""
    from hydra import compose

    if sweep.job not in stages.STAGES:
        _hydra.fail(ConfigError([f"job: '{sweep.job}' is not one of {', '.join(stages.STAGES)}"]))
    _hydra.precheck_overrides(stages.get(sweep.job).schema, list(sweep.overrides))
    try:
        composed = compose(config_name=sweep.job, overrides=list(sweep.overrides))
    except Exception as e:  # noqa: BLE001 - Hydra's own composition errors
        _hydra.fail(ConfigError([f"overrides: {e}"]))
    data = OmegaConf.to_container(composed, resolve=True, throw_on_missing=True)
    data.pop("hydra", None)
    return data


@hydra.main(version_base=None, config_path="../conf", config_name="sweep")
def main(cfg) -> None:
    sweep = _hydra.build(cfg, SweepConfig, lambda s: s)
    base = job_config(sweep)
    from tidal.sweep import check, run_sweep
    from tidal.tracking.console import print_summary

    problems = check(sweep, base)  # before any Ray work
    if problems:
        _hydra.fail(ConfigError(problems))
    from tidal.sweep.runner import sweep_dir

    with _hydra.reported(sweep_dir(sweep)):
        summary = run_sweep(sweep, base)
    print_summary(f"sweep '{sweep.name}' finished", summary)


if __name__ == "__main__":
    _hydra.run(main, SweepConfig)
