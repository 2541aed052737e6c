"""Reward model on the pretraining engine: the pretrained network with a scalar head,
trained with the Bradley-Terry loss on preference pairs; reports pair accuracy on a
held-out split and exports an ``AutoModelForSequenceClassification`` directory.

    python jobs/reward.py [overrides]                 # local Ray runtime, or RAY_ADDRESS
    python jobs/reward.py --cfg job                   # print the resolved config
    ray job submit --working-dir . -- python jobs/reward.py model.pretrained=/path/to/hf
"""

import _stage

if __name__ == "__main__":
    _stage.run("reward", starts_from=_stage.latest_export)
