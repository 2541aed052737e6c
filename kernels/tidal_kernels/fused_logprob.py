"""Fused linear log-prob + entropy: per token, ``log p(label)`` and the entropy of
``p = softmax(hidden @ weight.T)``, forward and backward, without the ``[tokens x vocab]`` logits.

The same results as :func:`tidal_kernels.reference.token_logprobs_reference` (and tidal's
``token_logprobs`` / ``chunked_token_logprobs``): ``(logp, entropy)`` of ``labels.shape`` in
fp32, ``logp`` 0 where the label is ``ignore_index``, gradients to ``hidden`` and ``weight`` from
both outputs.

**Forward (Triton, :func:`_fwd_kernel`).** A program owns ``BLOCK_M`` tokens and one contiguous
slice of the vocabulary. It forms ``BLOCK_M x BLOCK_V`` logit tiles with ``tl.dot`` over
``BLOCK_K`` slices of the hidden dimension and folds each tile into a streaming log-sum-exp and
a streaming entropy: a running max ``m``, ``s = sum exp(z - m)`` and ``t = sum exp(z - m) (z - m)``
(rescaled as ``m`` grows), and it picks up the label's logit. Only those four numbers per token
and slice reach memory; torch folds the slices together (``[slices x tokens]``, tiny) into
``lse = m + log s``, ``entropy = log s - t / s`` and ``logp = z_label - lse``. Several slices per
token block keep the GPU busy when there are few token blocks.

**Backward.** Vocabulary chunk by chunk (``vocab_chunk`` columns): torch recomputes the chunk's
logits ``hidden @ weight[chunk].T`` (one ``[tokens x chunk]`` buffer in the inputs' dtype), the
Triton kernel :func:`_bwd_dlogits_kernel` overwrites them in place with
``dL/dz = p * (-a - b * (log p + H)) + a * onehot(label)`` (``a`` the upstream gradient of
``logp``, zero at ignored positions, ``b`` that of the entropy; ``log p = z - lse`` from the
saved ``lse``; ``dH/dz_i = -p_i (log p_i + H)``), and torch projects back:
``grad_weight[chunk] = dz.T @ hidden`` (final after this one matmul: no other chunk touches
those rows) and ``grad_hidden += dz @ weight[chunk]`` (an fp32 accumulator). That is Liger's
split for its fused linear cross-entropy (matmuls in torch, the softmax maths in Triton);
chunking the vocabulary rather than the tokens is what makes each weight-gradient row final
after one matmul, so no ``[vocab x hidden]`` fp32 accumulator is needed.

Peak extra memory: the forward's ``[slices x tokens]`` partials; the backward's one
``[tokens x vocab_chunk]`` buffer, the ``[tokens x hidden]`` fp32 accumulator and the gradients
themselves.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

IGNORE = -100

# Untuned starting points (no GPU has measured them yet): bf16/fp16 tiles sized like a flash-
# attention forward; fp32 halves BLOCK_K so three pipeline stages fit in shared memory.
_FWD_BLOCKS = {2: dict(block_m=128, block_v=128, block_k=64, num_warps=8, num_stages=3),
               4: dict(block_m=64, block_v=128, block_k=32, num_warps=8, num_stages=3)}
_BWD_BLOCK_M, _BWD_BLOCK_V = 16, 256


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, part_ptr,
                T, V, H, v_per_split,
                stride_ht, stride_hk, stride_wv, stride_wk,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """Per (token block, vocabulary slice): the running max, sum of exponentials, entropy
    term and label logit of the slice, into ``part[0..3, slice, token]``."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    ks = tl.arange(0, BLOCK_K)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    zy = tl.zeros((BLOCK_M,), tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < v_end
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + ks
            k_ok = k < H
            a = tl.load(h_ptr + rows[:, None] * stride_ht + k[None, :] * stride_hk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + cols[:, None] * stride_wv + k[None, :] * stride_wk,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        # the label's logit (at most one column of one slice matches; ignored rows have -1)
        zy += tl.sum(tl.where(cols[None, :] == tgt[:, None], acc, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(tl.where(col_ok[None, :], acc, float("-inf")), axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf); m_new is finite from then on
        zc = tl.where(col_ok[None, :], acc - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(zc), 0.0)
        # t = sum e^(z-m) (z-m) rescaled to the new max: alpha * (t + s * (m - m_new))
        t = alpha * (t + s * tl.where(s > 0, m - m_new, 0.0)) + tl.sum(e * zc, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    out = pid_s * T + rows
    step = n_split * T
    tl.store(part_ptr + out, m, mask=row_ok)
    tl.store(part_ptr + step + out, s, mask=row_ok)
    tl.store(part_ptr + 2 * step + out, t, mask=row_ok)
    tl.store(part_ptr + 3 * step + out, zy, mask=row_ok)


@triton.jit
def _bwd_dlogits_kernel(z_ptr, tgt_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
                        T, VC, v_offset, stride_zt,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """In place over a ``[tokens x chunk]`` logit block: ``z -> dL/dz``."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < T
    ok = row_ok[:, None] & (cols < VC)[None, :]
    ptrs = z_ptr + rows[:, None] * stride_zt + cols[None, :]
    z = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    a = tl.where(tgt >= 0, tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0), 0.0)
    b = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = p * (-a[:, None] - b[:, None] * (logp + ent[:, None]))
    dz += tl.where((cols + v_offset)[None, :] == tgt[:, None], a[:, None], 0.0)
    tl.store(ptrs, dz.to(z_ptr.dtype.element_ty), mask=ok)


def _precision(dtype: torch.dtype) -> Optional[str]:
    """fp32 dots in full precision unless torch itself allows TF32 matmuls (as the reference
    would then get); otherwise Triton's default (16-bit inputs: the setting has no effect)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return None


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _fwd(hidden, weight, target, splits, blocks):
    T, H = hidden.shape
    V = weight.shape[0]
    bm, bv, bk = blocks["block_m"], blocks["block_v"], blocks["block_k"]
    n_m = triton.cdiv(T, bm)
    n_v = triton.cdiv(V, bv)
    if splits is None:
        splits = 1
        if hidden.is_cuda:  # about two programs per SM
            sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
            splits = triton.cdiv(2 * sms, n_m)
    splits = max(1, min(int(splits), n_v))
    v_per_split = triton.cdiv(n_v, splits) * bv
    splits = triton.cdiv(V, v_per_split)  # every slice starts inside the vocabulary
    part = torch.empty((4, splits, T), dtype=torch.float32, device=hidden.device)
    _fwd_kernel[(n_m, splits)](
        hidden, weight, target, part, T, V, H, v_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, PRECISION=_precision(hidden.dtype),
        num_warps=blocks["num_warps"], num_stages=blocks["num_stages"])
    m, s, t, zy = part.unbind(0)
    big = m.amax(0)
    alpha = torch.exp(m - big)
    s_all = (s * alpha).sum(0)
    t_all = (alpha * (t + s * (m - big))).sum(0)
    log_s = torch.log(s_all)
    lse = big + log_s
    entropy = log_s - t_all / s_all
    logp = torch.where(target >= 0, zy.sum(0) - lse, torch.zeros_like(lse))
    return logp, entropy, lse


def _bwd(hidden, weight, target, lse, entropy, g_logp, g_ent, need_h, need_w, vocab_chunk):
    T, H = hidden.shape
    V = weight.shape[0]
    grad_h = torch.zeros((T, H), dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    g_logp = g_logp.float().contiguous()
    g_ent = g_ent.float().contiguous()
    for vs in range(0, V, vocab_chunk):
        ve = min(V, vs + vocab_chunk)
        wc = weight[vs:ve]
        z = torch.mm(hidden, wc.t())  # recomputed logits, [T x chunk], overwritten with dL/dz
        grid = (triton.cdiv(T, _BWD_BLOCK_M), triton.cdiv(ve - vs, _BWD_BLOCK_V))
        _bwd_dlogits_kernel[grid](z, target, lse, entropy, g_logp, g_ent, T, ve - vs, vs, z.stride(0),
                                  BLOCK_M=_BWD_BLOCK_M, BLOCK_V=_BWD_BLOCK_V, num_warps=4)
        if need_w:
            torch.mm(z.t(), hidden, out=grad_w[vs:ve])
        if need_h:
            if z.dtype == torch.float32:
                grad_h.addmm_(z, wc)
            else:
                grad_h.add_(torch.mm(z, wc))
        del z
    return (grad_h.to(hidden.dtype) if need_h else None), grad_w


class FusedLinearLogProbs(torch.autograd.Function):
    """``(hidden [T, H], weight [V, H], target [T]) -> (logp [T], entropy [T])``, fp32 outputs.
    ``target`` is the label with ignored positions already mapped to -1 (see
    :func:`fused_token_logprobs`)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, splits, vocab_chunk, blocks):
        with _on_device(hidden):
            logp, entropy, lse = _fwd(hidden, weight, target, splits, blocks)
        ctx.save_for_backward(hidden, weight, target, lse, entropy)
        ctx.vocab_chunk = vocab_chunk
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, target, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None, None
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        if g_ent is None:
            g_ent = torch.zeros_like(lse)
        with _on_device(hidden):
            grad_h, grad_w = _bwd(hidden, weight, target, lse, entropy, g_logp, g_ent,
                                  need_h, need_w, ctx.vocab_chunk)
        return grad_h, grad_w, None, None, None, None


def fused_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE, *, vocab_chunk: Optional[int] = None,
                         splits: Optional[int] = None, block_m: Optional[int] = None,
                         block_v: Optional[int] = None, block_k: Optional[int] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` of shape ``labels.shape`` (fp32) for ``softmax(hidden @ weight.T)``,
    as ``token_logprobs(hidden, weight, labels, ignore_index)``, never forming the
    ``[tokens x vocab]`` logits (see the module's docstring).

    ``hidden`` is ``[..., H]``, ``weight`` the ``[V, H]`` output projection, same dtype and
    device (CUDA, or CPU under ``TRITON_INTERPRET=1``). ``vocab_chunk``: vocabulary columns per
    backward step (default ``max(1024, next_pow2(H))``: the step's logit buffer about the
    size of ``hidden``); ``splits``: vocabulary slices per token block in forward (default:
    enough programs for two per SM); ``block_*``: forward tile sizes (16 or more, powers of 2).
    A label other than ``ignore_index`` must lie in ``[0, V)``; negative ones count as 0, as in
    the reference."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., {hidden.shape[-1]}] does not match weight {tuple(weight.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"hidden, weight and labels on {hidden.device}, {weight.device}, {labels.device}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    if vocab_chunk is not None and vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be >= 1, got {vocab_chunk}")
    shape = labels.shape
    H, V = weight.shape[1], weight.shape[0]
    flat_h = hidden.reshape(-1, H).contiguous()
    flat_l = labels.reshape(-1)
    if flat_h.shape[0] == 0:
        zero = (flat_h.sum() * 0 + weight.sum() * 0).float()  # keeps the graph to both inputs
        return zero.expand(shape).clone(), zero.expand(shape).clone()
    target = torch.where(flat_l == ignore_index, torch.full_like(flat_l, -1), flat_l.clamp(min=0))
    blocks = dict(_FWD_BLOCKS[2 if hidden.element_size() <= 2 else 4])
    for key, val in (("block_m", block_m), ("block_v", block_v), ("block_k", block_k)):
        if val is not None:
            blocks[key] = val
    if vocab_chunk is None:
        vocab_chunk = max(1024, triton.next_power_of_2(H))
    logp, entropy = FusedLinearLogProbs.apply(flat_h, weight, target.contiguous(), splits,
                                              min(vocab_chunk, V), blocks)
    return logp.reshape(shape), entropy.reshape(shape)
