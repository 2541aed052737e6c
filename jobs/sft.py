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


def main_model(output_dir: str) -> str:
    """The newest main-job HF export under ``output_dir``; pretrains one first if none."""
    found = sorted(glob.glob(os.path.join(output_dir, "pretrain-*", "hf", "config.json")),
                   key=os.path.getmtime)
    if not found:
        print(f"no pretrained model under {output_dir}: running jobs/pretrain.py first", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), f"run.output_dir={output_dir}"],
                       check=True)
        found = sorted(glob.glob(os.path.join(output_dir, "pretrain-*", "hf", "config.json")),
                       key=os.path.getmtime)
    return os.path.dirname(found[-1])


def latest_export(output_dir: str) -> str:
    """For reward modelling and DPO: the newest SFT export, else the main job's model."""
    found = sorted(glob.glob(os.path.join(output_dir, "sft-*", "hf", "config.json")), key=os.path.getmtime)
    return os.path.dirname(found[-1]) if found else main_model(output_dir)


@hydra.main(version_base=None, config_path="../conf", config_name="sft")
def main(cfg) -> None:
    config = _hydra.build(cfg, SFTConfig, validate_sft)  # fails before Ray starts
    from tidal.tracking.console import print_summary
    from tidal.train.launch import RunStopped, run_sft

    if not config.model.pretrained:
        config = replace(config, model=replace(config.model, pretrained=main_model(config.run.output_dir)))
        print(f"starting from {config.model.pretrained}")
    try:
        summary = run_sft(config)
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    print_summary("SFT finished", summary)


if __name__ == "__main__":
    _hydra.precheck_overrides(SFTConfig, sys.argv[1:])
    main()
