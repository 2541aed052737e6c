"""The one job entrypoint every training stage shares (``jobs/<stage>.py`` names its stage):
compose the stage's conf file with Hydra, turn it into the stage's frozen config, validate
it before Ray starts, pick the starting model for a post-training stage when none is given
(running the earlier stages first), and run the stage on Ray Train."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from dataclasses import replace
from typing import Callable, Optional

import _hydra
import hydra

from tidal import stages

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(os.path.dirname(HERE), "conf")  # absolute: the decorated function lives here, not in __main__


def complete_exports(pattern: str) -> list:
    """HF exports matching ``pattern`` (``<dir>/hf``) that are complete (their completion
    marker written and every file there), oldest first."""
    from tidal.train.publish import MARKER, check_readable

    found = [os.path.dirname(m) for m in glob.glob(os.path.join(pattern, MARKER))]
    return sorted((d for d in found if not check_readable(d)), key=lambda d: os.path.getmtime(os.path.join(d, MARKER)))


def main_model(output_dir: str) -> str:
    """The newest complete main-job HF export under ``output_dir``; pretrains one first if none."""
    found = complete_exports(os.path.join(output_dir, "pretrain-*", "hf"))
    if not found:
        print(f"no pretrained model under {output_dir}: running jobs/pretrain.py first", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), f"run.output_dir={output_dir}"],
                       check=True)
        found = complete_exports(os.path.join(output_dir, "pretrain-*", "hf"))
    return found[-1]


def _newest_or_run(output_dir: str, stage: str, then: Callable[[str], str]) -> str:
    """The newest complete export of ``stage`` under ``output_dir``, running
    ``jobs/<stage>.py`` first when there is none."""
    pattern = os.path.join(output_dir, f"{stage}-*", "hf")
    if not complete_exports(pattern):
        print(f"no {stage} export under {output_dir}: running jobs/{stage}.py first", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, f"{stage}.py"), f"run.output_dir={output_dir}"],
                       check=True)
    return then(pattern)


def sft_model(output_dir: str) -> str:
    """For RLHF: the newest complete SFT export (running SFT, and pretraining, first if none)."""
    return _newest_or_run(output_dir, "sft", lambda pattern: complete_exports(pattern)[-1])


def reward_model(output_dir: str) -> str:
    """For RLHF's reward.model=auto: the newest reward-model export (training one first if none)."""
    return _newest_or_run(output_dir, "reward", lambda pattern: complete_exports(pattern)[-1])


def latest_export(output_dir: str) -> str:
    """For reward modelling and DPO: the newest complete SFT export, else the main job's model."""
    found = complete_exports(os.path.join(output_dir, "sft-*", "hf"))
    return found[-1] if found else main_model(output_dir)


def run(name: str, starts_from: Optional[Callable[[str], str]] = None,
        resolve: Optional[Callable] = None) -> None:
    """Run stage ``name`` as a job: ``python jobs/<name>.py [overrides]``. ``resolve``
    fills in what the config leaves to the job (e.g. RLHF's reward model) before launch."""
    stage = stages.get(name)
    _hydra.register(f"{stage.name}_schema", stage.schema)

    @hydra.main(version_base=None, config_path=CONF, config_name=stage.name)
    def main(cfg) -> None:
        config = _hydra.build(cfg, stage.schema, stage.validate)  # fails before Ray starts
        from tidal.tracking.console import print_summary
        from tidal.train.launch import run_stage

        with _hydra.reported(_hydra.run_dir(config)):  # one clear line on failure, traceback in the run
            if stage.needs_pretrained and not config.model.pretrained and starts_from is not None:
                # the newest export (running the earlier stages first)
                config = replace(config, model=replace(config.model, pretrained=starts_from(config.run.output_dir)))
                config = _hydra.revalidate(config, stage.validate)
                print(f"starting from {config.model.pretrained}")
            if resolve is not None:
                config = _hydra.revalidate(resolve(config), stage.validate)
            summary = run_stage(stage, config)
        print_summary(stage.title, summary)

    _hydra.run(main, stage.schema)
