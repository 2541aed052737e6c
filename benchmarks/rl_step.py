"""One RL iteration: tidal's GRPO (vLLM rollout engine + FSDP2 learner on Ray) against TRL's
``GRPOTrainer`` (Hugging Face ``generate`` in the trainer's process), side by side.

Same task as the learnability test (a tiny random Llama with a character tokenizer answers
digit prompts; dense prefix reward), the same prompts per iteration, group size, response
length, learning rate and number of iterations. TRL runs in its own environment
(``.venv-trl``: ``python3.11 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0
trl "transformers>=5.16.1,<5.20"``), since it is a benchmark-only dependency. Printed:
median seconds per iteration after warm-up for each, the ratio, and tidal's phase
breakdown (generate, score, log-probs, learn, sync) with the sync's share.

    python benchmarks/rl_step.py [--iterations 12] [--prompts 8] [--n 8] [--tokens 16]
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
WARMUP = 2


def trl_child(args) -> None:
    """Runs inside .venv-trl: TRL's GRPOTrainer on the same model, prompts and reward."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    rows = [json.loads(x) for x in open(args.prompt_file)]
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    def prefix_reward(prompts, completions, answer, **kw):
        out = []
        for c, a in zip(completions, answer):
            c = c.lstrip()
            k = 0
            while k < min(len(c), len(a)) and c[k] == a[k]:
                k += 1
            out.append(k / len(a))
        return out

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    cfg = GRPOConfig(output_dir=os.path.join(args.work, "trl"), learning_rate=args.lr,
                     per_device_train_batch_size=args.prompts * args.n, num_generations=args.n,
                     max_completion_length=args.tokens, max_steps=args.iterations, beta=0.0,
                     temperature=1.0, top_p=1.0, top_k=0, logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0,
                     gradient_accumulation_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=prefix_reward, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print("RESULT " + json.dumps({"times": times, "rewards": rewards}), flush=True)


def run_tidal(args, work: str, model_dir: str, prompt_file: str) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "platform"))
    from tidal.config import RLHFConfig, from_dict, to_dict, validate_rlhf
    from tidal.train.launch import run_stage

    base = to_dict(RLHFConfig())
    base["model"]["pretrained"] = model_dir
    base["data"].update(name="digits", sources=[prompt_file], seq_len=16, val_fraction=0.1)
    base["rollout"].update(n=args.n, prompts_per_iteration=args.prompts, max_tokens=args.tokens,
                           kv_cache_gib=0.05, samples_every=0)
    base["reward"].update(model=None, rules=["prefix_match"])
    base["algorithm"].update(kl_coef=0.0)
    base["optim"]["lr"] = args.lr
    base["scaling"].update(workers=1)
    base["logger"].update(wandb=False, wandb_mode="disabled", progress=False)
    base["train"].update(max_steps=args.iterations, micro_batch_size=args.prompts * args.n,
                         eval_every=args.iterations, checkpoint_every=0, export_hf=False)
    base["run"].update(name="bench", output_dir=os.path.join(work, "tidal"))
    summary = run_stage("rlhf", validate_rlhf(from_dict(RLHFConfig, base)), log=lambda *a: None)
    recs = [json.loads(x) for x in open(summary["metrics"]) if "reward_mean" in x]
    return {"recs": recs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--trl-python", default=os.path.join(ROOT, ".venv-trl", "bin", "python"))
    ap.add_argument("--trl-child", action="store_true")
    ap.add_argument("--model-dir")
    ap.add_argument("--prompt-file")
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.trl_child:
        return trl_child(args)
    sys.path.insert(0, ROOT)
    from tidal.rlhf.toy import char_model, digit_prompts

    with tempfile.TemporaryDirectory() as work:
        model_dir = char_model(os.path.join(work, "policy"))
        prompt_file = digit_prompts(os.path.join(work, "prompts.jsonl"), n=max(64, args.prompts * args.iterations))
        t = run_tidal(args, work, model_dir, prompt_file)["recs"][WARMUP:]
        trl = None
        if os.path.exists(args.trl_python):
            p = subprocess.run([args.trl_python, __file__, "--trl-child", "--model-dir", model_dir,
                                "--prompt-file", prompt_file, "--work", work, "--iterations", str(args.iterations),
                                "--prompts", str(args.prompts), "--n", str(args.n), "--tokens", str(args.tokens),
                                "--lr", str(args.lr)], capture_output=True, text=True, timeout=3600,
                               env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"TRL failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
            else:
                trl = json.loads(line[0][7:])
    tidal_s = statistics.median(r["iteration_s"] for r in t)
    print(f"GRPO, {args.prompts} prompts x {args.n} samples x {args.tokens} tokens, {args.iterations} iterations "
          f"(median after {WARMUP} warm-up), {os.cpu_count()} cores")
    print(f"{'':28} {'s/iteration':>11} {'final reward':>13}")
    print(f"{'tidal (vLLM + 1 FSDP2 rank)':28} {tidal_s:>11.3f} {t[-1]['reward_mean']:>13.3f}")
    if trl is not None:
        trl_s = statistics.median(trl["times"][WARMUP:])
        print(f"{'TRL GRPOTrainer (HF gen.)':28} {trl_s:>11.3f} {trl['rewards'][-1] if trl['rewards'] else float('nan'):>13.3f}")
        print(f"ratio TRL / tidal seconds per iteration: {trl_s / tidal_s:.2f}  (target >= 1.0 on CPU)")
    else:
        print(f"TRL not run: no environment at {args.trl_python} (see this script's docstring)")
    phases = ("gen_s", "score_s", "logp_s", "learn_s", "sync_s")
    total = statistics.median(r["iteration_s"] for r in t)
    print("tidal phases (median s, share): " + ", ".join(
        f"{k[:-2]} {statistics.median(r[k] for r in t):.3f} ({statistics.median(r[k] for r in t) / total:.0%})"
        for k in phases))
    print(f"sync share of the iteration: {statistics.median(r['sync_share'] for r in t):.1%} (target <= 5%)")


if __name__ == "__main__":
    main()
