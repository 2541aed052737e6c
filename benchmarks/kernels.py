"""Peak memory and time of per-token log-probs + entropy, forward and backward: the naive path
(full fp32 logits, ``token_logprobs``), the chunked torch path (``chunked_token_logprobs``) and
tidal_kernels' fused Triton kernel (``fused_token_logprobs``), with ratios against naive.

On CUDA all three run in this process; memory is ``torch.cuda.max_memory_allocated`` above the
inputs (the gradients included, the same for every path). On CPU only the two torch paths run,
each in a fresh process (peak RSS above the inputs): the Triton kernel needs CUDA, and under
``TRITON_INTERPRET=1`` it runs, but only to prove correctness (tests/unit/test_kernels.py).

    python benchmarks/kernels.py [--tokens 8192] [--vocab 128256] [--hidden 4096] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "platform"), os.path.join(ROOT, "kernels")]

VARIANTS = {"naive": "naive (full fp32 logits)", "chunked": "chunked torch (tidal.objectives)",
            "fused": "fused Triton (tidal_kernels)"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _fn(variant: str, chunk: int):
    from tidal.objectives.logprobs import chunked_token_logprobs, token_logprobs

    if variant == "naive":
        return token_logprobs
    if variant == "chunked":
        return lambda h, w, y: chunked_token_logprobs(h, w, y, chunk_size=chunk)
    from tidal_kernels.fused_logprob import fused_token_logprobs
    return fused_token_logprobs


def _inputs(tokens: int, vocab: int, hidden: int, dtype, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    labels[: tokens // 8] = -100  # prompt positions
    up = torch.randn(tokens, generator=g).to(device)
    return h, w, labels, up


def _step(fn, h, w, labels, up):
    h.grad = w.grad = None
    lp, ent = fn(h, w, labels)
    ((lp * up).sum() + 0.01 * ent.sum()).backward()
    return lp.detach()


def measure_cuda(variant: str, args, dtype) -> dict:
    import torch

    fn = _fn(variant, args.chunk)
    h, w, labels, up = _inputs(args.tokens, args.vocab, args.hidden, dtype, "cuda")
    logp = _step(fn, h, w, labels, up)  # warm-up (Triton compiles here)
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _step(fn, h, w, labels, up)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base
    out = {"extra_bytes": peak, "time_s": statistics.median(times), "logp": logp}
    del h, w, labels, up
    torch.cuda.empty_cache()
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_cpu(variant: str, args, dtype) -> None:
    import resource

    import torch

    fn = _fn(variant, args.chunk)
    h, w, labels, up = _inputs(args.tokens, args.vocab, args.hidden, dtype, "cpu")
    base = _rss_bytes()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        _step(fn, h, w, labels, up)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra_bytes": peak - base, "time_s": statistics.median(times),
                      "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=None, help="default 8192 on CUDA, 2048 on CPU")
    ap.add_argument("--vocab", type=int, default=None, help="default 128256 on CUDA, 32000 on CPU")
    ap.add_argument("--hidden", type=int, default=None, help="default 4096 on CUDA, 512 on CPU")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--chunk", type=int, default=1024, help="chunk_size of the chunked torch path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="measure on CPU even when CUDA is present")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    defaults = (8192, 128256, 4096, "bf16") if cuda else (2048, 32000, 512, "fp32")
    for key, val in zip(("tokens", "vocab", "hidden", "dtype"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, val)
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.child:
        child_cpu(args.child, args, dtype)
        return

    rows = {}
    if cuda:
        for variant in VARIANTS:
            rows[variant] = measure_cuda(variant, args, dtype)
        ref = rows["naive"].pop("logp")
        for variant in ("chunked", "fused"):
            rows[variant]["dlogp"] = (rows[variant].pop("logp") - ref).abs().max().item()
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}; memory = max_memory_allocated above the inputs"
    else:
        for variant in ("naive", "chunked"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--cpu"]
            for key in ("tokens", "vocab", "hidden", "dtype", "chunk", "repeats"):
                cmd += [f"--{key}", str(getattr(args, key))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        where = (f"CPU, {rows['naive']['threads']} threads, torch {torch.__version__}; memory = peak RSS "
                 f"above the inputs, fresh process each")

    print(f"\nlog-probs + entropy, forward + backward: {args.tokens} tokens x vocab {args.vocab}, "
          f"hidden {args.hidden}, {args.dtype}, chunk {args.chunk}, median of {args.repeats}; {where}")
    print(f"{'version':<34}{'peak extra MiB':>16}{'time ms':>10}{'mem / naive':>13}{'time / naive':>14}")
    n = rows["naive"]
    for variant, name in VARIANTS.items():
        r = rows.get(variant)
        if r is None:
            print(f"{name:<34}  needs CUDA (on CPU, TRITON_INTERPRET=1 proves correctness only)")
            continue
        print(f"{name:<34}{r['extra_bytes'] / 2**20:>16,.0f}{r['time_s'] * 1e3:>10.1f}"
              f"{r['extra_bytes'] / n['extra_bytes']:>13.3f}{r['time_s'] / n['time_s']:>14.2f}")
    if "fused" in rows:
        f = rows["fused"]
        print(f"max |logp - naive|: chunked {rows['chunked']['dlogp']:.2e}, fused {f['dlogp']:.2e}")
        print(f"fused / naive: memory {f['extra_bytes'] / n['extra_bytes']:.3f} (target <= 0.125), "
              f"time {f['time_s'] / n['time_s']:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
