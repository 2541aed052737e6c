"""Hyperparameter sweeps (learning-rate schedules first) with Ray Tune over the same
training function the jobs run: a trial is a normal run with overrides."""
from tidal.sweep.runner import run_sweep, sweep_dir
from tidal.sweep.space import check, job_metrics

__all__ = ["run_sweep", "sweep_dir", "check", "job_metrics"]
