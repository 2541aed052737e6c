"""Losses and objectives as pure functions and small classes."""
from tidal.objectives.causal_lm import (OBJECTIVES, LMObjective, SFTObjective, causal_lm_loss,
                                        split_sample)
from tidal.objectives.logprobs import chunked_token_logprobs, sequence_logprob, token_logprobs

__all__ = ["OBJECTIVES", "LMObjective", "SFTObjective", "causal_lm_loss", "split_sample",
           "chunked_token_logprobs", "sequence_logprob", "token_logprobs"]
