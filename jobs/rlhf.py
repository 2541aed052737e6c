"""RLHF (GRPO family) on the training engine: vLLM rollout engines generate from prompts,
rewards score the completions (a reward model served by Ray actors, rule rewards, your
functions), and FSDP2 learners on Ray Train update the policy, whose weights are synced to
the engines after every iteration.

    python jobs/rlhf.py [overrides]                 # local Ray runtime, or RAY_ADDRESS
    python jobs/rlhf.py --cfg job                   # print the resolved config
    ray job submit --working-dir . -- python jobs/rlhf.py algorithm=grpo model.pretrained=/path/to/sft/hf
"""
from dataclasses import replace

import _stage


def resolve(config):
    """reward.model=auto: the newest reward-model export (training one first if none)."""
    if config.reward.model == "auto":
        path = _stage.reward_model(config.run.output_dir)
        print(f"reward model {path}")
        config = replace(config, reward=replace(config.reward, model=path))
    return config


if __name__ == "__main__":
    _stage.run("rlhf", starts_from=_stage.sft_model, resolve=resolve)
