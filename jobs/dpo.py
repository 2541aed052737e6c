"""DPO on the pretraining engine: the policy starts from model.pretrained and is trained
against a frozen copy of it (the reference, sharded like the policy, no gradients);
reports rewards, margins, preference accuracy and the KL to the reference.

    python jobs/dpo.py [overrides]                 # local Ray runtime, or RAY_ADDRESS
    python jobs/dpo.py --cfg job                   # print the resolved config
    ray job submit --working-dir . -- python jobs/dpo.py model.pretrained=/path/to/hf
"""

import _stage

if __name__ == "__main__":
    _stage.run("dpo", starts_from=_stage.latest_export)
