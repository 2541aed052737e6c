"""Overhead of a sweep: 4 trials through ``jobs/sweep.py`` against the same 4 runs launched
one after another with ``jobs/pretrain.py`` (same model, data, steps and learning rates),
each side as the user would run it (a fresh process, its own local Ray runtime). The data
is prepared once beforehand and shared by both sides; W&B is off on both.

    python benchmarks/sweep.py [--steps 30] [--model tiny] [--workers 1]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("TIDAL_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
LRS = ["1e-3", "2e-3", "3e-3", "5e-3"]


def job(args: list, out: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["TIDAL_OUTPUT_DIR"] = out
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{p.stderr[-4000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers per run/trial")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="tidal-sweep-bench-")
    data_dir = os.path.join(out, "data", "shakespeare")
    common = [f"model={args.model}", "data.name=tinyshakespeare", "data.seq_len=128",
              f"data.sources=[{os.path.join(DATA, 'tinyshakespeare', 'input.txt')}]",
              f"data.output_dir={data_dir}", f"train.max_steps={args.steps}", "train.eval_every=10",
              "train.checkpoint_every=10", "train.global_batch_tokens=4096", "train.micro_batch_size=8",
              "train.export_hf=false", f"scaling.workers={args.workers}", "logger.wandb=false",
              "logger.progress=false"]
    # prepare the data once (a 1-step run), outside both timings
    job(["jobs/pretrain.py", *common, "train.max_steps=1", "train.eval_every=1",
         "train.checkpoint_every=1", "schedule.warmup_steps=0", "run.name=warmup"], out)

    seq = [job(["jobs/pretrain.py", *common, f"optim.lr={lr}", f"run.name=seq-{lr}"], out) for lr in LRS]
    overrides = "[" + ",".join(f"'{c}'" for c in common) + "]"
    sweep_s = job(["jobs/sweep.py", "name=bench", "sweep=grid", f"overrides={overrides}",
                   "search.space=[{key: optim.lr, type: choice, values: [" + ", ".join(LRS) + "]}]",
                   "scheduler.name=fifo"], out)
    import ray

    ray.init(num_cpus=None, include_dashboard=False, logging_level="ERROR")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ray.shutdown()
    conc = max(1, cpus // args.workers)
    print(f"\nsweep overhead: {len(LRS)} runs of {args.steps} steps, model {args.model}, "
          f"{args.workers} worker(s) each, {cpus} CPUs (sweep runs {conc} trial(s) at once)")
    print(f"{'how':44s}{'wall s':>10s}")
    print(f"{'one after another (jobs/pretrain.py x4)':44s}{sum(seq):10.1f}")
    for lr, s in zip(LRS, seq):
        print(f"{'  lr=' + lr:44s}{s:10.1f}")
    print(f"{'one sweep (jobs/sweep.py, 4 trials, fifo)':44s}{sweep_s:10.1f}")
    print(f"sweep / sequential: {sweep_s / sum(seq):.2f}")


if __name__ == "__main__":
    main()
