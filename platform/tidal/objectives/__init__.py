"""Losses and objectives: ``loss(model, batch) -> (loss_sum, weight, stats)`` over a batch
of named tensors (``batch``), for training and evaluation alike. Every stage is an objective
on the same engine."""
from tidal.objectives.batch import IGNORE, Batch, to_batch
from tidal.objectives.causal_lm import LMObjective, SFTObjective, causal_lm_loss, split_sample
from tidal.objectives.logprobs import (chunked_token_logprobs, model_token_logprobs, sequence_logprob,
                                      shift_targets, token_logprobs)
from tidal.objectives.preference import DPOObjective, RewardObjective

__all__ = ["IGNORE", "Batch", "to_batch", "LMObjective", "SFTObjective", "RewardObjective", "DPOObjective",
           "causal_lm_loss", "split_sample", "chunked_token_logprobs", "sequence_logprob",
           "token_logprobs", "model_token_logprobs", "shift_targets"]
