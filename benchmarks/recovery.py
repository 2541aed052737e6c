"""Cost of failures and of checkpoints, side by side in one process on a local Ray runtime.

1. Time lost per failure: the same deterministic run without and with SIGKILLed workers
   (train.inject_faults); per failure, the time from the kill to the first new step, the
   steps replayed since the restored checkpoint, and the extra wall time per failure.
2. Checkpoint blocking: seconds the training loop spends per checkpoint, synchronous DCP
   saves against DCP ``async_save`` (staging in memory, writing in a background thread).

    python benchmarks/recovery.py [--model tiny] [--steps 40] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))
import _hydra  # noqa: E402,F401

from tidal.config import PretrainConfig, from_dict, to_dict, validate_pretrain  # noqa: E402

DATA = os.environ.get("TIDAL_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
MODELS = {  # tiny: the schema's default model (conf/model/tiny.yaml)
    "tiny": {"hidden_size": 192, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
             "intermediate_size": 512},
    "small": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 8,
              "intermediate_size": 1376},
}


def config(out: str, name: str, args, **train) -> PretrainConfig:
    d = to_dict(PretrainConfig())
    d["model"].update(MODELS[args.model])
    d["data"].update({"name": "tinyshakespeare", "seq_len": 128,
                      "sources": [os.path.join(DATA, "tinyshakespeare", "input.txt")],
                      "tokenizer": {"vocab_size": 4096}})
    d["scaling"].update({"workers": args.workers, "max_failures": 5})
    d["logger"].update({"wandb": False, "wandb_mode": "disabled", "progress": False})
    d["train"].update({"max_steps": args.steps, "global_batch_tokens": 4096, "micro_batch_size": 8,
                       "eval_every": args.steps, "eval_batches": 1, "checkpoint_every": args.every,
                       "keep_checkpoints": 2, "deterministic": True, "export_hf": False, **train})
    d["run"].update({"name": name, "output_dir": out})
    return validate_pretrain(from_dict(PretrainConfig, d))


def read(run_dir: str, name: str):
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from tidal.train.launch import run_stage

    out = tempfile.mkdtemp(prefix="tidal-bench-recovery-")
    kills = [f"kill@{args.steps // 3 + 2}:1", f"kill@{2 * args.steps // 3 + 3}:0"]
    clean = run_stage("pretrain", config(out, "clean", args))
    faulty = run_stage("pretrain", config(out, "faulty", args, inject_faults=kills))
    sync = run_stage("pretrain", config(out, "sync", args, checkpoint_every=2))
    asyn = run_stage("pretrain", config(out, "async", args, checkpoint_every=2, async_checkpoint=True))

    recs = read(faulty["run_dir"], "metrics.jsonl")  # the surviving record of each step
    starts = [e for e in read(faulty["run_dir"], "events.jsonl") if e["event"] == "start"][1:]
    step_time = statistics.median(r["step_time_s"] for r in recs[2:])
    print(f"\nfailures: {args.model} model, {args.workers} workers (gloo, CPU), checkpoint every "
          f"{args.every} steps, median step {step_time:.3f}s")
    print(f"{'fault':<12}{'restored from':>14}{'kill -> first new step s':>26}{'replayed steps':>16}"
          f"{'kill -> back at that step s':>29}")
    lost = []
    for spec, start in zip(kills, starts):
        step = int(spec.split("@")[1].split(":")[0])
        marker = os.path.join(out, "faulty", "faults", spec.replace(":", "_"))
        killed_at = os.path.getmtime(marker)
        first = next(r for r in recs if r["step"] == start["step"] + 1)
        back = next(r for r in recs if r["step"] == step)  # the replayed record survives
        lost.append(back["time"] - killed_at)
        print(f"{spec:<12}{start['step']:>14}{first['time'] - killed_at:>26.1f}{step - start['step']:>16}"
              f"{back['time'] - killed_at:>29.1f}")
    clean_recs = read(clean["run_dir"], "metrics.jsonl")
    print(f"time lost per failure (kill -> training back where it was): median "
          f"{statistics.median(lost):.1f}s = {statistics.median(lost) / step_time:.0f} steps' worth "
          f"(restart + replay since the last checkpoint); per-step losses equal to the run "
          f"without failures: {[r['loss'] for r in recs] == [r['loss'] for r in clean_recs]}")

    def blocking(summary):
        return [e["blocking_s"] for e in read(summary["run_dir"], "events.jsonl") if e["event"] == "checkpoint"]

    b_sync, b_async = blocking(sync), blocking(asyn)
    print(f"\ncheckpoint blocking time per save ({len(b_sync)} saves each, median)")
    print(f"{'mode':<22}{'blocking s':>12}{'steps/s (whole run)':>22}")
    for name, b, s in (("sync DCP save", b_sync, sync), ("async DCP save", b_async, asyn)):
        print(f"{name:<22}{statistics.median(b):>12.3f}{args.steps / s['wall_time_s']:>22.2f}")
    print(f"ratio async / sync blocking: {statistics.median(b_async) / statistics.median(b_sync):.2f}")


if __name__ == "__main__":
    main()
