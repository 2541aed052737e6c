"""PPO's value objective: the critic's clipped regression of per-token values on returns.

The critic is the same network as the reward model (``AutoModelForSequenceClassification``
with one label): its scalar head already scores every position before the model pools the
last one, so :func:`token_values` reads the head's per-position output through a forward
hook, through the model's own forward (FSDP2's hooks gather and reduce as usual). The value
at the position that predicts response token ``k`` is ``V(prompt + response[:k])``, aligned
with the policy's log-probs; the value at the last position is the state after the whole
response (the bootstrap of a truncated one).
"""
from __future__ import annotations

import torch

from tidal.objectives.batch import Batch, Objective


def value_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head of a sequence classifier (``score`` in Llama, Qwen, Mistral, GPT-2)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(base).__name__} has no 'score' head: a value model is a sequence "
                         "classifier with one label")
    return head


def token_values(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` values of every position (fp32)."""
    seen = []
    hook = value_head(model).register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        hook.remove()
    out = seen[-1]
    out = out.full_tensor() if hasattr(out, "full_tensor") else out
    return out[..., 0].float()


class ValueObjective(Objective):
    """``batch`` as for :class:`tidal.objectives.policy.PolicyObjective`, with the per-token
    fields ``returns`` (GAE's targets) and ``old_values`` (the critic's before this
    iteration's updates), both aligned with ``loss_mask``."""

    name = "value"
    data_kind = "prompts"
    head = "reward"
    stats = ("vf_clip_frac", "value")

    def __init__(self, algorithm, max_tokens: int):
        self.alg, self.max_len = algorithm, max_tokens

    @classmethod
    def from_config(cls, cfg) -> "ValueObjective":
        return cls(cfg.algorithm, cfg.rollout.max_tokens)

    def loss(self, model: torch.nn.Module, batch: Batch):
        from tidal.rlhf import algorithms as A

        values = token_values(model, batch["input_ids"])
        return A.value_loss(values, batch["old_values"], batch["returns"], batch["loss_mask"],
                            self.alg.value_clip, "token_mean", self.max_len)
