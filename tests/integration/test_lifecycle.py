"""The default lifecycle end to end: `python jobs/rlhf.py` with nothing given runs
pretraining, SFT and the reward model first, then GRPO; PPO follows on the same exports.
One module of its own: it is the suite's longest test (`long`: started early)."""
import json
import os

import pytest

from tests.integration.conftest import records

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.long]
pytest.importorskip("vllm")


@pytest.mark.timeout(2400)  # six jobs, ~15 minutes alone
def test_default_lifecycle_raises_held_out_reward(tmp_path):
    """`python jobs/rlhf.py` with no model, reward or data given, on a fresh output dir:
    pretraining, SFT and the reward model run first (short runs here), then GRPO on the
    embedded prompts, scored by the reward model's actors, raises the held-out reward over
    the starting policy while the KL to it stays small; then PPO (algorithm=ppo) on the same
    exports, its value model from the reward model, raises the held-out reward with its KL
    near the controller's target, and survives a killed reward actor."""
    import subprocess

    from tests.conftest import PYTHON, ROOT

    out = str(tmp_path / "out")
    env = dict(os.environ, TIDAL_OUTPUT_DIR=out, WANDB_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    quick = ["logger.wandb=false", "logger.progress=false"]
    for job, steps in (("pretrain", ["train.max_steps=30", "train.eval_every=30", "train.checkpoint_every=30"]),
                       ("sft", ["train.max_steps=20", "train.eval_every=20", "train.checkpoint_every=20"]),
                       ("reward", ["train.max_steps=20", "train.eval_every=20", "train.checkpoint_every=20"])):
        p = subprocess.run([PYTHON, os.path.join(ROOT, "jobs", f"{job}.py"), *steps, *quick], env=env,
                           cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    p = subprocess.run([PYTHON, os.path.join(ROOT, "jobs", "rlhf.py"), "run.name=rl", *quick], env=env,
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "starting from " + os.path.join(out, "sft-") in p.stdout and "reward model " in p.stdout
    run_dir = os.path.join(out, "rl")
    start = [json.loads(x) for x in open(os.path.join(run_dir, "events.jsonl")) if "held_out_start" in x][0]
    recs = records(run_dir)
    final = [r for r in recs if "val_reward" in r][-1]
    assert final["val_reward"] > start["val_reward"], (start, final)
    assert max(r["kl"] for r in recs if "kl" in r) < 1.0
    assert max(r["logp_gap_abs"] for r in recs if "logp_gap_abs" in r) < 1e-3

    # PPO on the same exports (algorithm=ppo, the value model from the reward model's
    # weights), with a reward-model actor killed before it scores iteration 3
    p = subprocess.run([PYTHON, os.path.join(ROOT, "jobs", "rlhf.py"), "algorithm=ppo", "run.name=ppo",
                        "train.inject_faults=[kill_reward@3]", "train.max_steps=10", *quick], env=env, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run_dir = os.path.join(out, "ppo")
    start = [json.loads(x) for x in open(os.path.join(run_dir, "events.jsonl")) if "held_out_start" in x][0]
    recs = [r for r in records(run_dir) if "reward_mean" in r]
    assert [r["step"] for r in recs] == list(range(1, 11))
    assert "val_reward" in recs[-1] and start["val_reward"] is not None
    # the first two iterations train only the value model: the policy, its KL and the
    # controller wait; the value model then fits the returns better than it started
    assert [r.get("policy_frozen", 0) for r in recs] == [1, 1] + [0] * 8
    assert all("loss" not in r for r in recs[:2]) and all("loss" in r for r in recs[2:])
    assert all(r["kl_seq"] == 0 for r in recs[:3])  # iteration 3 still samples the starting policy
    # checkpoints are named by iteration (the policy took 8 optimizer steps in 10 iterations)
    assert os.path.isdir(os.path.join(run_dir, "checkpoint_0000010")) and recs[-1]["optimizer_step"] == 8
    assert recs[-1]["explained_var"] > max(recs[0]["explained_var"], 0.1)
    # PPO raises the held-out reward, its per-sequence KL climbs to the order of its target (6
    # nats) without passing it, and the adaptive controller moves the coefficient by the KL's
    # error after every iteration in which the policy moved
    assert recs[-1]["val_reward"] > start["val_reward"], (start, recs[-1])
    target = 6.0
    assert all(target / 3 < r["kl_seq"] < target for r in recs[-3:]) and max(r["kl_seq"] for r in recs) < target
    assert recs[0]["kl_coef"] == recs[1]["kl_coef"] == recs[2]["kl_coef"] == 0.05
    for a, b in zip(recs[2:], recs[3:]):
        assert (b["kl_coef"] < a["kl_coef"]) == (a["kl_seq"] < target), (a, b)
    # the killed reward actor was replaced and its batch re-scored: nothing dropped, no restart
    assert [r["reward_actor_restarts"] for r in recs[:4]] == [0, 0, 1, 1]
    assert all(r["reward_errors"] == 0 and r["kept_frac"] == 1.0 for r in recs)
    assert sum(json.loads(x)["event"] == "start" for x in open(os.path.join(run_dir, "events.jsonl"))) == 1
    config = open(os.path.join(run_dir, "config.yaml")).read()
    assert "init: auto" in config and "estimator: gae" in config
