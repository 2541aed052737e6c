"""Pretrain a causal LM: prepare data if needed, then FSDP2 workers on Ray Train.

    python jobs/pretrain.py [overrides]           # local Ray runtime, or RAY_ADDRESS
    python jobs/pretrain.py --cfg job             # print the resolved config
    ray job submit --working-dir . -- python jobs/pretrain.py model=tiny optim.lr=1e-3
"""
import _hydra
import hydra

from tidal.config import PretrainConfig, validate_pretrain

_hydra.register("pretrain_schema", PretrainConfig)


@hydra.main(version_base=None, config_path="../conf", config_name="pretrain")
def main(cfg) -> None:
    config = _hydra.build(cfg, PretrainConfig, validate_pretrain)  # fails before Ray starts
    from tidal.tracking.console import print_summary
    from tidal.train.launch import run_pretrain

    with _hydra.reported(_hydra.run_dir(config)):  # one clear line on failure, traceback in the run
        summary = run_pretrain(config)
    print_summary("pretraining finished", summary)


if __name__ == "__main__":
    _hydra.run(main, PretrainConfig)
