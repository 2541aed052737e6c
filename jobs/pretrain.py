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
    from tidal.train.launch import RunStopped, run_pretrain

    try:
        summary = run_pretrain(config)
    except RunStopped as e:  # the run stopped itself (divergence, a repeating failure)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except ValueError as e:  # e.g. resuming with a config that changes the checkpoint's meaning
        if "run.allow_changes" not in str(e) and "run.resume_from" not in str(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_summary("pretraining finished", summary)


if __name__ == "__main__":
    _hydra.precheck_overrides(PretrainConfig, sys.argv[1:])
    main()
