"""`ray job submit` against a real local head (token auth, as Ray 2.60 enables by default).

The test starts its own head with `ray start --head`, submits jobs/pretrain.py with Hydra
overrides through the CLI, and stops that head (only it) at the end.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
import yaml

from tests.conftest import PYTHON, ROOT, free_port

# not `exclusive`: the head has its own ports and temp dir and stops alone, so it runs beside
# the other test process's Ray runtimes
pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = os.path.dirname(PYTHON)


def _ray(*args, env, timeout=300, check=True):
    p = subprocess.run([os.path.join(BIN, "ray"), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def head():
    import ray

    ray.shutdown()
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    _ray("get-auth-token", "--generate", env=env)
    # every port the head and its agents listen on is a free one: the job agent's HTTP port is
    # 52365 unless told otherwise, and another test process's Ray runtime may hold it (the
    # agent then never registers and every submission is refused)
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "metrics-export-port",
                                            "runtime-env-agent-port", "ray-client-server-port")}
    # --block: the head lives as long as this process and stops with it (SIGTERM), so only
    # this head goes at the end (`ray stop` would take every Ray runtime on the machine).
    # Its own temp dir: `ray start` records the head's address in <temp dir>/ray_current_cluster,
    # and a plain ray.init() anywhere on the machine joins the cluster recorded in /tmp/ray.
    temp = tempfile.mkdtemp(prefix="tidal-head-", dir="/tmp")  # short: Ray's socket paths live in it
    proc = subprocess.Popen([os.path.join(BIN, "ray"), "start", "--head", "--block", f"--temp-dir={temp}",
                             *(f"--{k}={v}" for k, v in ports.items()), "--num-cpus=4",
                             "--include-dashboard=true", "--disable-usage-stats"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_for_job_agent(env, address, proc, temp, deadline_s=180)
        yield env, address
    finally:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_job_agent(env, address: str, proc, temp: str, deadline_s: float):
    """Submissions are refused until the head is up and its job agent has registered; wait
    for it (a trivial job, no upload), with a deadline and the agent's log in the error."""
    end = time.monotonic() + deadline_s
    while True:
        assert proc.poll() is None, f"`ray start --head --block` exited with {proc.returncode}"
        p = _ray("job", "submit", "--address", address, "--", "true", env=env, check=False, timeout=120)
        if p.returncode == 0:
            return
        if time.monotonic() > end:
            logs = sorted(glob.glob(os.path.join(temp, "session_latest", "logs", "dashboard_agent*.log")))
            tail = open(logs[-1]).read()[-3000:] if logs else "(no dashboard_agent log)"
            raise AssertionError(f"the job agent did not register in {deadline_s:.0f} s:\n"
                                 f"{p.stdout[-2000:]}\n{p.stderr[-2000:]}\n{tail}")
        time.sleep(2)


def test_working_dir_upload_excludes_outputs_and_venv(head):
    env, address = head
    p = _ray("job", "submit", "--address", address, "--working-dir", ".", "--", "python", "-c",
             "import os, json; print('DIR' + 'LIST', json.dumps(sorted(os.listdir('.'))))", env=env)
    listing = json.loads(p.stdout.split("DIRLIST", 1)[1].splitlines()[0])
    assert {"jobs", "conf", "platform", "pyproject.toml"} <= set(listing)
    assert not {".venv", "outputs", "wandb"} & set(listing)


def test_submit_pretrain_with_overrides(head, tmp_path):
    env, address = head
    out = str(tmp_path / "outputs")
    p = _ray("job", "submit", "--address", address, "--working-dir", ".", "--",
             "python", "jobs/pretrain.py", "model=tiny", "optim.lr=1e-3", "train.max_steps=4",
             "schedule.warmup_steps=2", "train.eval_every=2", "train.checkpoint_every=2",
             "run.name=submitted", f"run.output_dir={out}", "logger=console",
             "logger.progress=false", env=env, timeout=500)
    assert "succeeded" in p.stdout, p.stdout[-3000:]
    run = os.path.join(out, "submitted")
    with open(os.path.join(run, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["optim"]["lr"] == 1e-3 and cfg["train"]["max_steps"] == 4
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert max(r["lr"] for r in recs) == pytest.approx(1e-3)  # the override reached the workers
    assert os.path.exists(os.path.join(run, "checkpoint_0000004", ".metadata"))
    assert os.path.exists(os.path.join(run, "hf", "model.safetensors"))
    assert "final val loss" in p.stdout


def test_submit_rlhf_with_overrides(head, tmp_path):
    """The RL graph through `ray job submit`: vLLM engine actors, learners, overrides."""
    pytest.importorskip("vllm")
    from tidal.rlhf.toy import char_model, digit_prompts

    env, address = head
    out = str(tmp_path / "outputs")
    p = _ray("job", "submit", "--address", address, "--working-dir", ".", "--",
             "python", "jobs/rlhf.py", "algorithm=rloo", f"model.pretrained={char_model(str(tmp_path / 'm'))}",
             f"data.sources=[{digit_prompts(str(tmp_path / 'p.jsonl'))}]", "data.seq_len=16",
             "reward.model=null", "reward.rules=[prefix_match]", "rollout.n=4", "rollout.max_tokens=4",
             "rollout.prompts_per_iteration=4", "rollout.kv_cache_gib=0.05", "train.max_steps=3",
             "run.name=rl-submitted", f"run.output_dir={out}", "logger=console", "logger.progress=false",
             env=env, timeout=600)
    assert "succeeded" in p.stdout, p.stdout[-3000:]
    run = os.path.join(out, "rl-submitted")
    with open(os.path.join(run, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["algorithm"]["estimator"] == "rloo" and cfg["rollout"]["n"] == 4
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if "reward_mean" in line]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["logp_gap_abs"] < 1e-3 for r in recs)
