"""The micro-batch every objective reads: a mapping of named tensors.

Prepared samples are int64 arrays whose layout depends on the data kind; :func:`to_batch`
turns them into the same named fields for every stage:

- ``input_ids`` ``[N, L]``: the tokens the model reads;
- ``targets`` ``[N, L]``: the token each position predicts (``IGNORE`` where none counts);
- ``loss_mask`` ``[N, L]`` bool: ``targets != IGNORE``;
- ``position_ids`` ``[N, L]`` (packed SFT rows): restart at each packed example, so
  attention stays inside it;
- ``tokens``: how many real input tokens the batch holds (padding excluded, both sides of a
  pair counted): what tokens/s and MFU count;
- float fields a stage adds: ``ref_logps`` ``[B, 4]`` (a precomputed DPO reference: summed
  log-probs of chosen and rejected, and their token counts); later advantages, old
  log-probs.

Pair data stacks both sides, chosen first: rows ``0..B-1`` are the chosen replies and rows
``B..2B-1`` the rejected ones.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from tidal.objectives.logprobs import IGNORE

Batch = Dict[str, torch.Tensor]

KINDS = ("lm", "sft", "pairs")


def _shift(labels: torch.Tensor) -> torch.Tensor:
    pad = labels.new_full((labels.shape[0], 1), IGNORE)
    return torch.cat([labels[:, 1:], pad], dim=1)


def real_tokens(ids: np.ndarray, labels: np.ndarray, pad_id) -> int:
    """Tokens of right-padded rows before their padding (a trailing block of ``pad_id``
    ids with ``IGNORE`` labels); every token when ``pad_id`` is None."""
    if pad_id is None:
        return int(ids.size)
    pad = (ids == pad_id) & (labels == IGNORE)
    trailing = np.cumprod(pad[:, ::-1], axis=1).sum(axis=1)
    return int(ids.size - trailing.sum())


def to_batch(kind: str, samples: np.ndarray, device: torch.device, pad_id=None) -> Batch:
    """Named tensors for ``samples`` of data kind ``kind`` (see the module docstring):
    ``lm`` rows are ``seq_len + 1`` packed tokens; ``sft`` rows are ``[3, L]`` (ids, labels,
    positions); ``pairs`` rows are ``[4, L]`` (chosen ids and labels, rejected ids and
    labels), both right-padded with ``pad_id``."""
    t = torch.from_numpy(np.ascontiguousarray(samples)).to(device, non_blocking=True)
    if kind == "lm":  # packed: no padding
        batch = {"input_ids": t[:, :-1], "targets": t[:, 1:], "tokens": samples.shape[0] * (samples.shape[1] - 1)}
    elif kind == "sft":
        batch = {"input_ids": t[:, 0], "targets": _shift(t[:, 1]), "position_ids": t[:, 2],
                 "tokens": real_tokens(samples[:, 0], samples[:, 1], pad_id)}
    elif kind == "pairs":
        batch = {"input_ids": torch.cat([t[:, 0], t[:, 2]]),
                 "targets": _shift(torch.cat([t[:, 1], t[:, 3]])),
                 "tokens": real_tokens(samples[:, 0], samples[:, 1], pad_id)
                 + real_tokens(samples[:, 2], samples[:, 3], pad_id)}
    else:
        raise ValueError(f"unknown data kind '{kind}'; allowed: {', '.join(KINDS)}")
    batch["tokens"] = torch.tensor(batch["tokens"])
    batch["loss_mask"] = batch["targets"] != IGNORE
    return batch


class Objective:
    """What every objective declares (``tidal.stages`` builds one per run with
    ``from_config``): its name, the data kind its batches come from, the model head it
    trains, the statistics it reports, and frozen-model forward passes per token (MFU).
    ``loss(model, batch) -> (loss_sum, weight, stats)`` is the objective's own; ``stats``
    maps a name to ``(sum, count)`` on this batch, which the engine adds up over
    micro-batches and ranks and reports as ``sum / count``."""

    name = ""
    data_kind = "lm"
    head = "lm"
    stats: Tuple[str, ...] = ()
    reference_forwards = 0

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        return cls()
