"""Supervised fine-tuning on the same FSDP2 engine as pretraining: the SFT objective
(loss on assistant tokens only, packed conversations kept apart) and instruction data.

    python jobs/sft.py [overrides]                  # local Ray runtime, or RAY_ADDRESS
    python jobs/sft.py --cfg job                    # print the resolved config
    ray job submit --working-dir . -- python jobs/sft.py model.pretrained=/path/to/hf
"""

import _stage

if __name__ == "__main__":
    _stage.run("sft", starts_from=_stage.main_model)
