"""Reward model on the pretraining engine: the pretrained network with a scalar head,
trained with the Bradley-Terry loss on preference pairs; reports pair accuracy on a
held-out split and exports an ``AutoModelForSequenceClassification`` directory.

    python jobs/reward.py [overrides]                 # local Ray runtime, or RAY_ADDRESS
    python jobs/reward.py --cfg job                   # print the resolved config
    ray job submit --working-dir . -- python jobs/reward.py model.pretrained=/path/to/hf
"""
from dataclasses import replace

import _hydra
import hydra
from sft import latest_export

from tidal.config import RewardConfig, validate_pairs

_hydra.register("reward_schema", RewardConfig)


@hydra.main(version_base=None, config_path="../conf", config_name="reward")
def main(cfg) -> None:
    config = _hydra.build(cfg, RewardConfig, validate_pairs)  # fails before Ray starts
    from tidal.tracking.console import print_summary
    from tidal.train.launch import run_reward

    with _hydra.reported(_hydra.run_dir(config)):
        if not config.model.pretrained:  # the newest export (running the earlier stages first)
            config = replace(config, model=replace(config.model, pretrained=latest_export(config.run.output_dir)))
            config = _hydra.revalidate(config, validate_pairs)
            print(f"starting from {config.model.pretrained}")
        summary = run_reward(config)
    print_summary("reward model finished", summary)


if __name__ == "__main__":
    _hydra.run(main, RewardConfig)
