"""Preference objectives on ``[4, seq_len]`` pair samples (chosen ids, chosen labels,
rejected ids, rejected labels): a Bradley-Terry reward model and DPO (sigmoid, IPO and
conservative label-smoothed variants) against a frozen reference."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from tidal.objectives.logprobs import model_token_logprobs, shift_targets

IGNORE = -100


def _pair(batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both sides stacked: ids ``[2B, L]`` and labels ``[2B, L]`` (chosen first)."""
    return torch.cat([batch[:, 0], batch[:, 2]]), torch.cat([batch[:, 1], batch[:, 3]])


class _Stats:
    """Per-step training statistics, averaged over the step's micro-batches."""

    def _add(self, **values: float) -> None:
        acc = self.__dict__.setdefault("_stats", {})
        for k, v in values.items():
            acc.setdefault(k, []).append(float(v))

    def take_stats(self) -> Dict[str, float]:
        acc = self.__dict__.pop("_stats", {})
        return {k: sum(v) / len(v) for k, v in acc.items()}


class RewardObjective(_Stats):
    """A scalar reward at each sequence's last token; loss ``-log sigmoid(r_c - r_r)``."""

    name = "reward"
    head = "reward"
    eval_keys = ("accuracy", "margin")

    def rewards(self, model, batch):
        ids, _ = _pair(batch)
        r = model(input_ids=ids).logits.squeeze(-1).float()
        n = batch.shape[0]
        return r[:n], r[n:]

    def __call__(self, model, batch):
        rc, rr = self.rewards(model, batch)
        d = rc - rr
        self._add(accuracy=(d > 0).float().mean(), margin=d.detach().mean())
        return -F.logsigmoid(d).mean()

    def eval_sums(self, model, batch):
        rc, rr = self.rewards(model, batch)
        d = rc - rr
        return -F.logsigmoid(d).sum(), batch.shape[0], {
            "accuracy": float((d > 0).sum()), "margin": float(d.sum())}


def sequence_logps(model, ids: torch.Tensor, labels: torch.Tensor, average: bool = False):
    """Sum (or mean) of the log-probs of each sequence's labelled tokens, and per-token
    log-probs with their mask (for KL estimates); chunked, never the full logits."""
    target = shift_targets(labels)
    tok, _ = model_token_logprobs(model, target, input_ids=ids)
    mask = target != IGNORE
    tok = tok * mask
    total = tok.sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total, tok, mask


def reference_sums(reference, batch: torch.Tensor):
    """Per pair sample: the reference's summed log-probs ``[B, 2]`` (chosen, rejected) and
    labelled-token counts ``[B, 2]`` (for ``dpo.reference=precompute``)."""
    ids, labels = _pair(batch)
    total, _, mask = sequence_logps(reference, ids, labels)
    n = batch.shape[0]
    counts = mask.sum(-1).double()
    return (torch.stack([total[:n], total[n:]], 1).double(),
            torch.stack([counts[:n], counts[n:]], 1))


class DPOObjective(_Stats):
    """``x = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r))``;
    sigmoid: ``-log sigmoid(beta x)``; cdpo: label smoothing ``eps`` over both orders;
    ipo: ``(x - 1/(2 beta))^2`` on length-averaged log-probs. Reference log-probs are
    computed per batch without gradients (``self.reference``, set by the loop), or looked up
    in a precomputed table (``self.table``); the KL estimate is then per sequence (k1)."""

    name = "dpo"
    head = "lm"
    needs_reference = True
    eval_keys = ("accuracy", "margin", "chosen_reward", "rejected_reward", "kl")

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0):
        self.beta, self.loss_type, self.eps = beta, loss, label_smoothing
        self.reference = None
        self.table = None  # a ReferenceTable (tidal.train.reference) when precomputed

    def _terms(self, model, batch):
        ids, labels = _pair(batch)
        avg = self.loss_type == "ipo"
        pi, pi_tok, mask = sequence_logps(model, ids, labels, avg)
        n = batch.shape[0]
        if self.table is not None:
            r = self.table.lookup(batch)  # [B, 4]: sums chosen, rejected; counts chosen, rejected
            sums, counts = torch.cat([r[:, 0], r[:, 1]]), torch.cat([r[:, 2], r[:, 3]])
            ref = (sums / counts.clamp(min=1) if avg else sums).to(pi.dtype)
            # k1: the mean per-token log-ratio, from sequence sums
            kl = (pi_tok.detach().sum() - sums.sum().to(pi.dtype)) / counts.sum().clamp(min=1).to(pi.dtype)
        else:
            with torch.no_grad():
                ref, ref_tok, _ = sequence_logps(self.reference, ids, labels, avg)
            # k3 estimate of KL(policy || reference) on the pairs' reply tokens (>= 0)
            log_ratio = (ref_tok - pi_tok.detach())[mask]
            kl = (log_ratio.exp() - 1 - log_ratio).mean() if log_ratio.numel() else torch.zeros(())
        x = (pi[:n] - pi[n:]) - (ref[:n] - ref[n:])
        if self.loss_type == "ipo":
            losses = (x - 1.0 / (2 * self.beta)) ** 2
        else:
            eps = self.eps if self.loss_type == "cdpo" else 0.0
            losses = -(1 - eps) * F.logsigmoid(self.beta * x) - eps * F.logsigmoid(-self.beta * x)
        chosen = self.beta * (pi[:n] - ref[:n]).detach()
        rejected = self.beta * (pi[n:] - ref[n:]).detach()
        return losses, chosen, rejected, kl

    def __call__(self, model, batch):
        losses, chosen, rejected, kl = self._terms(model, batch)
        self._add(accuracy=(chosen > rejected).float().mean(), margin=(chosen - rejected).mean(),
                  kl=kl)
        return losses.mean()

    def eval_sums(self, model, batch) -> Tuple[torch.Tensor, int, Dict[str, float]]:
        losses, chosen, rejected, kl = self._terms(model, batch)
        n = batch.shape[0]
        return losses.sum(), n, {"accuracy": float((chosen > rejected).sum()),
                                 "margin": float((chosen - rejected).sum()),
                                 "chosen_reward": float(chosen.sum()),
                                 "rejected_reward": float(rejected.sum()), "kl": float(kl) * n}
