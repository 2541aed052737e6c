"""Pretrain a causal LM: prepare data if needed, then FSDP2 workers on Ray Train.

    python jobs/pretrain.py [overrides]           # local Ray runtime, or RAY_ADDRESS
    python jobs/pretrain.py --cfg job             # print the resolved config
    ray job submit --working-dir . -- python jobs/pretrain.py model=tiny optim.lr=1e-3
"""

import _stage

if __name__ == "__main__":
    _stage.run("pretrain")
