"""Next-token prediction loss, as a pure function."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored label tokens (labels already shifted)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=ignore_index)


def split_sample(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed sample of ``seq_len + 1`` tokens -> (inputs, labels)."""
    return tokens[:, :-1], tokens[:, 1:]
