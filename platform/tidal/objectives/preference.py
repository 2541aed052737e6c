"""Preference objectives on pair batches (both sides stacked, chosen first; see
``tidal.objectives.batch``): a Bradley-Terry reward model and DPO (sigmoid, IPO and
conservative label-smoothed variants) against a frozen reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tidal.objectives.batch import IGNORE, Batch, Objective
from tidal.objectives.logprobs import model_token_logprobs, shift_targets


class RewardObjective(Objective):
    """A scalar reward at each sequence's last token; loss ``-log sigmoid(r_c - r_r)`` summed
    over pairs (the weight is the number of pairs)."""

    name = "reward"
    data_kind = "pairs"
    head = "reward"
    stats = ("accuracy", "margin")

    def loss(self, model, batch: Batch):
        r = model(input_ids=batch["input_ids"]).logits.squeeze(-1).float()
        n = r.shape[0] // 2
        d = r[:n] - r[n:]
        return -F.logsigmoid(d).sum(), n, {"accuracy": ((d > 0).sum(), n), "margin": (d.detach().sum(), n)}


def sequence_logps(model, ids: torch.Tensor, labels: torch.Tensor, average: bool = False):
    """Sum (or mean) of the log-probs of each sequence's labelled tokens, and per-token
    log-probs with their mask (for KL estimates); chunked, never the full logits."""
    return _sequence_logps(model, ids, shift_targets(labels), average)


def _sequence_logps(model, ids: torch.Tensor, target: torch.Tensor, average: bool = False):
    tok, _ = model_token_logprobs(model, target, input_ids=ids)
    mask = target != IGNORE
    tok = tok * mask
    total = tok.sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total, tok, mask


def reference_sums(reference, batch: Batch):
    """Per pair: the reference's summed log-probs ``[B, 2]`` (chosen, rejected) and
    labelled-token counts ``[B, 2]`` (for ``dpo.reference=precompute``)."""
    total, _, mask = _sequence_logps(reference, batch["input_ids"], batch["targets"])
    n = total.shape[0] // 2
    counts = mask.sum(-1).double()
    return (torch.stack([total[:n], total[n:]], 1).double(),
            torch.stack([counts[:n], counts[n:]], 1))


class DPOObjective(Objective):
    """``x = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r))``;
    sigmoid: ``-log sigmoid(beta x)``; cdpo: label smoothing ``eps`` over both orders;
    ipo: ``(x - 1/(2 beta))^2`` on length-averaged log-probs. The loss is summed over pairs
    (the weight is the number of pairs). Reference log-probs are computed per batch without
    gradients (``self.reference``, set by the worker), or come with the batch
    (``ref_logps``, from the precomputed table); the KL estimate is then per sequence (k1)
    instead of per token (k3). Statistics: preference accuracy, margin, the implicit
    rewards, and the KL per reply token."""

    name = "dpo"
    data_kind = "pairs"
    needs_reference = True
    stats = ("accuracy", "margin", "chosen_reward", "rejected_reward", "kl")

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0):
        self.beta, self.loss_type, self.eps = beta, loss, label_smoothing
        self.reference = None

    @property
    def reference_forwards(self) -> int:
        """Forward passes of a frozen model per training token (counted in MFU)."""
        return 1 if self.reference is not None else 0

    @classmethod
    def from_config(cls, cfg) -> "DPOObjective":
        d = cfg.dpo
        return cls(beta=d.beta, loss=d.loss, label_smoothing=d.label_smoothing)

    def _terms(self, model, batch: Batch):
        ids, target = batch["input_ids"], batch["targets"]
        avg = self.loss_type == "ipo"
        pi, pi_tok, mask = _sequence_logps(model, ids, target, avg)
        n = pi.shape[0] // 2
        if "ref_logps" in batch:
            r = batch["ref_logps"]  # [B, 4]: sums chosen, rejected; counts chosen, rejected
            sums, counts = torch.cat([r[:, 0], r[:, 1]]), torch.cat([r[:, 2], r[:, 3]])
            ref = (sums / counts.clamp(min=1) if avg else sums).to(pi.dtype)
            # k1: the summed per-token log-ratio, from sequence sums
            kl = (pi_tok.detach().sum() - sums.sum().to(pi.dtype), counts.sum().to(pi.dtype))
        else:
            with torch.no_grad():
                ref, ref_tok, _ = _sequence_logps(self.reference, ids, target, avg)
            # k3 estimate of KL(policy || reference) on the pairs' reply tokens (>= 0)
            log_ratio = (ref_tok - pi_tok.detach())[mask]
            kl = ((log_ratio.exp() - 1 - log_ratio).sum(), mask.sum())
        x = (pi[:n] - pi[n:]) - (ref[:n] - ref[n:])
        if self.loss_type == "ipo":
            losses = (x - 1.0 / (2 * self.beta)) ** 2
        else:
            eps = self.eps if self.loss_type == "cdpo" else 0.0
            losses = -(1 - eps) * F.logsigmoid(self.beta * x) - eps * F.logsigmoid(-self.beta * x)
        chosen = self.beta * (pi[:n] - ref[:n]).detach()
        rejected = self.beta * (pi[n:] - ref[n:]).detach()
        return losses, chosen, rejected, kl

    def loss(self, model, batch: Batch):
        losses, chosen, rejected, kl = self._terms(model, batch)
        n = losses.shape[0]
        return losses.sum(), n, {"accuracy": ((chosen > rejected).sum(), n),
                                 "margin": ((chosen - rejected).sum(), n),
                                 "chosen_reward": (chosen.sum(), n),
                                 "rejected_reward": (rejected.sum(), n), "kl": kl}
