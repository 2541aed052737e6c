"""DPO on the pretraining engine: the policy starts from model.pretrained and is trained
against a frozen copy of it (the reference, sharded like the policy, no gradients);
reports rewards, margins, preference accuracy and the KL to the reference.

    python jobs/dpo.py [overrides]                 # local Ray runtime, or RAY_ADDRESS
    python jobs/dpo.py --cfg job                   # print the resolved config
    ray job submit --working-dir . -- python jobs/dpo.py model.pretrained=/path/to/hf
"""
from dataclasses import replace

import _hydra
import hydra
from sft import latest_export

from tidal.config import DPOConfig, validate_pairs

_hydra.register("dpo_schema", DPOConfig)


@hydra.main(version_base=None, config_path="../conf", config_name="dpo")
def main(cfg) -> None:
    config = _hydra.build(cfg, DPOConfig, validate_pairs)  # fails before Ray starts
    from tidal.tracking.console import print_summary
    from tidal.train.launch import run_dpo

    with _hydra.reported(_hydra.run_dir(config)):
        if not config.model.pretrained:  # the newest export (running the earlier stages first)
            config = replace(config, model=replace(config.model, pretrained=latest_export(config.run.output_dir)))
            config = _hydra.revalidate(config, validate_pairs)
            print(f"starting from {config.model.pretrained}")
        summary = run_dpo(config)
    print_summary("DPO finished", summary)


if __name__ == "__main__":
    _hydra.run(main, DPOConfig)
