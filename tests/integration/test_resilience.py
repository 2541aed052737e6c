"""Fault tolerance on a real local Ray runtime with real FSDP2 (gloo) workers: SIGKILLed
workers, a crash in the middle of a save, damaged checkpoints, divergence rollbacks,
repeating failures and config drift on resume."""
import json
import os
import shutil

import pytest

from tests.integration.conftest import events, needs_shakespeare, records, small_cfg
from tidal.train import integrity
from tidal.train.launch import RunStopped, run_stage

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_shakespeare]  # multi-minute: full suite only

DET = {"deterministic": True, "max_steps": 12, "checkpoint_every": 4, "eval_every": 4,
       "keep_checkpoints": 4}




@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("resilience")


@pytest.fixture(scope="module")
def baseline(ray_local, out):
    """The uninterrupted run every recovery is compared with."""
    summary = run_stage("pretrain", small_cfg(out, run={"name": "baseline"}, train=DET))
    return {r["step"]: r for r in records(summary["run_dir"])}


def test_resume_reproduces_uninterrupted_losses(baseline, out):
    # Same run name: stop after 4 steps, then relaunch and resume automatically.
    run_stage("pretrain", small_cfg(out, run={"name": "split"}, train={**DET, "stop_at_step": 4}))
    split = run_stage("pretrain", small_cfg(out, run={"name": "split"}, train=DET))
    # A new run started from an explicit checkpoint path.
    ckpt = os.path.join(str(out), "split", "checkpoint_0000004")
    assert os.path.isdir(ckpt)
    explicit = run_stage("pretrain", small_cfg(out, run={"name": "from-path", "resume_from": ckpt}, train=DET))
    resumed = records(split["run_dir"])
    assert [r["step"] for r in resumed] == list(range(1, 13))  # none lost, none repeated
    assert [r["step"] for r in records(explicit["run_dir"])] == list(range(5, 13))
    for r in resumed + records(explicit["run_dir"]):
        for key in ("loss", "grad_norm", "val_loss"):
            assert r.get(key) == baseline[r["step"]].get(key), (r["step"], key)
    assert split["final_val_loss"] == baseline[12]["val_loss"]


def test_sigkilled_workers_recover_bit_exactly(baseline, out):
    # rank 1 dies after step 6 (restart from checkpoint 4); rank 0 dies in the middle of the
    # save at step 8, after its shard was uploaded but before the commit (restart from 4
    # again: the half-written checkpoint_8 must not be loaded)
    cfg = small_cfg(out, run={"name": "killed"}, scaling={"max_failures": 3},
                    train={**DET, "inject_faults": ["kill@6:1", "kill_in_save@8:0"]})
    summary = run_stage("pretrain", cfg)
    recs = records(summary["run_dir"])
    assert [r["step"] for r in recs] == list(range(1, 13))  # none lost, none repeated
    for r in recs:
        assert r["loss"] == baseline[r["step"]]["loss"], r["step"]
        assert r["grad_norm"] == baseline[r["step"]]["grad_norm"], r["step"]
    starts = [e for e in events(summary["run_dir"]) if e["event"] == "start"]
    assert [e["step"] for e in starts] == [0, 4, 4]
    assert starts[2]["checkpoint"].endswith("checkpoint_0000004")
    assert summary["restarts"] == 2
    run_storage = os.path.join(str(out), "killed")
    for step, path in integrity.list_checkpoints(run_storage):
        assert integrity.verify(path) == [], path  # the re-done save at 8 was committed


def test_divergence_rolls_back_and_skips_the_window(ray_local, out):
    guard = {"min_history": 3, "window": 10, "loss_spike_factor": 3.0}
    cfg = small_cfg(out, run={"name": "diverge"}, train={
        **DET, "guard": guard, "inject_faults": ["nan@6", "spike@11"]})
    summary = run_stage("pretrain", cfg)
    rb = summary["rollbacks"]
    assert [r["step"] for r in rb] == [6, 11]
    assert "non-finite" in rb[0]["reason"] and "loss spike" in rb[1]["reason"]
    assert [r["to_step"] for r in rb] == [4, 8]
    gb = 2048 // 128
    # the window from the checkpoint through the bad batch is never trained on
    assert rb[0]["skipped_samples"] == [4 * gb, 6 * gb]
    assert rb[1]["skipped_samples"] == [8 * gb + 2 * gb, 11 * gb + 2 * gb]
    recs = records(summary["run_dir"])
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all(r["loss"] == r["loss"] and r["loss"] < 20 for r in recs)  # no NaN, no spike kept
    state = json.load(open(os.path.join(summary["checkpoint"], "trainer_state.json")))
    source = state["states"]["source"]  # the data position is the source's named state
    assert source["skipped"] == [rb[0]["skipped_samples"], rb[1]["skipped_samples"]]
    assert source["cursor"] == (12 + 2 + 3) * gb  # 12 steps trained + 5 batches skipped
    assert state["states"]["engine"]["step"] == 12 and state["format"] == 2


def test_too_many_rollbacks_and_repeating_failures_stop_with_a_report(ray_local, out):
    guard = {"min_history": 3, "window": 10, "max_rollbacks": 1}
    cfg = small_cfg(out, run={"name": "hopeless"},
                    train={**DET, "guard": guard, "inject_faults": ["nan@3", "nan@6"]})
    with pytest.raises(RunStopped, match=r"max_rollbacks=1 .*diverging"):
        run_stage("pretrain", cfg)
    # a worker that dies at the same step on every attempt: stopped after two attempts
    cfg = small_cfg(out, run={"name": "crashloop"}, scaling={"max_failures": 5, "workers": 1},
                    train={**DET, "checkpoint_every": 2, "inject_faults": ["crash@3"]})
    with pytest.raises(RunStopped, match=r"last 2 attempts all failed at step 3"):
        run_stage("pretrain", cfg)


def test_resume_refuses_a_changed_meaning_unless_allowed(ray_local, out):
    name = "drift"
    run_stage("pretrain", small_cfg(out, run={"name": name}, train={**DET, "stop_at_step": 4}))
    with pytest.raises(ValueError) as e:
        run_stage("pretrain", small_cfg(out, run={"name": name}, model={"num_layers": 3},
                               optim={"lr": 1e-3}, train=DET))
    msg = str(e.value)
    assert "model.num_layers: 2 in the checkpoint -> 3 now" in msg
    assert "optim.lr: 0.003 in the checkpoint -> 0.001 now" in msg
    assert "run.allow_changes" in msg
    # allowed: a new learning rate (the shape change can never be loaded, even if allowed)
    with pytest.raises(ValueError, match="cannot be loaded"):
        run_stage("pretrain", small_cfg(out, run={"name": name, "allow_changes": ["model.num_layers"]},
                               model={"num_layers": 3}, train=DET))
    summary = run_stage("pretrain", small_cfg(out, run={"name": name, "allow_changes": ["optim"]},
                                     optim={"lr": 1e-3}, train={**DET, "stop_at_step": 6}))
    recs = records(summary["run_dir"])
    assert [r["step"] for r in recs][-2:] == [5, 6]
    assert recs[-1]["lr"] < 1e-3 + 1e-12 and recs[-1]["lr"] > 0


@pytest.fixture(scope="module")
def async_run(baseline, out):
    """The baseline's run with asynchronous checkpoints (4, 8 and 12)."""
    return run_stage("pretrain", small_cfg(out, run={"name": "async"},
                                           train={**DET, "async_checkpoint": True}))


def test_async_checkpoints_commit_and_leave_training_unchanged(async_run, baseline, out):
    summary = async_run
    for r in records(summary["run_dir"]):
        assert r["loss"] == baseline[r["step"]]["loss"], r["step"]
    saves = [e for e in events(summary["run_dir"]) if e["event"] == "checkpoint"]
    assert [e["step"] for e in saves] == [4, 8, 12] and all(e["async"] for e in saves)
    assert summary["checkpoint_blocking_s"] > 0
    for _, path in integrity.list_checkpoints(os.path.join(str(out), "async")):
        assert integrity.verify(path) == []
    # an async checkpoint restores like any other
    resumed = run_stage("pretrain", small_cfg(out, run={"name": "async-resume", "resume_from": os.path.join(
        str(out), "async", "checkpoint_0000008")}, train=DET))
    for r in records(resumed["run_dir"]):
        assert r["loss"] == baseline[r["step"]]["loss"], r["step"]


def test_damaged_checkpoints_are_skipped(async_run, baseline, out):
    # the async run's checkpoints (after the test above used them intact), damaged three ways
    name = "async"
    storage = os.path.join(str(out), name)
    ckpts = dict(integrity.list_checkpoints(storage))
    assert sorted(ckpts) == [4, 8, 12]
    os.remove(os.path.join(ckpts[12], integrity.COMMIT))          # newest: never committed
    shard = os.path.join(ckpts[8], "__1_0.distcp")
    with open(shard, "r+b") as f:                                  # truncated shard
        f.truncate(os.path.getsize(shard) // 2)
    shard = os.path.join(ckpts[4], "__0_0.distcp")
    with open(shard, "r+b") as f:                                  # flipped bytes, same size
        f.seek(100)
        b = f.read(8)
        f.seek(100)
        f.write(bytes(x ^ 0xFF for x in b))
    path, skipped = integrity.latest_valid(storage)
    assert path is None
    reasons = {s["step"]: " ".join(s["problems"]) for s in skipped}
    assert "never finished" in reasons[12]
    assert "truncated" in reasons[8] and "__1_0.distcp" in reasons[8]
    assert "corrupted" in reasons[4] and "__0_0.distcp" in reasons[4]

    # repair checkpoint 4 from a copy: now it is the newest good one, and a relaunch of
    # the run resumes there and reproduces the uninterrupted losses
    shutil.rmtree(ckpts[4])
    shutil.copytree(os.path.join(str(out), "baseline", "checkpoint_0000004"), ckpts[4])
    resumed = run_stage("pretrain", small_cfg(out, run={"name": name},
                                              train={**DET, "async_checkpoint": True}))
    ev = events(resumed["run_dir"])
    assert {e["step"] for e in ev if e["event"] == "checkpoint_skipped"} == {8, 12}
    # events.jsonl keeps every driver session: the first run's start, then this one's
    assert [e["step"] for e in ev if e["event"] == "start"] == [0, 4]
    for r in records(resumed["run_dir"]):
        assert r["loss"] == baseline[r["step"]]["loss"], r["step"]
