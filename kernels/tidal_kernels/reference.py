"""Pure-torch references for the Triton kernels: the plain computation each kernel must equal.

They materialise what the kernels avoid (here the full fp32 ``[tokens x vocab]`` logits) and
are used by the parity tests and the benchmarks. ``tidal.objectives.logprobs.token_logprobs``
is the same function on tidal's side; the tests check the two agree, so this package does not
import ``tidal``.
"""
from __future__ import annotations

from typing import Tuple

import torch


def token_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             ignore_index: int = -100) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` of shape ``labels.shape`` (fp32) for ``p = softmax(hidden @ weight.T)``:
    ``logp`` is ``log p(label)`` (0 where the label is ``ignore_index``), ``entropy`` is
    ``-sum p log p`` of the full distribution at every position. ``hidden`` is ``[..., H]``,
    ``weight`` the ``[V, H]`` output projection."""
    logits = (hidden @ weight.t()).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(labels == ignore_index, torch.zeros_like(logp), logp)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
