"""The RL policy objective (GRPO family): a clipped surrogate over response tokens, a KL
term to the reference policy, and an optional entropy bonus.

A batch is a rollout's micro-batch (``tidal.rlhf.source``): ``input_ids``/``targets`` as
for SFT (targets only on response tokens), and per-token float fields ``advantages``,
``old_logp`` (the learner's log-probs before this iteration's updates), ``ref_logp`` (the
reference's, when the KL is a loss term) and ``is_weights`` (truncated importance
sampling against the rollout engine, when on). The loss follows the objective contract:
``(loss_sum, weight, stats)`` with the aggregation mode's weight (tokens or sequences), so
the engine's one division by the global weight gives token-mean / sequence-mean losses
over the whole minibatch, whatever the world size.
"""
from __future__ import annotations

import torch

from tidal.objectives.batch import Batch, Objective
from tidal.objectives.logprobs import model_token_logprobs


class PolicyObjective(Objective):
    name = "policy"
    data_kind = "prompts"
    stats = ("kl", "entropy", "clip_frac", "ratio")

    def __init__(self, algorithm, max_tokens: int):
        self.alg, self.max_len = algorithm, max_tokens
        self.kl_coef = algorithm.kl_coef  # the KL controller's current value (the learner sets it)
        self.reset_range()

    def reset_range(self) -> None:
        """The importance ratio's range (min, max) over this rank's tokens since the reset
        (a range is no (sum, count) statistic: the learner reduces it on its own)."""
        self.ratio_range = (float("inf"), float("-inf"))

    @classmethod
    def from_config(cls, cfg) -> "PolicyObjective":
        return cls(cfg.algorithm, cfg.rollout.max_tokens)

    @property
    def kl_loss(self) -> bool:
        return self.alg.kl_coef > 0 and not self.alg.kl_in_reward

    def loss(self, model: torch.nn.Module, batch: Batch):
        from tidal.rlhf import algorithms as A

        a = self.alg
        logp, entropy = model_token_logprobs(model, batch["targets"], input_ids=batch["input_ids"],
                                             use_cache=False)
        mask = batch["loss_mask"]
        loss_sum, weight, stats = A.policy_loss(
            logp, batch["old_logp"], batch["advantages"], mask, a.clip_low, a.clip_high,
            a.dual_clip, a.loss_agg, max_len=self.max_len, is_weights=batch.get("is_weights"))
        count = mask.sum()
        ratio = torch.exp(logp.detach() - batch["old_logp"])[mask]
        if ratio.numel():
            lo, hi = self.ratio_range
            self.ratio_range = (min(lo, ratio.min().item()), max(hi, ratio.max().item()))
        if self.kl_loss:
            kl = A.kl_penalty(logp, batch["ref_logp"], a.kl_estimator)
            loss_sum = loss_sum + self.kl_coef * A.aggregate(kl, mask, a.loss_agg, self.max_len)[0]
            stats["kl"] = (torch.where(mask, kl.detach(), 0.0).sum(), count)
        if a.entropy_coef:
            loss_sum = loss_sum - a.entropy_coef * A.aggregate(entropy, mask, a.loss_agg, self.max_len)[0]
        stats["entropy"] = (torch.where(mask, entropy.detach(), 0.0).sum(), count)
        return loss_sum, weight, stats
