"""Language-modelling objectives: next-token loss for pretraining and for SFT.

An objective is what turns a batch of samples into a loss (training) and into a summed
loss plus a token count (evaluation); the engine, loader, checkpoints and fault
tolerance are shared by every stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tidal.objectives.logprobs import model_token_logprobs, shift_targets

IGNORE = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored label tokens (labels already shifted)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=ignore_index)


def split_sample(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed sample of ``seq_len + 1`` tokens -> (inputs, labels)."""
    return tokens[:, :-1], tokens[:, 1:]


class LMObjective:
    """Pretraining: samples are ``[seq_len + 1]`` packed tokens; every next token counts."""

    name = "lm"

    def __call__(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        inputs, labels = split_sample(tokens)
        return causal_lm_loss(model(input_ids=inputs).logits, labels)

    def eval_sums(self, model: torch.nn.Module, tokens: torch.Tensor):
        inputs, labels = split_sample(tokens)
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               reduction="sum")
        return loss, labels.numel()


class SFTObjective:
    """SFT: samples are ``[3, seq_len]`` (ids, labels, positions); the loss is the mean over
    response tokens only. Position ids restart at each packed example, so attention stays
    within it (the model builds the block-diagonal mask from them)."""

    name = "sft"

    @staticmethod
    def _token_logps(model, batch):
        """Log-probs of the response tokens (chunked: never the full logits) and their mask."""
        ids, labels, pos = batch[:, 0], batch[:, 1], batch[:, 2]
        target = shift_targets(labels)
        logp, _ = model_token_logprobs(model, target, input_ids=ids, position_ids=pos, use_cache=False)
        return logp, target != IGNORE

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logp, mask = self._token_logps(model, batch)
        # a batch of padding only gives zero (logp is 0 there), keeping the graph
        return -logp.sum() / mask.sum().clamp(min=1)

    def eval_sums(self, model: torch.nn.Module, batch: torch.Tensor):
        logp, mask = self._token_logps(model, batch)
        return -logp.sum(), int(mask.sum())
