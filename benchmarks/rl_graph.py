"""The RL graph under failures, and synchronous against asynchronous rollouts, side by side
in one process on a local Ray runtime (the toy task of tidal.rlhf.toy, as in tests/integration/test_rlhf.py:
a tiny random Llama with a character tokenizer answers digit prompts; GRPO, deterministic).

1. Time lost per failure: the same run without and with ``train.inject_faults``:
   ``kill_engine@K`` (a vLLM engine's process SIGKILLed while it generates; restarted,
   synced, the iteration regenerated from the same seeds) and ``kill@K:1`` (learner rank 1
   SIGKILLed; the group restarts from the newest checkpoint and replays). Per failure: the
   time from the kill to the run being back at the same iteration, and whether every
   iteration's reward and loss equal the run without failures.
2. Seconds per iteration, ``rollout.max_staleness`` 0 (synchronous) against 2 (the next
   iteration generated while the learners train, weights synced every second iteration),
   with 1 and 2 learner workers, and the ratio.

    python benchmarks/rl_graph.py [--iterations 30] [--checkpoint-every 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP = 2


def config(work: str, name: str, args, workers: int = 2, staleness: int = 0, faults=()):
    sys.path.insert(0, os.path.join(ROOT, "platform"))
    from tidal.config import RLHFConfig, from_dict, to_dict, validate_rlhf

    base = to_dict(RLHFConfig())
    base["model"]["pretrained"] = args.model_dir
    base["data"].update(name="digits", sources=[args.prompt_file], seq_len=16, val_fraction=0.25)
    base["rollout"].update(n=8, prompts_per_iteration=8, max_tokens=4, kv_cache_gib=0.05, samples_every=0,
                           max_staleness=staleness)
    base["reward"].update(model=None, rules=["prefix_match"])
    base["algorithm"].update(kl_coef=0.0)
    base["optim"]["lr"] = 3e-3
    base["scaling"].update(workers=workers, max_failures=3)
    base["logger"].update(wandb=False, wandb_mode="disabled", progress=False)
    base["train"].update(max_steps=args.iterations, micro_batch_size=16, eval_every=args.iterations,
                         checkpoint_every=args.checkpoint_every, deterministic=True, export_hf=False,
                         inject_faults=list(faults))
    base["run"].update(name=name, output_dir=os.path.join(work, "out"))
    return validate_rlhf(from_dict(RLHFConfig, base))


def read(run_dir: str, name: str):
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--checkpoint-every", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import ray

    from tidal.rlhf.toy import char_model, digit_prompts
    from tidal.train.launch import run_stage

    work = tempfile.mkdtemp(prefix="tidal-bench-rl-")
    args.model_dir = char_model(os.path.join(work, "policy"))
    args.prompt_file = digit_prompts(os.path.join(work, "prompts.jsonl"))
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    quiet = lambda *a: None  # noqa: E731

    def run(name, **kw):
        s = run_stage("rlhf", config(work, name, args, **kw), log=quiet)
        return s, [r for r in read(s["run_dir"], "metrics.jsonl") if "reward_mean" in r]

    n, every = args.iterations, args.checkpoint_every
    k_engine, k_learner = n // 3, 2 * n // 3 + 2
    faults = [f"kill_engine@{k_engine}", f"kill@{k_learner}:1"]
    clean, clean_recs = run("clean")
    faulty, recs = run("faulty", faults=faults)
    it_s = statistics.median(r["iteration_s"] for r in clean_recs[WARMUP:])
    same = [(r["reward_mean"], r["loss"]) for r in recs] == [(r["reward_mean"], r["loss"]) for r in clean_recs]
    events = read(faulty["run_dir"], "events.jsonl")
    print(f"\nfailures: GRPO, 2 learner workers (FSDP2, gloo), 1 vLLM engine (CPU), checkpoint every {every} "
          f"iterations, median iteration {it_s:.3f}s, {os.cpu_count()} cores")
    print(f"{'fault':<18}{'restored from':>14}{'replayed':>10}{'kill -> back at that iteration s':>34}"
          f"{'iterations lost':>17}")
    lost = next(e for e in events if e["event"] == "engine_lost")
    print(f"{faults[0]:<18}{'-':>14}{0:>10}{lost['recovery_s']:>34.1f}{lost['recovery_s'] / it_s:>17.1f}")
    start = [e for e in events if e["event"] == "start"][1]
    killed_at = os.path.getmtime(os.path.join(work, "out", "faulty", "faults", faults[1].replace(":", "_")))
    back = next(r for r in recs if r["step"] == k_learner)["time"]
    print(f"{faults[1]:<18}{start['step']:>14}{k_learner - start['step']:>10}{back - killed_at:>34.1f}"
          f"{(back - killed_at) / it_s:>17.1f}")
    print(f"whole run: {faulty['wall_time_s']:.1f}s with both failures, {clean['wall_time_s']:.1f}s without; "
          f"every iteration's reward and loss equal to the run without failures: {same}")

    print(f"\nseconds per iteration (median after {WARMUP} warm-up), {n} iterations, same task and seeds")
    print(f"{'learners':<10}{'sync (max_staleness=0)':>24}{'async (max_staleness=2)':>25}{'ratio sync/async':>18}"
          f"{'final reward sync / async':>27}")
    for workers in (1, 2):
        sync_recs = clean_recs if workers == 2 else run("sync-w1", workers=1)[1]
        async_recs = run(f"async-w{workers}", workers=workers, staleness=2)[1]
        a = statistics.median(r["iteration_s"] for r in sync_recs[WARMUP:])
        b = statistics.median(r["iteration_s"] for r in async_recs[WARMUP:])
        print(f"{workers:<10}{a:>24.3f}{b:>25.3f}{a / b:>18.2f}"
              f"{sync_recs[-1]['reward_mean']:>14.2f} / {async_recs[-1]['reward_mean']:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
