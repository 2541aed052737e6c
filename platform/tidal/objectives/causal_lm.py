"""Language-modelling objectives: next-token loss for pretraining and for SFT.

An objective turns a batch of named tensors (``tidal.objectives.batch``) into
``(loss_sum, weight, stats)``: the loss summed over what it counts, how many things it
counted (tokens here), and statistics as (sum, count). The engine adds these up over
micro-batches and ranks and divides once, so every counted token weighs the same whatever
the world size or micro-batch grouping. Both objectives use the fused chunked loss
(``model_nll_sum``): no ``[tokens x vocab]`` logits, no recomputation in backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tidal.objectives.batch import IGNORE, Batch, Objective
from tidal.objectives.logprobs import model_nll_sum


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored label tokens (labels already shifted)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=ignore_index)


def split_sample(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed sample of ``seq_len + 1`` tokens -> (inputs, labels)."""
    return tokens[:, :-1], tokens[:, 1:]


class LMObjective(Objective):
    """Pretraining: every next token of the packed samples counts."""

    name = "lm"

    def loss(self, model: torch.nn.Module, batch: Batch):
        total = model_nll_sum(model, batch["targets"], input_ids=batch["input_ids"])
        return total, batch["loss_mask"].sum(), {}


class SFTObjective(Objective):
    """SFT: the loss counts response tokens only (the others are ``IGNORE``). Position ids
    restart at each packed example, so attention stays within it (the model builds the
    block-diagonal mask from them). Log-probs are chunked: never the full logits."""

    name = "sft"
    data_kind = "sft"

    def loss(self, model: torch.nn.Module, batch: Batch):
        total = model_nll_sum(model, batch["targets"], input_ids=batch["input_ids"],
                              position_ids=batch["position_ids"], use_cache=False)
        # a batch of padding only gives zero, keeping the graph
        return total, batch["loss_mask"].sum(), {}
