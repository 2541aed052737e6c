"""Rollout generation: tidal's vLLM engine set-up against Hugging Face ``generate``.

Same random-init model (a tidal preset), the same prompts (random token ids), samples per
prompt and response length (EOS ignored, so every sample has exactly ``--tokens`` tokens),
sampling at temperature 1 with top-p/top-k off, fp32 on CPU. Each measurement runs in its
own process (vLLM's in-process engine changes the process's threading), HF and vLLM
alternate, and the median of ``--repeats`` is kept. Printed: generated tokens/s of each
and the ratio, per (prompts, n).

    python benchmarks/rollout.py [--model tiny] [--prompts 8,32,64] [--n 1,4] [--tokens 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "platform"))


def build(model: str, vocab: int, out: str) -> str:
    import torch
    import yaml

    from tidal.config import ModelConfig
    from tidal.models import build_model

    with open(os.path.join(ROOT, "conf", "model", f"{model}.yaml")) as f:
        mc = ModelConfig(**{k: v for k, v in (yaml.safe_load(f) or {}).items() if k != "name"})
    torch.manual_seed(0)
    m = build_model(mc, vocab, eos_id=1, pad_id=0, seed=0)
    m.config.eos_token_id = 1
    m.save_pretrained(out)
    return out


def prompts(count: int, length: int, vocab: int):
    import random

    rng = random.Random(0)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(count)]


def run_hf(model_dir: str, count: int, n: int, tokens: int, vocab: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts(count, 32, vocab))
    with torch.no_grad():
        model.generate(ids[:1], max_new_tokens=2, do_sample=True, use_cache=True)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=tokens, min_new_tokens=tokens, num_return_sequences=n,
                             pad_token_id=0, use_cache=True)  # the build turns the cache off for training
        dt = time.perf_counter() - t0
    return (out.shape[0] * (out.shape[1] - ids.shape[1])) / dt


def run_vllm(model_dir: str, count: int, n: int, tokens: int, vocab: int, threads: int) -> float:
    sys.path.insert(0, os.path.join(ROOT, "platform"))
    from tidal.rlhf.rollout import EngineSettings, RolloutEngine, sample_seed

    eng = RolloutEngine(EngineSettings(model_dir=model_dir, dtype="float32", max_model_len=32 + tokens + 8, seed=0,
                                       use_gpu=False, kv_cache_bytes=1 << 30, gpu_memory_utilization=0.5,
                                       eos_id=None), 0)
    ps = prompts(count, 32, vocab)
    seeds = [[sample_seed(0, 0, p, s) for s in range(n)] for p in range(count)]
    eng.generate(ps[:1], [seeds[0][:1]], 2, 1.0, 0)  # warm-up
    t0 = time.perf_counter()
    out = eng.generate(ps, seeds, tokens, 1.0, 0)
    dt = time.perf_counter() - t0
    return sum(len(s["ids"]) for row in out for s in row) / dt


def child(args) -> None:
    fn = run_hf if args.worker == "hf" else run_vllm
    tps = fn(args.model_dir, args.count, args.n_one, args.tokens, args.vocab, args.threads)
    print("RESULT " + json.dumps({"tps": tps}), flush=True)


def measure(kind: str, model_dir: str, count: int, n: int, args) -> float:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.path.join(ROOT, "platform"))
    cmd = [sys.executable, __file__, "--worker", kind, "--model-dir", model_dir, "--count", str(count),
           "--n-one", str(n), "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--threads", str(args.threads)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"{kind} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[0][7:])["tps"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompts", default="8,32,64")
    ap.add_argument("--n", default="1,4")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker")
    ap.add_argument("--model-dir")
    ap.add_argument("--count", type=int)
    ap.add_argument("--n-one", type=int)
    args = ap.parse_args()
    if args.worker:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(args.model, args.vocab, os.path.join(tmp, "model"))
        print(f"model={args.model} vocab={args.vocab} prompt=32 tokens, response={args.tokens} tokens, "
              f"fp32 CPU, threads={args.threads}, median of {args.repeats}")
        print(f"{'prompts':>7} {'n':>3} {'HF generate tok/s':>18} {'vLLM tok/s':>11} {'ratio':>6}")
        for count in map(int, args.prompts.split(",")):
            for n in map(int, args.n.split(",")):
                hf, vl = [], []
                for _ in range(args.repeats):  # alternate, so drift hits both
                    hf.append(measure("hf", model_dir, count, n, args))
                    vl.append(measure("vllm", model_dir, count, n, args))
                h, v = statistics.median(hf), statistics.median(vl)
                print(f"{count:>7} {n:>3} {h:>18,.0f} {v:>11,.0f} {v / h:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
