"""RL algorithms as pure functions on tensors: advantage estimators, KL estimators, the
clipped policy loss, loss aggregation, and rollout/learner mismatch corrections.

Conventions shared by every function here:

- A rollout batch holds ``N = P * G`` sequences: ``P`` prompts with ``G`` samples each
  (``rollout.n``), grouped contiguously prompt-major, so prompt ``i``'s samples are rows
  ``i*G .. i*G+G-1``. Per-sequence tensors are ``[N]``.
- Per-token tensors are ``[N, L]`` and come with a bool ``mask`` ``[N, L]``, True on the
  response tokens that count. Values at masked-out positions are never read: padding may
  hold anything (even inf or NaN) without reaching a loss, a statistic or a gradient.
- Losses and statistics are returned as ``(sum, weight)`` pairs of 0-d tensors, never as
  means: the engine sums both over micro-batches and ranks and divides once per step, so
  the result does not depend on how the batch was split (the stage contract in DESIGN.md).
- Advantages are per sequence ``[N]``; the learner broadcasts them over the sequence's tokens.

Nothing here knows about Ray, devices or process groups.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from tidal.registry import Registry

Stat = Tuple[Tensor, Tensor]  # (sum, count), both 0-d, reduced by the engine like the loss

ADVANTAGES = Registry("advantage estimator")
KL_KINDS = ("k1", "k2", "k3")
AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
IS_LEVELS = ("token", "sequence")
# exp() of a log-ratio beyond this overflows float32/bf16; the bound only bites on samples
# whose ratio is already absurd (e^20 ~ 5e8), where clipping/capping decides anyway
LOG_RATIO_BOUND = 20.0


# ---------------------------------------------------------------------------- advantages

def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """``rewards`` ``[N]`` viewed as ``[P, G]``; refuses layouts that are not whole groups."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        # a group of one has no baseline: every group-relative advantage would be zero
        raise ValueError(f"rollout.n (samples per prompt) must be >= 2 for group advantages, "
                         f"got {group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of rollout.n="
                         f"{group_size} (samples of one prompt must be contiguous rows)")
    if not rewards.is_floating_point():
        rewards = rewards.double()
    return rewards.view(-1, group_size)


def _equal_rows(g: Tensor) -> Tensor:
    """``[P]`` bool: groups whose rewards are all equal (no learning signal)."""
    return g.amax(dim=1) == g.amin(dim=1)


def _centered(g: Tensor) -> Tensor:
    """``r - group mean`` per group."""
    return g - g.mean(dim=1, keepdim=True)


@ADVANTAGES.register("grpo")
def _grpo(g: Tensor, eps: float) -> Tensor:
    """GRPO (Shao et al. 2402.03300): ``(r - mean_g) / (std_g + eps)``, unbiased std (verl)."""
    return _centered(g) / (g.std(dim=1, keepdim=True) + eps)


@ADVANTAGES.register("dr_grpo")
def _dr_grpo(g: Tensor, eps: float) -> Tensor:
    """Dr.GRPO (Liu et al. 2503.20783): ``r - mean_g``; dividing by the std favours groups
    that are nearly solved or nearly failed, so it is dropped."""
    return _centered(g)


@ADVANTAGES.register("rloo")
def _rloo(g: Tensor, eps: float) -> Tensor:
    """RLOO (Ahmadian et al. 2402.14740): ``r`` minus the mean of the other ``G-1`` rewards
    of its group, so a sample's baseline does not depend on its own reward."""
    others = (g.sum(dim=1, keepdim=True) - g) / (g.shape[1] - 1)
    return g - others


@ADVANTAGES.register("reinforce_pp_baseline")
def _reinforce_pp_baseline(g: Tensor, eps: float) -> Tensor:
    """REINFORCE++-baseline (Hu 2501.03262): ``r - mean_g``, then whitened over the whole
    batch (the batch mean is 0 up to rounding: each group is centred)."""
    a = _centered(g)
    return (a - a.mean()) / (a.std() + eps)


def compute_advantages(name: str, rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Per-sequence advantages ``[N]`` from per-sequence rewards ``[N]`` with the estimator
    ``name`` (a key of ``ADVANTAGES``: grpo, dr_grpo, rloo, reinforce_pp_baseline).

    Rows are grouped prompt-major in groups of ``group_size`` (``rollout.n``); a group whose
    rewards are all equal gets exactly zero advantage under every estimator."""
    estimator = ADVANTAGES.get_or_raise(name)
    g = _groups(rewards, group_size)
    adv = estimator(g, eps)
    # pin equal groups to exactly 0: the float mean of equal values can be 1 ulp off them
    # (0.1 * 3 / 3 != 0.1), which GRPO's division by a ~1e-17 std blows up to O(1), and a
    # constant batch whitens to 0 / 0; such groups carry no signal whatever the estimator
    adv = torch.where(_equal_rows(g)[:, None], torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def equal_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``[N]`` bool: True on samples whose group's rewards are all equal (all right or all
    wrong), which DAPO's dynamic sampling drops since their advantage is zero."""
    g = _groups(rewards, group_size)
    return _equal_rows(g)[:, None].expand_as(g).reshape(-1)


# ---------------------------------------------------------------------------- KL

def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of ``KL(pi || ref)`` from tokens sampled from ``pi`` (Schulman's
    estimators): ``k1 = logp - ref_logp`` (unbiased, high variance, can be negative);
    ``k2 = (logp - ref_logp)^2 / 2``; ``k3 = exp(ref - logp) - 1 - (ref - logp)`` (unbiased,
    >= 0, low variance; verl's ``low_var_kl``). Gradients flow through ``logp``; the
    gradient of k3 with respect to ``logp`` is ``1 - exp(ref - logp)``."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"unknown KL estimator '{kind}'; allowed: {', '.join(KL_KINDS)}")


# ---------------------------------------------------------------------------- aggregation

def aggregate(values: Tensor, mask: Tensor, agg: str, max_len: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Reduce per-token ``values`` ``[N, L]`` over ``mask`` to ``(sum, weight)``; the
    objective is ``sum / weight`` taken over the whole step (all micro-batches and ranks).

    - ``token_mean``: (sum of masked values, number of masked tokens): every token counts
      the same (DAPO);
    - ``seq_mean_token_mean``: (sum of each sequence's token mean, number of sequences with
      at least one masked token): every sequence counts the same (GRPO);
    - ``seq_mean_token_sum_norm``: (sum over sequences of token sum / ``max_len``, number of
      sequences with a masked token): Dr.GRPO, no length bias. ``max_len`` is the rollout's
      maximum response length, a constant: the padded width of a micro-batch varies with
      its contents, so it would make the loss depend on the batch split.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.bool()
    values = _wide(values)
    # where, not multiply: garbage (inf/NaN) at padding must not reach the sum
    masked = torch.where(mask, values, torch.zeros_like(values))
    dtype = values.dtype
    if agg == "token_mean":
        return masked.sum(), mask.sum().to(dtype)
    counts = mask.sum(dim=-1)
    live = (counts > 0).sum().to(dtype)
    if agg == "seq_mean_token_mean":
        return (masked.sum(dim=-1) / counts.clamp(min=1)).sum(), live
    if agg == "seq_mean_token_sum_norm":
        if max_len is None or max_len <= 0:
            raise ValueError(f"seq_mean_token_sum_norm needs max_len > 0 (the rollout's maximum "
                             f"response length), got {max_len}")
        return masked.sum() / max_len, live
    raise ValueError(f"unknown loss aggregation '{agg}'; allowed: {', '.join(AGGS)}")


def _wide(values: Tensor) -> Tensor:
    """``values`` in at least float32: bf16 counts tokens exactly only up to 256, and its
    sums over a batch lose most of their digits."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


def _masked_stat(values: Tensor, mask: Tensor) -> Stat:
    """``(sum over masked tokens, count)``, detached: a statistic, not a loss term."""
    values = _wide(values.detach())
    return (torch.where(mask, values, torch.zeros_like(values)).sum(),
            mask.sum().to(values.dtype))


# ---------------------------------------------------------------------------- policy loss

def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                clip_low: float, clip_high: float, dual_clip: Optional[float] = None,
                agg: str = "token_mean", max_len: Optional[int] = None,
                is_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Dict[str, Stat]]:
    """PPO's clipped surrogate per token, aggregated to ``(loss_sum, weight, stats)``.

    ``ratio = exp(logp - old_logp)``; per-token loss
    ``max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))`` (asymmetric bounds
    give DAPO's clip-higher). With ``dual_clip = c > 1`` the loss of tokens with ``A < 0`` is
    capped at ``-A * c`` (Ye et al. 1912.09729), so one very unlikely old token cannot
    dominate. ``is_weights`` (detached, ``[N, L]``), e.g. from :func:`truncated_is`,
    multiply the per-token loss. All per-token tensors are ``[N, L]`` aligned with ``mask``.

    ``stats`` (detached ``(sum, count)`` pairs over masked tokens): ``clip_frac`` (the
    clipped branch is active, so the token gives no gradient), ``dual_clip_frac`` (the dual
    bound is active; always present so every micro-batch reports the same keys) and
    ``ratio`` (the mean importance ratio)."""
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (a multiple of |A|), got {dual_clip}")
    mask = mask.bool()
    # zero the log-ratio at padding: the aggregate drops padding's loss, but backward still
    # multiplies its zero gradient by padding's advantages / IS weights / exp(logp - old),
    # and 0 * NaN or 0 * inf = NaN would reach the logits; this where stops it
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_active = (advantages < 0) & (bound < loss)
        loss = torch.where(dual_active, bound, loss)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    loss_sum, weight = aggregate(loss, mask, agg, max_len)
    stats = {"clip_frac": _masked_stat((clipped > unclipped).to(logp.dtype), mask),
             "dual_clip_frac": _masked_stat(dual_active.to(logp.dtype), mask),
             "ratio": _masked_stat(ratio, mask)}
    return loss_sum, weight, stats


# ---------------------------------------------------------------------------- PPO: critic

def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
        next_values: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 1506.02438) over response tokens.

    ``rewards``, ``values`` ``[N, L]``: the per-token reward (e.g. ``-beta * k1`` on every
    token, plus the sequence's score on its last one) and the critic's value of the state
    before each token. ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t +
    gamma * lam * A_{t+1}``, where ``t + 1`` is the row's next *masked* token: masked-out
    positions are skipped (they carry the running value and advantage through, as verl
    does), so padding anywhere holds nothing that matters. After a row's last token the
    next value is ``next_values`` (``[N]``; the critic's value of the state after the last
    token for a truncated response, which did not end; 0 for one that ended, and the
    default). Returns ``(advantages, returns)``, both ``[N, L]`` with 0 at masked-out
    positions; ``returns = advantages + values`` (the critic's regression target)."""
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape [N, L]")
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"need gamma and lam in [0, 1], got {gamma}, {lam}")
    mask = mask.bool()
    dtype = torch.promote_types(values.dtype, torch.float32)
    r = torch.where(mask, rewards.to(dtype), torch.zeros((), dtype=dtype))
    v = torch.where(mask, values.to(dtype), torch.zeros((), dtype=dtype))
    nxt = torch.zeros(r.shape[0], dtype=dtype) if next_values is None else next_values.to(dtype).clone()
    run = torch.zeros_like(nxt)
    adv = torch.zeros_like(r)
    for t in range(r.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = r[:, t] + gamma * nxt - v[:, t]
        step = delta + gamma * lam * run
        run = torch.where(m, step, run)
        nxt = torch.where(m, v[:, t], nxt)
        adv[:, t] = torch.where(m, step, torch.zeros((), dtype=dtype))
    returns = torch.where(mask, adv + v, torch.zeros((), dtype=dtype))
    return adv, returns


def whiten_stats(values: Tensor, mask: Tensor) -> Tensor:
    """``[sum, sum of squares, count]`` of the masked values (float64): what ranks add up
    before :func:`whiten`, so that the batch is whitened as a whole whatever its split."""
    v = torch.where(mask.bool(), values.double(), torch.zeros((), dtype=torch.float64))
    return torch.stack([v.sum(), (v * v).sum(), mask.bool().sum().double()])


def whiten(values: Tensor, mask: Tensor, stats: Optional[Tensor] = None, eps: float = 1e-8,
           shift_mean: bool = True) -> Tensor:
    """Masked whitening: ``(x - mean) / sqrt(var + eps)`` with the mean and (biased)
    variance of the masked values (``stats`` from :func:`whiten_stats`, summed over ranks;
    this tensor's own by default); 0 at masked-out positions. ``shift_mean=False`` adds the
    mean back (unit variance around the original mean, as verl's ``masked_whiten``)."""
    mask = mask.bool()
    s, sq, n = (whiten_stats(values, mask) if stats is None else stats.double()).tolist()
    if n < 1:
        return torch.zeros_like(values)
    mean = s / n
    var = max(sq / n - mean * mean, 0.0)
    out = (values.double() - mean) / (var + eps) ** 0.5
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros((), dtype=torch.float64)).to(values.dtype)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: Optional[float],
               agg: str = "token_mean", max_len: Optional[int] = None) -> Tuple[Tensor, Tensor, Dict[str, Stat]]:
    """The critic's clipped value loss (PPO2 / OpenAI baselines):
    ``0.5 * max((V - R)^2, (V_old + clamp(V - V_old, -c, c) - R)^2)`` per token, so one
    minibatch cannot move a value further than ``c`` from the rollout's; ``clip`` None: the
    plain squared error. Aggregated like the policy loss; ``stats``: ``vf_clip_frac`` (the
    clipped branch is the larger, so the token gives no gradient) and ``value`` (the mean
    prediction)."""
    mask = mask.bool()
    # padding may hold anything: a where (not a multiply) keeps NaN/inf from the gradient
    zero = torch.zeros((), dtype=values.dtype)
    values, old_values, returns = (torch.where(mask, x, zero) for x in (values, old_values, returns))
    err = (values - returns) ** 2
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"value clip must be > 0 or None, got {clip}")
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_clipped = (clipped - returns) ** 2
        loss = 0.5 * torch.maximum(err, err_clipped)
        frac = (err_clipped > err).to(values.dtype)
    else:
        loss, frac = 0.5 * err, torch.zeros_like(err)
    loss_sum, weight = aggregate(loss, mask, agg, max_len)
    return loss_sum, weight, {"vf_clip_frac": _masked_stat(frac, mask), "value": _masked_stat(values, mask)}


class KLController:
    """The coefficient of the KL penalty to the reference. ``fixed``: constant.
    ``adaptive`` (Ziegler et al. 1909.08593): after each batch of ``n`` samples whose
    observed KL (per sequence, summed over its tokens) is ``kl``,
    ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``: it rises while the
    policy drifts past the target and falls while it stays below. Its state is the
    coefficient, checkpointed with the run so a resumed run goes on with the same value."""

    KINDS = ("fixed", "adaptive")

    def __init__(self, kind: str, coef: float, target: Optional[float] = None, horizon: int = 10000):
        if kind not in self.KINDS:
            raise ValueError(f"unknown KL controller '{kind}'; allowed: {', '.join(self.KINDS)}")
        if kind == "adaptive" and not (target and target > 0 and horizon > 0):
            raise ValueError(f"an adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.kind, self.value, self.target, self.horizon = kind, float(coef), target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.kind == "adaptive":
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value

    def state_dict(self) -> Dict:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: Dict) -> None:
        self.value = float(state["kl_coef"])


# ---------------------------------------------------------------------------- rollout mismatch

def truncated_is(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, level: str, cap: float) -> Tensor:
    """Truncated importance weights ``[N, L]`` (detached) correcting for the rollout engine
    sampling from a slightly different distribution than the learner's (kernels, precision,
    stale weights). ``token``: ``min(exp(old - rollout), cap)`` per token; ``sequence``:
    ``min(exp(sum over the sequence's masked tokens of (old - rollout)), cap)``, the same
    for all its tokens. Masked-out positions get 1."""
    if level not in IS_LEVELS:
        raise ValueError(f"unknown importance-sampling level '{level}'; allowed: {', '.join(IS_LEVELS)}")
    if not cap > 0:
        raise ValueError(f"truncated IS cap must be > 0, got {cap}")
    mask = mask.bool()
    with torch.no_grad():
        diff = torch.where(mask, old_logp - rollout_logp, torch.zeros_like(old_logp))
        if level == "sequence":
            diff = diff.sum(dim=-1, keepdim=True).expand_as(diff)
        w = torch.exp(diff).clamp(max=cap)
        return torch.where(mask, w, torch.ones_like(w))


def logp_gap(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> Dict[str, Stat]:
    """How far the rollout engine's log-probs are from the learner's on the same tokens,
    as ``(sum, count)`` statistics per masked token: ``logp_gap_abs`` (mean ``|old -
    rollout|``) and ``logp_gap_kl`` (k3 estimate of ``KL(rollout || learner)``: the tokens
    were sampled by the rollout engine). Both should be ~0 when the two agree."""
    mask = mask.bool()
    old, rollout = old_logp.detach(), rollout_logp.detach()
    return {"logp_gap_abs": _masked_stat((old - rollout).abs(), mask),
            "logp_gap_kl": _masked_stat(kl_penalty(rollout, old, "k3"), mask)}


__all__ = ["ADVANTAGES", "AGGS", "IS_LEVELS", "KL_KINDS", "KLController", "aggregate", "compute_advantages",
           "equal_groups", "gae", "kl_penalty", "logp_gap", "policy_loss", "truncated_is", "value_loss",
           "whiten", "whiten_stats"]
