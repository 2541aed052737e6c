"""Losses as pure functions."""
from tidal.objectives.causal_lm import causal_lm_loss, split_sample

__all__ = ["causal_lm_loss", "split_sample"]
