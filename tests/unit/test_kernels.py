"""tidal_kernels' fused linear log-prob + entropy against the pure-torch references.

On CPU the Triton kernels run under ``TRITON_INTERPRET=1``. Triton reads it when it is
imported (its own ``@jit`` helpers, ``tl.cdiv`` and the like, are built then) and when each
kernel is decorated, so it cannot be switched on for part of a process: the interpreted checks
run in one child process started with it (this file run as a script, all cases at once to pay
the start-up once), and the variable never reaches this pytest process or what it starts.
Each case compares values and gradients (hidden and weight, through both outputs, under a
random upstream gradient) with ``token_logprobs`` at 1e-5. The GPU tests (compiled kernels,
bf16, the dispatch in ``model_token_logprobs``) are skipped without CUDA.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

IGNORE = -100
TOL = dict(atol=1e-5, rtol=1e-5)

# name -> (labels shape, hidden, vocab, kernel options, extra). Sizes are deliberately not
# multiples of the blocks; "splits" > 1 exercises the combination of vocabulary slices,
# vocab_chunk < vocab the chunked backward.
CASES = {
    "odd-sizes": ((2, 7), 24, 50, dict(block_m=16, block_v=16, block_k=16, splits=1, vocab_chunk=16), {}),
    "vocab-slices": ((3, 13), 40, 300, dict(block_m=16, block_v=32, block_k=16, splits=4, vocab_chunk=128), {}),
    "one-token-block": ((1, 9), 64, 257, dict(block_m=16, block_v=64, block_k=32, splits=2, vocab_chunk=100), {}),
    "default-blocks": ((5, 8), 33, 130, {}, {}),
    # ignore_index that is a real token id (0); every label of one row ignored
    "ignore-index-0": ((4, 6), 16, 61, dict(block_m=16, block_v=32, block_k=16, splits=2, vocab_chunk=61),
                       dict(ignore_index=0, ignore_row=1)),
    # only the entropy is used; the head is frozen (no weight gradient), as under LoRA
    "entropy-only-frozen-weight": ((2, 11), 32, 90, dict(block_m=16, block_v=32, block_k=16, splits=3,
                                                        vocab_chunk=40),
                                   dict(use_logp=False, weight_grad=False)),
    # large logits: the streaming max must keep exp() in range
    "large-logits": ((2, 5), 16, 70, dict(block_m=16, block_v=16, block_k=16, splits=2, vocab_chunk=32),
                     dict(scale=10.0)),
}


def _inputs(shape, hidden, vocab, extra, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(sum(shape) * 1000 + hidden * 10 + vocab)
    h = torch.randn(*shape, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (extra.get("scale", 1.0) * 0.3 / hidden ** 0.5 * 4)
    labels = torch.randint(0, vocab, shape, generator=g)
    ignore = extra.get("ignore_index", IGNORE)
    labels.view(-1)[:3] = ignore  # prompt-like positions
    if "ignore_row" in extra:
        labels[extra["ignore_row"]] = ignore
    up = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return (h.to(device, dtype), w.to(device, dtype), labels.to(device), ignore,
            up[0].to(device), up[1].to(device))


def _run(fn, h, w, labels, ignore, up_lp, up_ent, extra):
    """Values and gradients of ``fn``; the loss uses logp unless ``use_logp`` is False."""
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_(extra.get("weight_grad", True))
    lp, ent = fn(hh, ww, labels, ignore)
    loss = (ent * up_ent).sum()
    if extra.get("use_logp", True):
        loss = loss + (lp * up_lp).sum()
    loss.backward()
    return {"logp": lp.detach(), "entropy": ent.detach(), "d hidden": hh.grad,
            "d weight": ww.grad if ww.requires_grad else None}


def _compare(got, ref, tol) -> dict:
    """Per quantity: the largest absolute error and whether it is within ``tol``."""
    out = {}
    for name, r in ref.items():
        x = got[name]
        if r is None or x is None:
            out[name] = {"ok": r is None and x is None, "err": None, "msg": "gradient presence differs"}
            continue
        try:
            assert x.shape == r.shape and x.dtype == r.dtype, f"{x.shape}/{x.dtype} vs {r.shape}/{r.dtype}"
            torch.testing.assert_close(x, r, **tol)
            out[name] = {"ok": True, "err": (x - r).abs().max().item(), "msg": ""}
        except AssertionError as e:
            out[name] = {"ok": False, "err": None, "msg": str(e)[:600]}
    return out


def _interpreted_case(name):
    from tidal.objectives.logprobs import token_logprobs
    from tidal_kernels.fused_logprob import fused_token_logprobs

    shape, hidden, vocab, opts, extra = CASES[name]
    h, w, labels, ignore, up_lp, up_ent = _inputs(shape, hidden, vocab, extra)
    ref = _run(token_logprobs, h, w, labels, ignore, up_lp, up_ent, extra)
    got = _run(lambda a, b, c, i: fused_token_logprobs(a, b, c, i, **opts), h, w, labels, ignore,
               up_lp, up_ent, extra)
    result = _compare(got, ref, TOL)
    zero = bool((got["logp"][labels == ignore] == 0).all())
    result["ignored logp is 0"] = {"ok": zero, "err": None, "msg": "" if zero else "nonzero logp at ignored"}
    return result


def _interpreted_model_case():
    """``model_token_logprobs`` forced onto the fused path (interpreted) against the chunked
    path, through a tiny Llama: per-token results and every parameter's gradient."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import tidal.objectives.logprobs as L

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=False))
    ids = torch.randint(0, 67, (2, 9))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    targets = L.shift_targets(labels)
    out = {}
    for path in ("chunked", "fused"):
        L.LOGPROB_PATH = path
        model.zero_grad()
        lp, ent = L.model_token_logprobs(model, targets, chunk_size=4, input_ids=ids)
        (lp.sum() + 0.3 * ent.sum()).backward()
        out[path] = {"logp": lp.detach(), "entropy": ent.detach(),
                     **{n: p.grad.clone() for n, p in model.named_parameters()}}
    L.LOGPROB_PATH = "auto"
    return _compare(out["fused"], out["chunked"], dict(atol=1e-5, rtol=1e-4))


def _half_check(h, w, labels, ignore, up_lp, up_ent, fused_fn, dtype) -> dict:
    """16-bit inputs: against the fp32 reference on the same (rounded) values, the kernel is
    within 2e-2 (relative to each quantity's largest value) and no further off than the plain
    path run in that dtype (2x, or 1e-3)."""
    from tidal.objectives.logprobs import token_logprobs

    h16, w16 = h.to(dtype), w.to(dtype)
    exact = _run(token_logprobs, h16.float(), w16.float(), labels, ignore, up_lp, up_ent, {})
    plain = _run(token_logprobs, h16, w16, labels, ignore, up_lp, up_ent, {})
    fused = _run(fused_fn, h16, w16, labels, ignore, up_lp, up_ent, {})
    out = {}
    for name, r in exact.items():
        scale = r.abs().max().item()
        err_fused = (fused[name].float() - r).abs().max().item() / scale
        err_plain = (plain[name].float() - r).abs().max().item() / scale
        want = torch.float32 if name in ("logp", "entropy") else dtype
        ok = fused[name].dtype == want and err_fused <= max(2 * err_plain, 1e-3) and err_fused < 2e-2
        out[name] = {"ok": ok, "err": err_fused,
                     "msg": f"{fused[name].dtype}, relative error {err_fused:.2e} (plain path {err_plain:.2e})"}
    return out


def _interpreted_fp16_case():
    """fp16 through the interpreter (it cannot run bf16 dots: triton-lang/triton#11584), with the
    16-bit default tiles: the GPU's 16-bit code path on CPU."""
    from tidal_kernels.fused_logprob import fused_token_logprobs

    h, w, labels, ignore, up_lp, up_ent = _inputs((3, 50), 72, 300, {})
    return _half_check(h, w, labels, ignore, up_lp, up_ent,
                       lambda a, b, c, i: fused_token_logprobs(a, b, c, i, vocab_chunk=128), torch.float16)


def _child(names) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the child runs the interpreter only"
    results = {}
    for name in names:
        try:
            results[name] = (_interpreted_model_case() if name == "model" else
                             _interpreted_fp16_case() if name == "fp16" else _interpreted_case(name))
        except Exception as e:  # report, do not hide the other cases
            results[name] = {"run": {"ok": False, "err": None, "msg": f"{type(e).__name__}: {e}"[:2000]}}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    """All interpreted cases, run once in a child process under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *CASES, "model", "fp16"],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


def _assert_ok(result: dict) -> None:
    bad = {k: v["msg"] for k, v in result.items() if not v["ok"]}
    assert not bad, bad


@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_reference_interpreted(interpreted, name):
    _assert_ok(interpreted[name])


def test_model_token_logprobs_fused_path_interpreted(interpreted):
    _assert_ok(interpreted["model"])


def test_fused_fp16_within_half_tolerance_interpreted(interpreted):
    _assert_ok(interpreted["fp16"])


def test_reference_equals_tidal_token_logprobs():
    from tidal.objectives.logprobs import token_logprobs
    from tidal_kernels.reference import token_logprobs_reference

    shape, hidden, vocab, _, extra = CASES["ignore-index-0"]
    h, w, labels, ignore, up_lp, up_ent = _inputs(shape, hidden, vocab, extra)
    ref = _run(token_logprobs, h, w, labels, ignore, up_lp, up_ent, extra)
    got = _run(token_logprobs_reference, h, w, labels, ignore, up_lp, up_ent, extra)
    for name, r in ref.items():
        assert torch.equal(got[name], r), name


def test_fused_rejects_mismatched_inputs():
    pytest.importorskip("triton")
    from tidal_kernels.fused_logprob import fused_token_logprobs

    h, w, labels = torch.zeros(2, 3, 8), torch.zeros(5, 8), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="weight"):
        fused_token_logprobs(h, torch.zeros(5, 7), labels)
    with pytest.raises(ValueError, match="labels"):
        fused_token_logprobs(h, w, labels[:, :2])
    with pytest.raises(TypeError, match="bfloat16"):
        fused_token_logprobs(h, w.bfloat16(), labels)
    with pytest.raises(ValueError, match="vocab_chunk"):
        fused_token_logprobs(h, w, labels, vocab_chunk=0)


class _TinyLM(torch.nn.Module):
    """What ``model_token_logprobs`` sees of an HF causal LM: a Llama config, a plain
    bias-free head, ``.logits`` (without importing transformers)."""

    def __init__(self, vocab=31, hidden=16):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="llama")
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.head(self.emb(input_ids)))


def test_cpu_default_is_the_chunked_path(monkeypatch):
    """On CPU tensors ``model_token_logprobs`` goes through the chunked torch path."""
    import tidal.objectives.logprobs as L

    calls = []
    chunked = L.chunked_token_logprobs
    monkeypatch.setattr(L, "chunked_token_logprobs", lambda *a, **k: calls.append(1) or chunked(*a, **k))
    assert L.LOGPROB_PATH == "auto" and L.logprob_path(torch.zeros(1)) == "chunked"
    model = _TinyLM()
    ids = torch.randint(0, 31, (1, 5))
    L.model_token_logprobs(model, L.shift_targets(ids), input_ids=ids)
    assert calls == [1]
    monkeypatch.setattr(L, "LOGPROB_PATH", "triton")
    with pytest.raises(ValueError, match="LOGPROB_PATH"):
        L.logprob_path(torch.zeros(1))


# ---- GPU: the compiled kernels (skipped without CUDA) ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["vocab-slices", "default-blocks", "large-logits"])
def test_fused_fp32_on_cuda(name):
    from tidal.objectives.logprobs import token_logprobs
    from tidal_kernels.fused_logprob import fused_token_logprobs

    shape, hidden, vocab, opts, extra = CASES[name]
    args = _inputs(shape, hidden, vocab, extra, device="cuda")
    ref = _run(token_logprobs, *args, extra)
    got = _run(lambda a, b, c, i: fused_token_logprobs(a, b, c, i, **opts), *args, extra)
    _assert_ok(_compare(got, ref, TOL))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens,hidden,vocab", [(300, 256, 5003), (1024, 512, 32000)])
def test_fused_bf16_on_cuda_within_bf16_tolerance(tokens, hidden, vocab):
    from tidal_kernels.fused_logprob import fused_token_logprobs

    args = _inputs((tokens,), hidden, vocab, {}, device="cuda")
    _assert_ok(_half_check(*args, fused_token_logprobs, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_token_logprobs_selects_the_kernel_on_cuda(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    import tidal.objectives.logprobs as L
    import tidal_kernels.fused_logprob as F

    calls = []
    fused = F.fused_token_logprobs
    monkeypatch.setattr(F, "fused_token_logprobs", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).cuda()
    ids = torch.randint(0, 301, (3, 17), device="cuda")
    targets = L.shift_targets(ids)
    assert L.logprob_path(torch.zeros(1, device="cuda")) == "fused"
    out = {}
    for path in ("auto", "chunked"):
        monkeypatch.setattr(L, "LOGPROB_PATH", path)
        model.zero_grad()
        lp, ent = L.model_token_logprobs(model, targets, input_ids=ids)
        (lp.sum() + 0.3 * ent.sum()).backward()
        out[path] = {"logp": lp.detach(), "entropy": ent.detach(),
                     **{n: p.grad.clone() for n, p in model.named_parameters()}}
        assert len(calls) == 1  # auto took the kernel; chunked did not
    _assert_ok(_compare(out["auto"], out["chunked"], dict(atol=1e-4, rtol=1e-4)))


if __name__ == "__main__":
    _child(sys.argv[1:])
