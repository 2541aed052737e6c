"""Sweeps with Ray Tune over the pretraining function on a real local Ray: ASHA stopping,
PBT forking from checkpoints, W&B offline runs per trial, and resuming a killed driver."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import events, needs_shakespeare, records, small_cfg
from tidal.config import SweepConfig, from_dict, to_dict
from tidal.sweep import run_sweep
from tidal.train import integrity

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_shakespeare]  # multi-minute: full suite only
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep")


def base(out, **train):
    return to_dict(small_cfg(out, scaling={"workers": 1},
                             logger={"wandb": True, "wandb_mode": "offline"},
                             train={"max_steps": 20, "eval_every": 5, **train}))


def sweep_cfg(out, name, space, scheduler, algorithm="grid", **kw):
    return from_dict(SweepConfig, {"name": name, "output_dir": str(out), "concurrency": 2,
                                   "search": {"algorithm": algorithm, "num_samples": 1, "space": space},
                                   "scheduler": scheduler, **kw})


def _wandb_records(path):
    """The protobuf records of a .wandb file (a LevelDB-style log: a 7-byte file header,
    32 KiB blocks, each record chunk behind a 7-byte crc/length/type header)."""
    import struct

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield chunks
            chunks = b""


def wandb_run(trial_dir):
    """Group, id and config of a trial's offline W&B run, read from its .wandb file."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(trial_dir, "wandb", "offline-run-*", "run-*.wandb"))[:1]
    for data in _wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in rec.run.config.update}
            return rec.run.run_group, rec.run.run_id, config
    raise AssertionError(f"no run record in {path}")


def test_asha_stops_the_worst_trials_and_reports_the_best(ray_local, out):
    # best first: the later, worse trials meet ASHA's rungs with better ones already there
    space = [{"key": "optim.lr", "type": "choice", "values": [3e-3, 1e-3, 1e-5, 1e-6]}]
    sweep = sweep_cfg(out, "asha", space, {"name": "asha", "grace_period": 5, "reduction_factor": 2})
    s = run_sweep(sweep, base(out))
    res = json.load(open(s["results_json"]))
    trials = res["trials"]
    assert len(trials) == 4 and s["failed"] == 0
    stopped = [t for t in trials if t["status"].startswith("stopped")]
    assert stopped and all(t["steps"] < 20 for t in stopped), [t["status"] for t in trials]
    # the two hopeless learning rates met the rungs after better trials: cut at step 5-ish
    assert {1e-5, 1e-6} <= {t["optim.lr"] for t in stopped}
    assert 3e-3 not in {t["optim.lr"] for t in stopped}
    # the best trial's reported loss is the minimum over every report of every trial
    every = [h["val_loss"] for t in trials for h in t["history"]]
    assert res["best"]["val_loss"] == min(every) == trials[0]["best_val_loss"]
    assert trials[0]["optim.lr"] == 3e-3 and "optim.lr=0.003" in res["best"]["reproduce"]
    assert integrity.verify(res["best"]["checkpoint"]) == []  # a committed, intact checkpoint
    for f in ("results_csv", "val_plot", "lr_plot"):
        assert os.path.getsize(s[f]) > 0
    # every trial is an offline W&B run in the sweep's group, with its own config
    for t in trials:
        run_dir = glob.glob(os.path.join(str(out), "asha", "trials", f"asha-{t['trial']}"))[0]
        group, run_id, config = wandb_run(run_dir)
        assert group == "asha" and run_id == f"asha-{t['trial']}"
        assert config["optim"]["lr"] == t["optim.lr"]
    # a stopped trial's run ended cleanly (its workers released), not killed
    for t in stopped:
        run_dir = os.path.join(str(out), "asha", "trials", f"asha-{t['trial']}")
        assert any(e["event"] == "stopped" for e in events(run_dir))


def test_pbt_exploited_trial_continues_from_the_donor_checkpoint(ray_local, out):
    space = [{"key": "optim.lr", "type": "choice", "values": [3e-3, 1e-6]},
             {"key": "schedule.min_lr_ratio", "type": "uniform", "low": 0.0, "high": 0.3}]
    # synch: the population is judged together at step 10, so the exploit always happens
    sweep = sweep_cfg(out, "pbt", space, {"name": "pbt", "perturbation_interval": 10, "synch": True,
                                          "quantile_fraction": 0.5, "resample_probability": 0.0})
    s = run_sweep(sweep, base(out))
    trials = json.load(open(s["results_json"]))["trials"]
    # runs that started from a checkpoint: a trial paused and resumed (its own checkpoint)
    # or exploited (another trial's); the latter must be there
    forks = []
    for t in trials:
        for sub in dict.fromkeys(h["run_name"] for h in t["history"] if "-from" in h["run_name"]):
            run_dir = os.path.join(str(out), "pbt", "trials", sub)
            start = [e for e in events(run_dir) if e["event"] == "start"][0]
            donor_run = start["checkpoint"].rsplit("/", 2)[-2]
            if not donor_run.startswith(f"pbt-{t['trial']}"):
                forks.append((sub, run_dir, start))
    assert forks, [[h["run_name"] for h in t["history"]] for t in trials]
    sub, run_dir, start = forks[0]
    donor_step = int(sub.split("-from")[1].split("-")[0])
    assert donor_step >= 5
    # the new run started at the donor's step, from the donor's checkpoint, not from zero
    assert start["step"] == donor_step and start["restored"]
    assert start["checkpoint"].endswith(f"checkpoint_{donor_step:07d}")
    assert records(run_dir)[0]["step"] == donor_step + 1
    # with a mutated schedule: the donor's values perturbed
    import yaml

    mine = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    donor = json.load(open(os.path.join(start["checkpoint"], "trainer_state.json")))["config"]
    assert mine["schedule"]["min_lr_ratio"] != donor["schedule"]["min_lr_ratio"]
    assert mine["optim"]["lr"] == pytest.approx(donor["optim"]["lr"]) or \
        mine["optim"]["lr"] in (3e-3, 1e-6)


DRIVER = """
import json, sys
sys.path.insert(0, {root!r})
from tests.integration.conftest import small_cfg
from tidal.config import SweepConfig, from_dict, to_dict
from tidal.sweep import run_sweep
base = to_dict(small_cfg({out!r}, scaling={{"workers": 1}}, train={{"max_steps": 20, "eval_every": 5}}))
sweep = from_dict(SweepConfig, {{"name": "resume", "output_dir": {out!r}, "concurrency": 1,
    "max_failures": 1, "search": {{"algorithm": "grid", "num_samples": 1, "space": [
        {{"key": "train.inject_faults", "type": "choice", "values": [[], ["kill@3"], ["crash@3"]]}}]}},
    "scheduler": {{"name": "fifo"}}}})
print(json.dumps(run_sweep(sweep, base), default=str))
"""


def test_a_killed_sweep_driver_resumes_and_failed_trials_are_retried_or_marked_failed(ray_local, out):
    """One sweep, one trial at a time: a clean trial; one whose worker is killed at step 3
    once (the run recovers and completes); one that crashes at step 3 on every attempt
    (retried once, then marked failed while the sweep goes on). The driver is SIGKILLed
    while the second trial is under way; relaunched, it keeps the finished trial and
    continues the interrupted one from its checkpoint."""
    import ray

    script = os.path.join(str(out), "driver.py")
    with open(script, "w") as f:
        f.write(DRIVER.format(root=ROOT, out=str(out)))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    trials = os.path.join(str(out), "resume", "trials")
    first = subprocess.Popen([sys.executable, script], cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # the first trial done and the second under way
            done = glob.glob(os.path.join(trials, "resume-*_00000", "run_card.md"))
            second = glob.glob(os.path.join(trials, "resume-*_00001", "metrics.jsonl"))
            if done and second and len(open(second[0]).readlines()) >= 6:
                break
            assert first.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.5)
        else:
            raise AssertionError("the sweep did not get to its second trial")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-sweep
        first.wait()
    (trial0,) = glob.glob(os.path.join(trials, "resume-*_00000"))
    before = os.path.getmtime(os.path.join(trial0, "metrics.jsonl"))

    p = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 3 and summary["completed"] == 2 and summary["failed"] == 1, summary
    # the finished trial was kept, not run again
    assert os.path.getmtime(os.path.join(trial0, "metrics.jsonl")) == before
    assert not glob.glob(trial0 + "-from*")
    res = json.load(open(summary["results_json"]))
    by_fault = {tuple(t["train.inject_faults"]): t for t in res["trials"]}
    assert by_fault[()]["status"] == "completed" and by_fault[()]["steps"] == 20
    # the killed worker: it did die once, then ran again, and the trial completed
    killed = by_fault[("kill@3",)]
    assert killed["status"] == "completed" and killed["steps"] == 20
    (run1,) = glob.glob(os.path.join(trials, "resume-*_00001"))
    assert glob.glob(os.path.join(run1, "faults", "*"))
    # a failure on every attempt: marked failed, and the sweep went on to its summary
    assert by_fault[("crash@3",)]["status"].startswith("failed")
    # the interrupted trial went on from a checkpoint rather than from step 0
    runs = sorted(glob.glob(os.path.join(trials, "resume-*_00001*")))
    starts = [e for r in runs for e in events(r) if e["event"] == "start"]
    assert any(e["restored"] and e["step"] > 0 for e in starts), starts


def test_optuna_proposes_trials_inside_the_space(ray_local, out):
    """Optuna's proposals stay inside the space, the optimizer among them: each trial ran
    the optimizer it drew (its run card states that optimizer's state size)."""
    space = [{"key": "optim.lr", "type": "loguniform", "low": 1e-3, "high": 5e-3},
             {"key": "schedule.name", "type": "choice", "values": ["cosine", "wsd"]},
             {"key": "schedule.decay_fraction", "type": "uniform", "low": 0.1, "high": 0.5},
             {"key": "optim.name", "type": "choice", "values": ["adamw", "lion"]}]
    sweep = from_dict(SweepConfig, {"name": "optuna", "output_dir": str(out), "concurrency": 2,
                                    "search": {"algorithm": "optuna", "num_samples": 3, "seed": 1,
                                               "space": space},
                                    "scheduler": {"name": "fifo"}})
    s = run_sweep(sweep, base(out, max_steps=10))
    trials = json.load(open(s["results_json"]))["trials"]
    assert s["completed"] == 3 and len({t["optim.lr"] for t in trials}) == 3
    state_bytes = {"adamw": "state 8 bytes", "lion": "state 4 bytes"}
    for t in trials:
        assert 1e-3 <= t["optim.lr"] <= 5e-3 and t["schedule.name"] in ("cosine", "wsd")
        assert 0.1 <= t["schedule.decay_fraction"] <= 0.5 and t["steps"] == 10
        run_dir = os.path.join(str(out), "optuna", "trials", f"optuna-{t['trial']}")
        card = open(os.path.join(run_dir, "run_card.md")).read()
        assert state_bytes[t["optim.name"]] in card, (t["optim.name"], card)
    assert {t["optim.name"] for t in trials} == {"adamw", "lion"}  # seed 1 draws both
