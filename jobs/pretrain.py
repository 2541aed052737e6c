"""Pretrain a causal LM: prepare data if needed, then FSDP2 workers on Ray Train.

    python jobs/pretrain.py [overrides]           # local Ray runtime, or RAY_ADDRESS
    python jobs/pretrain.py --cfg job             # print the resolved config
    ray job submit --working-dir . -- python jobs/pretrain.py model=tiny optim.lr=1e-3
"""
import sys

import _hydra
import hydra

from tidal.config import PretrainConfig, validate_pretrain

_hydra.register("pretrain_schema", PretrainConfig)


@hydra.main(version_base=None, config_path="../conf", config_name="pretrain")
def main(cfg) -> None:
    config = _hydra.build(cfg, PretrainConfig, validate_pretrain)  # fails before Ray starts
    from tidal.tracking.console import print_summary
    from tidal.train.launch import run_pretrain

    print_summary("pretraining finished", run_pretrain(config))


if __name__ == "__main__":
    _hydra.precheck_overrides(PretrainConfig, sys.argv[1:])
    main()
