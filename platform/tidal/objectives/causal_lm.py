"""Language-modelling objectives: next-token loss for pretraining and for SFT.

An objective is what turns a batch of samples into a loss (training) and into a summed
loss plus a token count (evaluation); the engine, loader, checkpoints and fault
tolerance are shared by every stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
    def _forward(model, batch):
        ids, labels, pos = batch[:, 0], batch[:, 1], batch[:, 2]
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        return logits[:, :-1], labels[:, 1:]

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits, labels = self._forward(model, batch)
        if not (labels != IGNORE).any():  # a batch of padding only: zero, but keep the graph
            return logits.sum() * 0.0
        return causal_lm_loss(logits, labels)

    def eval_sums(self, model: torch.nn.Module, batch: torch.Tensor):
        logits, labels = self._forward(model, batch)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return loss, int((labels != IGNORE).sum())
