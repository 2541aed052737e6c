"""Per-token log-probabilities and entropy of the taken tokens, without the full logits.

SFT, DPO and PPO need ``log p(token)`` (and PPO the entropy) for every position. The plain
way projects the hidden states to a ``[tokens x vocab]`` fp32 logit matrix, takes a
log-softmax (a second one) and keeps both for backward: at 4k tokens and a 128k vocabulary
that is 4 GB before any gradient. :func:`chunked_token_logprobs` projects ``chunk_size``
tokens at a time, keeps only the per-token results, and in backward recomputes each
chunk's logits to form its gradient, so the peak extra memory is a few chunk-sized
buffers. :func:`token_logprobs` is the plain reference with the same signature.
"""
from __future__ import annotations

import functools
import importlib
from typing import Tuple

import torch

IGNORE = -100


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(logp, entropy)`` of shape ``labels.shape`` from the full fp32 logits.
    ``hidden`` is ``[..., H]``, ``weight`` the ``[V, H]`` output projection; positions whose
    label is ``ignore_index`` get log-prob 0."""
    logits = (hidden @ weight.t()).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    safe = labels.clamp(min=0)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(labels == ignore_index, torch.zeros_like(logp), logp)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _chunk_logp(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``log_softmax(h @ weight.T)`` in fp32, normalized in place (one chunk-sized buffer)."""
    logits = (h @ weight.t()).float()
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _project_back(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, grad_h, grad_w,
                  s: int, e: int) -> None:
    """A chunk's gradient w.r.t. its logits ``g`` -> rows ``s:e`` of the hidden states'
    gradient and a term of the projection weight's (either may be None: not needed)."""
    g = g.to(h.dtype)
    if grad_h is not None:
        grad_h[s:e] = g @ weight
    if grad_w is not None:
        grad_w.addmm_(g.t().float(), h.float())


class _ChunkedLogProbs(torch.autograd.Function):
    """At most two ``[chunk x vocab]`` fp32 buffers live at any time, forward or backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, ignore_index: int):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            logp_all = _chunk_logp(hidden[s:e], weight)
            lab = labels[s:e]
            lp = logp_all.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            logp[s:e] = torch.where(lab == ignore_index, torch.zeros_like(lp), lp)
            entropy[s:e] = -logp_all.exp().mul_(logp_all).sum(-1)
            del logp_all
        ctx.save_for_backward(hidden, weight, labels, entropy)
        ctx.chunk_size, ctx.ignore_index = chunk_size, ignore_index
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, labels, entropy = ctx.saved_tensors
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_logp = g_logp if g_logp is not None else torch.zeros(n, device=hidden.device)
        g_entropy = g_entropy if g_entropy is not None else torch.zeros(n, device=hidden.device)
        for s in range(0, n, ctx.chunk_size):
            e = min(n, s + ctx.chunk_size)
            h = hidden[s:e]
            lab = labels[s:e]
            a = (g_logp[s:e] * (lab != ctx.ignore_index).float()).unsqueeze(-1)
            b = g_entropy[s:e].unsqueeze(-1)
            # d logp_y / d z = onehot(y) - p ;  d H / d z = -p * (log p + H), so
            # d L / d z = p * (-a - b * (log p + H)) + a * onehot(y)
            g = _chunk_logp(h, weight)
            p = g.exp()
            g.add_(entropy[s:e].unsqueeze(-1)).mul_(-b).sub_(a).mul_(p)
            del p
            g.scatter_add_(-1, lab.clamp(min=0).unsqueeze(-1), a)
            _project_back(g, h, weight, grad_h, grad_w, s, e)
            del g
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk_size: int = 1024, ignore_index: int = IGNORE
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same results as :func:`token_logprobs` (fp32), computing ``chunk_size`` tokens'
    logits at a time in forward and again in backward; never holds ``[tokens x vocab]``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shape = labels.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    logp, entropy = _ChunkedLogProbs.apply(flat_h, weight, labels.reshape(-1), chunk_size, ignore_index)
    return logp.reshape(shape), entropy.reshape(shape)


class _FusedNLL(torch.autograd.Function):
    """Summed negative log-likelihood whose gradient is formed chunk by chunk in forward
    (Liger's fused linear cross-entropy): the loss is a sum, so its gradient with respect
    to the logits is known before backward and no chunk's logits are recomputed; backward
    only scales the stored gradients by the incoming scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, ignore_index: int):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            h, lab = hidden[s:e], labels[s:e]
            keep = (lab != ignore_index)
            safe = lab.clamp(min=0).unsqueeze(-1)
            g = _chunk_logp(h, weight)
            total -= (g.gather(-1, safe).squeeze(-1) * keep).sum()
            # d(-logp_y)/dz = p - onehot(y), zero on ignored rows
            g.exp_().mul_(keep.unsqueeze(-1))
            g.scatter_add_(-1, safe, -keep.float().unsqueeze(-1))
            _project_back(g, h, weight, grad_h, grad_w, s, e)
            del g
        ctx.save_for_backward(grad_h if need_h else None,
                              grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, g_total):
        grad_h, grad_w = ctx.saved_tensors
        scale = lambda t: None if t is None else t * g_total.to(t.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), None, None, None


def chunked_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int = 1024, ignore_index: int = IGNORE) -> torch.Tensor:
    """``-sum(logp)`` over the labelled positions, as ``-token_logprobs(...)[0].sum()``
    (fp32), with no ``[tokens x vocab]`` buffer and no recomputation in backward: the
    next-token loss of pretraining and SFT at the cost of the plain path."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _FusedNLL.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                           chunk_size, ignore_index)


def sequence_logprob(logp: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE,
                     average: bool = False) -> torch.Tensor:
    """Sum (or mean) of per-token log-probs over each sequence's labelled positions."""
    mask = (labels != ignore_index).to(logp.dtype)
    total = (logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total



def shift_targets(labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """``labels`` aligned with the positions that predict them: ``out[:, t] = labels[:, t+1]``
    and the last position ignored."""
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


# The path model_token_logprobs takes: "auto" is the fused Triton kernel
# (tidal_kernels.fused_logprob) on CUDA tensors when it imports, else the chunked torch path
# (the CPU default); "fused" or "chunked" forces one (tests, benchmarks).
LOGPROB_PATH = "auto"


@functools.lru_cache(maxsize=None)
def _fused_importable() -> bool:
    try:
        importlib.import_module("tidal_kernels.fused_logprob")  # imports triton
    except Exception:  # no triton, or one that cannot load here
        return False
    return True


def logprob_path(hidden: torch.Tensor) -> str:
    """``"fused"`` or ``"chunked"``: what :func:`model_token_logprobs` uses for ``hidden``."""
    if LOGPROB_PATH not in ("auto", "fused", "chunked"):
        raise ValueError(f"LOGPROB_PATH must be auto, fused or chunked, got {LOGPROB_PATH!r}")
    if LOGPROB_PATH != "auto":
        return LOGPROB_PATH
    return "fused" if hidden.is_cuda and _fused_importable() else "chunked"


# Model families whose forward returns the output head's result untouched (others scale or
# soft-cap the logits after the head: Gemma2/3, Cohere, Granite ...).
PLAIN_HEAD_MODELS = ("llama", "mistral", "qwen2", "qwen3")


def _plain_head(model, head) -> bool:
    config = getattr(model, "config", None)
    return (type(head) is torch.nn.Linear and head.bias is None
            and getattr(config, "model_type", None) in PLAIN_HEAD_MODELS
            and not getattr(config, "final_logit_softcapping", None))


def model_token_logprobs(model, targets: torch.Tensor, chunk_size: int = 1024,
                         ignore_index: int = IGNORE, **inputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` of ``targets`` (``[B, L]``, already shifted, see
    :func:`shift_targets`) under an HF causal LM called with ``inputs``, never forming the
    full logits: for this call the output head's forward is the chunked projection (the fused
    Triton kernel on CUDA, see :func:`logprob_path`). It runs
    inside the model's own forward, so under FSDP2 the head's weight is the gathered one and
    its gradient is reduced like any other. Heads that are not a plain bias-free linear layer
    (e.g. one wrapped by an adapter), and model families that transform the logits after
    the head (see ``PLAIN_HEAD_MODELS``), fall back to full logits."""
    head = model.get_output_embeddings()
    if not _plain_head(model, head):
        logits = model(**inputs).logits
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logp = torch.where(targets == ignore_index, torch.zeros_like(logp), logp)
        return logp, -(logp_all.exp() * logp_all).sum(-1)

    def projection(hidden: torch.Tensor) -> torch.Tensor:
        if logprob_path(hidden) == "fused":
            from tidal_kernels.fused_logprob import fused_token_logprobs
            logp, entropy = fused_token_logprobs(hidden, head.weight, targets, ignore_index)
        else:
            logp, entropy = chunked_token_logprobs(hidden, head.weight, targets, chunk_size, ignore_index)
        return torch.stack([logp, entropy], dim=-1)

    head.forward = projection  # an instance attribute shadows the class's forward
    try:
        out = model(**inputs).logits
    finally:
        del head.forward
    return out[..., 0], out[..., 1]


def model_nll_sum(model, targets: torch.Tensor, chunk_size: int = 1024,
                  ignore_index: int = IGNORE, **inputs) -> torch.Tensor:
    """Summed next-token loss of ``targets`` (already shifted) under an HF causal LM,
    through :func:`chunked_nll_sum` inside the model's forward (same head rules and
    fallback as :func:`model_token_logprobs`)."""
    head = model.get_output_embeddings()
    if not _plain_head(model, head):
        logp, _ = model_token_logprobs(model, targets, chunk_size, ignore_index, **inputs)
        return -logp.sum()

    liger = getattr(model, "tidal_fused_loss", None) == "liger"

    def projection(hidden: torch.Tensor) -> torch.Tensor:
        if liger and hidden.is_cuda:  # model.kernels=liger: Liger's fused linear cross-entropy
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(
                head.weight, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))
        else:
            loss = chunked_nll_sum(hidden, head.weight, targets, chunk_size, ignore_index)
        # returned through the model's output, so backward passes its hooks (FSDP2's)
        return loss.view(1, 1, 1).expand(*hidden.shape[:-1], 1).contiguous()  # not a view: FSDP2 warns on views

    head.forward = projection
    try:
        out = model(**inputs).logits
    finally:
        del head.forward
    return out[0, 0, 0]
