"""Supervised fine-tuning on the same FSDP2 engine as pretraining: the SFT objective
(loss on assistant tokens only, packed conversations kept apart) and instruction data.

    python jobs/sft.py [overrides]                  # local Ray runtime, or RAY_ADDRESS
    python jobs/sft.py --cfg job                    # print the resolved config
    ray job submit --working-dir . -- python jobs/sft.py model.pretrained=/path/to/hf
"""
import glob
import os
import subprocess
import sys
from dataclasses import replace

import _hydra
import hydra

from tidal.config import SFTConfig, validate_sft

_hydra.register("sft_schema", SFTConfig)
HERE = os.path.dirname(os.path.abspath(__file__))


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


def latest_export(output_dir: str) -> str:
    """For reward modelling and DPO: the newest complete SFT export, else the main job's model."""
    found = complete_exports(os.path.join(output_dir, "sft-*", "hf"))
    return found[-1] if found else main_model(output_dir)


@hydra.main(version_base=None, config_path="../conf", config_name="sft")
def main(cfg) -> None:
    config = _hydra.build(cfg, SFTConfig, validate_sft)  # fails before Ray starts
    from tidal.tracking.console import print_summary
    from tidal.train.launch import run_sft

    with _hydra.reported(_hydra.run_dir(config)):
        if not config.model.pretrained:  # the newest export (running the earlier stages first)
            config = replace(config, model=replace(config.model, pretrained=main_model(config.run.output_dir)))
            config = _hydra.revalidate(config, validate_sft)
            print(f"starting from {config.model.pretrained}")
        summary = run_sft(config)
    print_summary("SFT finished", summary)


if __name__ == "__main__":
    _hydra.run(main, SFTConfig)
