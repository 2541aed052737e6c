"""The defaults keep the promise: `jobs/pretrain.py` with the default presets and nothing
but a kill drill recovers with the same losses as an uninterrupted run; a driver killed
outright leaves its events and a torn metrics line behind, and the next launch of the same
run takes the run over, skips (and keeps) the torn line and finishes."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tidal.tracking.sinks import read_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]
JOB = os.path.join(ROOT, "jobs", "pretrain.py")


def _env(out):
    env = dict(os.environ, TIDAL_OUTPUT_DIR=str(out), WANDB_MODE="offline")
    env.pop("RAY_ADDRESS", None)
    return env


def _job(out, *args, timeout=900):
    p = subprocess.run([sys.executable, JOB, *args], cwd=ROOT, env=_env(out), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _losses(out, name):
    recs, bad = read_jsonl(os.path.join(str(out), name, "metrics.jsonl"))
    assert not bad
    return {r["step"]: r["loss"] for r in recs}


def test_default_preset_kill_drill_and_a_killed_driver(tmp_path):
    out = tmp_path
    # stop_at_step only shortens the run (the schedule stays the 200-step one)
    plain = _job(out, "run.name=plain", "train.stop_at_step=12")
    assert "step 10/200  loss" in plain.stdout and "eta" in plain.stdout  # plain progress lines
    base = _losses(out, "plain")
    assert sorted(base) == list(range(1, 13))

    _job(out, "run.name=drill", "train.stop_at_step=12", "train.inject_faults=[kill@6:0]")
    drill = _losses(out, "drill")
    assert drill == base  # every step once, bit-identical losses
    events, _ = read_jsonl(os.path.join(str(out), "drill", "events.jsonl"))
    assert [e["step"] for e in events if e["event"] == "start"] == [0, 0]  # restarted, recovered

    # a driver killed outright mid-run, after a torn line was left in metrics.jsonl
    metrics = os.path.join(str(out), "drill", "metrics.jsonl")
    with open(metrics, "a") as f:
        f.write('{"step": 13, "loss": 4.')
    driver = subprocess.Popen([sys.executable, JOB, "run.name=drill", "train.stop_at_step=30"],
                              cwd=ROOT, env=_env(out), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None:
        recs, _ = read_jsonl(metrics)
        if any(r.get("step") == 14 for r in recs):
            break
        time.sleep(0.5)
    assert driver.poll() is None, driver.stdout.read()[-3000:]
    first_session = driver.stdout  # its "undecodable line" notice
    driver.send_signal(signal.SIGKILL)
    driver.wait(60)
    said = first_session.read()
    assert "1 undecodable line(s) skipped" in said

    final = _job(out, "run.name=drill", "train.stop_at_step=18")
    assert "took over run 'drill'" in final.stdout + final.stderr  # the killed driver's lease
    recs, bad = read_jsonl(metrics)
    assert bad == [] and [r["step"] for r in recs] == list(range(1, 19))
    for step in range(1, 13):
        assert recs[step - 1]["loss"] == base[step]
    with open(metrics + ".undecodable") as f:
        assert f.read() == '{"step": 13, "loss": 4.\n'  # kept, not dropped
    events, bad = read_jsonl(os.path.join(str(out), "drill", "events.jsonl"))
    starts = [e["step"] for e in events if e["event"] == "start"]
    # both drill attempts, the killed driver's session (from the step-12 checkpoint), the last
    assert starts == [0, 0, 12, 12], starts
    assert any(e["event"] == "checkpoint" and e["step"] == 18 for e in events)
    assert not os.path.exists(os.path.join(str(out), "drill", "LEASE.json"))  # released at the end
