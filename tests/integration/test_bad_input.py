"""Every bad input through the jobs themselves: refused with exit code 2 and a message that
names the key or the file. Config errors are refused before any Ray runtime starts (the
jobs run under a launcher that records any call of ``ray.init``); data that leaves nothing
usable, a run the cluster can never hold and a run another driver holds are refused before
any training."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import PYTHON, ROOT
from tests.integration.conftest import needs_shakespeare

JOBS = os.path.join(ROOT, "jobs")
# Runs a job as `python jobs/<job>.py args`, recording in $RAY_MARKER whether ray.init ran.
LAUNCHER = """
import os, runpy, sys
import ray
_init = ray.init
def _recorded(*a, **k):
    open(os.environ["RAY_MARKER"], "w").close()
    return _init(*a, **k)
ray.init = _recorded
job = sys.argv[1]
sys.path.insert(0, os.path.dirname(job))
sys.argv = sys.argv[1:]
runpy.run_path(job, run_name="__main__")
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny HF model with its own tokenizer (64 positions), one with an odd head size,
    one without a tokenizer, one that is not a model, and an unfinished tidal export."""
    from tidal.config import ModelConfig, TokenizerConfig
    from tidal.data.corpus import embedded_docs
    from tidal.data.tokenizer import train_bpe
    from tidal.models import build_model

    root = tmp_path_factory.mktemp("models")
    tok_dir = str(root / "tok")
    texts = [t for _, t in embedded_docs("pydocs")][:300]
    tok = train_bpe(texts, TokenizerConfig(vocab_size=300, min_frequency=1), tok_dir)
    mc = ModelConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    model = build_model(mc, len(tok), tok.eos_token_id, tok.pad_token_id, seed=0)
    out = {"tok": tok_dir, "tiny": str(root / "tiny"), "odd": str(root / "odd")}
    model.save_pretrained(out["tiny"])
    tok.save_pretrained(out["tiny"])
    shutil.copytree(out["tiny"], out["odd"])  # a model whose head dimension is 9
    conf = json.load(open(os.path.join(out["odd"], "config.json")))
    conf.update(hidden_size=18, head_dim=9)
    json.dump(conf, open(os.path.join(out["odd"], "config.json"), "w"))
    out["no_tok"] = str(root / "no_tok")
    os.makedirs(out["no_tok"])
    shutil.copy(os.path.join(out["tiny"], "config.json"), out["no_tok"])
    out["not_model"] = str(root / "not_model")
    os.makedirs(out["not_model"])
    open(os.path.join(out["not_model"], "notes.txt"), "w").write("hello")
    out["empty"] = str(root / "empty.jsonl")
    open(out["empty"], "w").close()
    out["unfinished"] = str(root / "unfinished")
    shutil.copytree(out["tiny"], out["unfinished"])
    open(os.path.join(out["unfinished"], ".tidal-partial"), "w").close()
    return out


def _run(tmp_path, job, *args, timeout=300, env=None):
    marker = str(tmp_path / "ray-started")
    env = dict(os.environ, RAY_MARKER=marker, TIDAL_OUTPUT_DIR=str(tmp_path / "outputs"), **(env or {}))
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    p = subprocess.run([PYTHON, "-c", LAUNCHER, os.path.join(JOBS, job), *args], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=timeout)
    return p, os.path.exists(marker), time.time() - t0


CONFIG_CASES = [
    # (job, overrides (<name>: a model of the fixture), what the message must say)
    ("pretrain.py", ["model.pretrained=<not_model>"], "model.pretrained: '<not_model>' holds no loadable model config"),
    ("pretrain.py", ["model.pretrained=<no_tok>"], "model.pretrained: '<no_tok>' holds no loadable tokenizer"),
    ("pretrain.py", ["data.tokenizer.path=<not_model>"], "data.tokenizer.path: '<not_model>' holds no loadable tokenizer"),
    ("pretrain.py", ["model.pretrained=<tiny>", "data.tokenizer.path=<tiny>", "data.seq_len=128"],
     "data.seq_len: 128 is longer than model.pretrained's maximum positions (64)"),
    ("pretrain.py", ["model.pretrained=<odd>", "data.tokenizer.path=<odd>", "data.seq_len=32"],
     "model.pretrained: '<odd>' holds no loadable model config (config.json): "
     "StrictDataclassClassValidationError"),
    ("pretrain.py", ["model.hidden_size=36", "model.num_heads=4", "model.num_kv_heads=4"],
     "model.hidden_size: the head dimension 36 / 4 = 9 must be even"),
    ("pretrain.py", ["model.pretrained=<tiny>", "data.seq_len=32"],
     "data.tokenizer.path: empty, so a new BPE tokenizer would be trained for a pretrained model"),
    ("pretrain.py", ["model.pretrained=<tiny>", "data.seq_len=32", "data.tokenizer.path=<tok>-other"],
     "data.tokenizer.path: directory '<tok>-other' does not exist"),
    ("pretrain.py", ["model.pretrained=<unfinished>"], "model.pretrained: '<unfinished>' is not a complete export"),
    ("sft.py", ["model.pretrained=<unfinished>"], "model.pretrained: '<unfinished>' is not a complete export"),
    ("evaluate.py", ["model_dir=<unfinished>"], "model_dir: '<unfinished>' is not a complete export"),
    ("pretrain.py", ["data.name=../escape"], "data.name: '../escape' must be letters, digits"),
    ("pretrain.py", ["run.name=/abs"], "run.name: '/abs' must be letters, digits"),
    ("pretrain.py", ["data.mixture=[{name: ../m, sources: [embedded:pydocs]}]"],
     "data.mixture[0].name: '../m' must be letters, digits"),
    ("sweep.py", ["name=../sweeps"], "name: '../sweeps' must be letters, digits"),
    ("pretrain.py", ["data.sources=[s3://AKIAXXXX:topsecret@bucket/corpus]"],
     "data.sources[0]: 's3://***@bucket/corpus' carries credentials in the URI"),
    ("pretrain.py", ["run.storage_path='gs://bucket/runs?X-Goog-Signature=abc'"],
     "run.storage_path: 'gs://bucket/runs?X-Goog-Signature=***' carries credentials"),
    ("pretrain.py", ["train.max_steps=many"], "train.max_steps: Value 'many' of type 'str' could not be converted to Integer"),
    ("pretrain.py", ["train.max_steps=[1"], "train.max_steps=[1: not a valid override"),
    ("pretrain.py", ["model=huge"], "model: 'huge' is not one of llama_125m, llama_1b, llama_8b, tiny"),
    ("pretrain.py", ["run.name=${oops:x}"], "run.name: Unsupported interpolation type oops"),
    ("pretrain.py", ["train.micro_batch_size=3"], "lower train.micro_batch_size to 2"),
    ("pretrain.py", ["train.inject_faults=[kill@3,kill@5:1,kill@7,kill@9:1]"],
     "train.inject_faults: 4 worker kill(s) need as many retries, but scaling.max_failures=3"),
    ("rlhf.py", ["model.pretrained=<tiny>", "algorithm=ppo2"],
     "algorithm: 'ppo2' is not one of dapo, dr_grpo, grpo, ppo, reinforce_pp, rloo"),
    ("rlhf.py", ["model.pretrained=<tiny>", "reward.model=null", "reward.functions=[nopkg.mod:score]"],
     "reward.functions[0]: cannot import 'nopkg.mod:score'"),
    ("rlhf.py", ["reward.model=null", "reward.rules=[prefix_match]", "rollout.n=1"], "rollout.n: must be >= 2"),
    ("rlhf.py", ["reward.model=null", "reward.rules=[no_such_rule]"], "reward.rules[0]: unknown rule 'no_such_rule'"),
    ("rlhf.py", ["reward.model=<tok>-missing"], "reward.model: directory '<tok>-missing' does not exist"),
    ("rlhf.py", ["data.sources=[<empty>]", "reward.model=null", "reward.rules=[format]"],
     "data.sources[0]: '<empty>' is empty: no records to use"),
    ("rlhf.py", ["model.pretrained=<tiny>", "reward.model=null", "reward.rules=[format]", "data.seq_len=48",
                 "rollout.max_tokens=32"],
     "rollout.max_tokens: prompts of up to data.seq_len=48 tokens plus 32 response tokens exceed model.pretrained's 64 positions"),
    ("rlhf.py", ["model.pretrained=<tiny>", "reward.model=null", "reward.rules=[format]"],
     "model.pretrained: head size 16 is not one vLLM's CPU engine runs"),
    ("rlhf.py", ["algorithm=ppo", "critic.init=reward", "reward.model=null", "reward.rules=[format]"],
     "critic.init: 'reward' needs a reward model (reward.model is null)"),
    ("rlhf.py", ["algorithm=ppo", "algorithm.lam=1.5", "reward.model=null", "reward.rules=[format]"],
     "algorithm.lam: must be in [0, 1]"),
    ("rlhf.py", ["rollout.max_staleness=-1", "reward.model=null", "reward.rules=[format]"],
     "rollout.max_staleness: must be >= 0 (0: synchronous)"),
    ("rlhf.py", ["reward.model=null", "reward.rules=[format]", "train.inject_faults=[kill_reward@3]"],
     "train.inject_faults: kill_reward kills a reward-model actor, but reward.model is null"),
    ("pretrain.py", ["train.inject_faults=[kill_engine@3]"],
     "train.inject_faults: kill_engine@3 drill rollout engines and reward actors, which only RL runs"),
    ("pretrain.py", ["train.inject_faults=[stall_sync@2]"],
     "train.inject_faults: stall_sync@2 drill rollout engines and reward actors, which only RL runs"),
    ("rlhf.py", ["algorithm=ppo", "critic.warmup_iterations=20", "reward.model=null", "reward.rules=[format]"],
     "critic.warmup_iterations: must be >= 0 and < train.max_steps (20): the policy must train"),
]


def _fill(models, text):
    for name, path in models.items():
        text = text.replace(f"<{name}>", path)
    return text


# Runs many jobs, each as `python jobs/<job>.py args` in a process of its own forked from
# this one once the modules every job imports (torch, transformers, Ray, Hydra, tidal) are
# loaded: every case still runs the job from its entrypoint in a fresh process (its own
# exit code, stdout, stderr, working directory and environment), without paying the ~5 s
# of imports 31 times over on a 2-core machine. Nothing here starts Ray or Hydra: the
# children do, exactly as `python -c LAUNCHER` would.
FORKER = """
import atexit, json, os, runpy, sys, time, traceback
import torch, transformers, ray, hydra, omegaconf  # noqa: F401 - loaded once, before forking
from transformers import AutoConfig, AutoTokenizer  # noqa: F401
sys.path.insert(0, {platform!r})
import tidal.config, tidal.stages  # noqa: F401
_init = ray.init
def _recorded(*a, **k):
    open(os.environ["RAY_MARKER"], "w").close()
    return _init(*a, **k)
ray.init = _recorded
cases = json.load(open(sys.argv[1]))
def child(case):
    out = os.open(case["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.chdir(case["cwd"])
    os.environ.clear()
    os.environ.update(case["env"])
    sys.path.insert(0, os.path.dirname(case["job"]))
    sys.argv = [case["job"], *case["args"]]
    code = 0
    try:
        runpy.run_path(case["job"], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
results, running, todo = {{}}, {{}}, list(range(len(cases)))
while todo or running:
    while todo and len(running) < 3:
        i = todo.pop(0)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(cases[i])
        running[pid] = (i, time.time())
    pid, status = os.wait()
    i, t0 = running.pop(pid)
    results[i] = [os.waitstatus_to_exitcode(status), time.time() - t0]
json.dump([results[i] for i in range(len(cases))], open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def config_results(models, tmp_path_factory):
    """Every config case run through its job, three at a time (each a fresh process)."""
    cases, root = [], tmp_path_factory.mktemp("cases")
    for i, (job, overrides, _) in enumerate(CONFIG_CASES):
        tmp = tmp_path_factory.mktemp(f"case{i}")
        env = dict(os.environ, RAY_MARKER=str(tmp / "ray-started"), TIDAL_OUTPUT_DIR=str(tmp / "outputs"))
        env.pop("RAY_ADDRESS", None)
        cases.append({"job": os.path.join(JOBS, job), "args": [_fill(models, o) for o in overrides],
                      "cwd": str(tmp), "env": env, "marker": str(tmp / "ray-started"),
                      "stdout": str(tmp / "stdout"), "stderr": str(tmp / "stderr")})
    spec, result = str(root / "cases.json"), str(root / "results.json")
    json.dump(cases, open(spec, "w"))
    p = subprocess.run([PYTHON, "-c", FORKER.format(platform=os.path.join(ROOT, "platform")), spec, result],
                       cwd=str(root), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = []
    for case, (code, seconds) in zip(cases, json.load(open(result))):
        done = subprocess.CompletedProcess(case["args"], code, open(case["stdout"]).read(),
                                           open(case["stderr"]).read())
        out.append((done, os.path.exists(case["marker"]), seconds))
    return out


@pytest.mark.parametrize("case", range(len(CONFIG_CASES)),
                         ids=[f"{c[0]}:{c[1][0][:40]}" for c in CONFIG_CASES])
def test_bad_config_is_refused_before_ray_starts(models, config_results, case):
    p, ray_started, _ = config_results[case]
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert _fill(models, CONFIG_CASES[case][2]) in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not ray_started


def test_a_run_held_by_another_driver_is_refused_at_once(tmp_path):
    """The lease: checked before any Ray work; the message names the holder and the way out."""
    held = tmp_path / "outputs" / "shared-name"
    held.mkdir(parents=True)
    (held / "LEASE.json").write_text(json.dumps({
        "host": "trainer-7", "pid": 4242, "user": "ana", "started_at": time.time() - 60,
        "heartbeat_at": time.time(), "holder": "x", "run": "shared-name"}))
    p, ray_started, seconds = _run(tmp_path, "pretrain.py", "run.name=shared-name")
    assert p.returncode == 2, p.stderr
    assert "run 'shared-name' is being run by another driver (ana@trainer-7 pid 4242" in p.stderr
    assert "run.take_over=true" in p.stderr
    assert not ray_started and not (held / "config.yaml").exists()


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.mark.integration
def test_data_with_nothing_usable_names_the_files_before_training(models, tmp_path):
    empty = _write(tmp_path / "empty.txt", b"")
    binary = _write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    p, _, _ = _run(tmp_path, "prepare.py", f"data.sources=[{empty},{binary}]", "data.name=bad")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "empty.txt" in p.stderr and "empty file" in p.stderr
    assert "image.png" in p.stderr and "binary file" in p.stderr
    assert "Traceback" not in p.stderr

    blank = _write(tmp_path / "blank.jsonl", b"".join(
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "   "}]}).encode() + b"\n" for _ in range(5)))
    p, _, _ = _run(tmp_path, "sft.py", f"model.pretrained={models['tiny']}", f"data.sources=[{blank}]",
                   "data.seq_len=64", "train.max_steps=2", "schedule.warmup_steps=1", "scaling.workers=1",
                   "run.name=sft-bad", "logger=console")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "no usable examples" in p.stderr and "blank.jsonl" in p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "outputs" / "sft-bad" / "metrics.jsonl")  # no training


@pytest.mark.integration
@pytest.mark.parametrize("overrides,expected", [
    (["scaling.workers=8", "train.micro_batch_size=4"], "the run asks for 8 worker(s) x {'CPU': 1.0} = 8 CPU; the cluster has"),
    (["scaling.use_gpu=true"], "the run asks for 2 worker(s) x {'CPU': 1.0, 'GPU': 1.0}"),
])
def test_a_run_the_cluster_can_never_hold_fails_at_once(tmp_path, overrides, expected):
    """Ray Train would wait for the workers forever; a local runtime (no autoscaler) that
    cannot hold them fails with what was asked and what exists."""
    p, ray_started, seconds = _run(tmp_path, "pretrain.py", *overrides, "run.name=toolarge",
                                   timeout=240)
    assert p.returncode == 2, p.stderr[-3000:]
    assert expected in p.stderr and "no autoscaler can add more" in p.stderr
    assert ray_started and seconds < 120


def _ray_processes_of(pid_file):
    with open(pid_file) as f:
        return json.load(f)


DRIVER = """
import json, os, sys, time
sys.path.insert(0, {platform!r})
from tidal.train.resources import init_ray
init_ray()
import psutil, ray
node = ray._private.worker._global_node
roots = [p.process.pid for v in node.all_processes.values() for p in v if p.process]
time.sleep(8)  # the agents and the first workers start
pids = set(roots)
for r in roots:
    pids.update(c.pid for c in psutil.Process(r).children(recursive=True))
json.dump(sorted(pids), open({pid_file!r}, "w"))
time.sleep(600)
"""


@pytest.mark.integration
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_killed_driver_leaves_no_ray_processes(tmp_path, sig):
    import signal

    import psutil

    pid_file = str(tmp_path / "pids.json")
    script = DRIVER.format(platform=os.path.join(ROOT, "platform"), pid_file=pid_file)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=str(tmp_path))
    deadline = time.time() + 120
    while not os.path.exists(pid_file) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
    time.sleep(0.5)
    pids = _ray_processes_of(pid_file)
    assert len(pids) >= 5  # gcs, raylet, dashboard, agents, ...
    driver.send_signal(getattr(signal, sig))
    driver.wait(60)
    left = pids
    deadline = time.time() + 60
    while left and time.time() < deadline:
        time.sleep(1)
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert left == [], [psutil.Process(p).cmdline()[:2] for p in left if psutil.pid_exists(p)]


@pytest.mark.integration
def test_a_failure_after_start_is_one_line_and_the_traceback_goes_to_the_run(tmp_path):
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "manifest.json").write_text('{"name": "pydocs", "data_key": ')  # damaged by hand
    p, ray_started, _ = _run(tmp_path, "pretrain.py", f"data.output_dir={data}", "run.name=broken")
    assert p.returncode == 1 and ray_started
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "JSONDecodeError" in lines[0], p.stderr[-2000:]
    log = tmp_path / "outputs" / "broken" / "error.log"
    assert f"(full traceback in {log})" in p.stderr
    assert "Traceback (most recent call last)" in log.read_text() and "Traceback" not in p.stderr
    assert not (tmp_path / "outputs" / "broken" / "LEASE.json").exists()  # released on failure


@pytest.mark.integration
@needs_shakespeare
def test_on_a_joined_cluster_the_run_waits_for_its_deadline_then_fails(ray_local):
    """Joined (not started here), the cluster may have an autoscaler: the run waits up to
    scaling.start_timeout_s for its workers, then fails saying what was asked and what exists."""
    from tests.integration.conftest import small_cfg
    from tidal.train.resources import ResourcesUnavailable, ensure_placeable

    cfg = small_cfg("/tmp/unused", scaling={"workers": 8, "start_timeout_s": 3},
                    train={"micro_batch_size": 2})
    notes = []
    t0 = time.time()
    with pytest.raises(ResourcesUnavailable, match=r"asks for 8 worker\(s\).*4 CPU .*not offered "
                                                   r"within scaling.start_timeout_s=3s"):
        ensure_placeable(cfg, use_gpu=False, log=notes.append)
    assert 3 <= time.time() - t0 < 30
    assert notes == []  # under 5 s: no "waiting" notice
    ensure_placeable(small_cfg("/tmp/unused", scaling={"workers": 2}), use_gpu=False)  # fits: no wait
