"""Training throughput: tidal (1 FSDP2 worker on Ray Train) against a bare PyTorch loop.

Same model, data, batch, micro-batch, dtype, optimizer and schedule; the bare loop is a
single process with no Ray and no FSDP. Both use the same number of CPU threads. Printed:
steady-state tokens/s of each (median step time after warm-up) and the ratio.

    python benchmarks/throughput.py [--steps 40] [--model tiny] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))
import _hydra  # noqa: E402,F401  (makes tidal importable from a plain checkout)

import torch  # noqa: E402

from tidal.config import PretrainConfig, from_dict, to_dict, validate_pretrain  # noqa: E402
from tidal.data.loader import GlobalSampleLoader  # noqa: E402
from tidal.models import build_model  # noqa: E402
from tidal.objectives import causal_lm_loss, split_sample  # noqa: E402
from tidal.optim import build_optimizer, lr_at  # noqa: E402
from tidal.data.ready import ensure_data  # noqa: E402
from tidal.train.launch import init_ray, run_stage  # noqa: E402

WARMUP = 3


def make_cfg(args, out: str) -> PretrainConfig:
    import yaml

    base = to_dict(PretrainConfig())
    with open(os.path.join(ROOT, "conf", "model", f"{args.model}.yaml")) as f:
        base["model"].update(yaml.safe_load(f))
    base["scaling"].update(workers=1, cpus_per_worker=args.threads)
    base["train"].update(max_steps=args.steps, global_batch_tokens=args.batch_tokens,
                         micro_batch_size=args.micro, eval_every=args.steps, eval_batches=1,
                         checkpoint_every=0, export_hf=False)
    base["schedule"]["warmup_steps"] = min(5, args.steps)
    base["logger"].update(wandb=False, wandb_mode="disabled", progress=False)
    base["run"].update(name=f"bench-{int(time.time())}", output_dir=out)
    return validate_pretrain(from_dict(PretrainConfig, base))


def bare_loop(cfg: PretrainConfig, data_dir: str, manifest: dict, threads: int) -> list[float]:
    """The baseline: plain PyTorch, one process; returns per-step seconds."""
    torch.set_num_threads(threads)
    tok = manifest["tokenizer"]
    model = build_model(cfg.model, tok["vocab_size"], tok["eos_token_id"], tok["pad_token_id"],
                        cfg.train.seed)
    opt = build_optimizer(model, cfg.optim, "cpu")
    global_batch = cfg.train.global_batch_tokens // cfg.data.seq_len
    loader = GlobalSampleLoader(data_dir, manifest, cfg.train.seed, global_batch)
    times = []
    for step in range(cfg.train.max_steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train.max_steps, cfg.optim.lr, cfg.schedule)
        micro = list(loader.micro_batches(step * global_batch, 0, 1, cfg.train.micro_batch_size))
        for mb in micro:
            inputs, labels = split_sample(torch.from_numpy(mb))
            loss = causal_lm_loss(model(input_ids=inputs).logits, labels) / len(micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--micro", type=int, default=8)
    args = ap.parse_args()
    out = os.environ.get("TIDAL_OUTPUT_DIR") or os.path.join(ROOT, "outputs")
    cfg = make_cfg(args, out)
    init_ray()
    data_dir, manifest = ensure_data(cfg.data, out)

    tokens = cfg.train.global_batch_tokens
    t0 = time.time()
    bare = bare_loop(cfg, data_dir, manifest, args.threads)
    bare_wall = time.time() - t0
    runs = {}
    for every in (cfg.train.dynamics_every, 0):  # training-dynamics metrics on (the default), then off
        t0 = time.time()
        run_cfg = replace(cfg, train=replace(cfg.train, dynamics_every=every),
                          run=replace(cfg.run, name=f"{cfg.run.name}-dyn{every}"))
        summary = run_stage("pretrain", run_cfg)
        with open(summary["metrics"]) as f:
            recs = [json.loads(line) for line in f if '"step_time_s"' in line]
        runs[every] = ([r["step_time_s"] for r in recs][WARMUP:], time.time() - t0)
    bare = bare[WARMUP:]
    rows = [("bare PyTorch loop (1 process)", bare, bare_wall)]
    rows += [(f"tidal, dynamics every {e} steps" if e else "tidal, dynamics off", t, w) for e, (t, w) in runs.items()]
    print(f"\nmodel={args.model} steps={args.steps} batch={tokens} tokens micro={args.micro} "
          f"threads={args.threads} dtype=fp32 torch={torch.__version__}")
    print(f"{'run (Ray Train, 1 worker)':<36}{'tokens/s median':>16}{'tokens/s mean':>15}{'wall s (incl. start-up)':>26}")
    for name, times, wall in rows:
        print(f"{name:<36}{tokens / statistics.median(times):>16,.0f}{tokens / statistics.mean(times):>15,.0f}{wall:>26.1f}")
    on, off = runs[cfg.train.dynamics_every][0], runs[0][0]
    print(f"ratio tidal (dynamics on) / bare, median step: {statistics.median(bare) / statistics.median(on):.3f}  "
          f"(target >= 0.95)")
    print(f"ratio dynamics on / off, mean step (the measured steps included): "
          f"{statistics.mean(off) / statistics.mean(on):.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
