"""Peak memory and time of per-token log-probs + entropy: the chunked custom-autograd
version against the plain one (full fp32 logits), forward and backward, each variant in a
fresh process (peak RSS above the inputs), side by side.

    python benchmarks/logprobs.py [--tokens 4096] [--vocab 32000] [--hidden 1024]
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, repeats: int) -> None:
    import resource

    import torch

    sys.path.insert(0, os.path.join(ROOT, "platform"))
    from tidal.objectives.logprobs import chunked_token_logprobs, token_logprobs

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    fn = token_logprobs if variant == "naive" else (
        lambda a, b, c: chunked_token_logprobs(a, b, c, chunk_size=chunk))
    base = _rss_bytes()
    times = []
    for _ in range(repeats):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        lp, ent = fn(h, w, labels)
        (lp.sum() + 0.01 * ent.sum()).backward()
        times.append(time.perf_counter() - t0)
        del lp, ent
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra_bytes": peak - base, "time_s": statistics.median(times),
                      "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.tokens, args.vocab, args.hidden, args.chunk, args.repeats)
        return
    rows = {}
    for variant in ("naive", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens),
                              "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                              "--chunk", str(args.chunk), "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    n, c = rows["naive"], rows["chunked"]
    print(f"\nlog-probs + entropy, forward + backward: {args.tokens} tokens x vocab {args.vocab}, "
          f"hidden {args.hidden}, fp32 CPU, {n['threads']} threads, chunk {args.chunk}, "
          f"median of {args.repeats}; memory = peak RSS above the inputs, fresh process each")
    print(f"{'version':<34}{'peak extra MiB':>16}{'time s':>10}")
    for name, r in (("naive (full fp32 logits)", n), ("chunked (tidal.objectives)", c)):
        print(f"{name:<34}{r['extra_bytes'] / 2**20:>16,.0f}{r['time_s']:>10.3f}")
    print(f"memory chunked / naive: {c['extra_bytes'] / n['extra_bytes']:.2f} (target <= 0.25); "
          f"time chunked / naive: {c['time_s'] / n['time_s']:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
