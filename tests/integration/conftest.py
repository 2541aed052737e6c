import copy
import json
import os

import pytest

from tests.conftest import SHARED_DATA
from tidal.config import PretrainConfig, from_dict, to_dict, validate_pretrain

SHAKESPEARE = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")
needs_shakespeare = pytest.mark.skipif(not os.path.exists(SHAKESPEARE),
                                       reason=f"shared data not found at {SHAKESPEARE}")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _merge(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def small_cfg(output_dir, **upd) -> PretrainConfig:
    """The tiny model on Shakespeare, sized for a 2-core CI machine."""
    base = to_dict(PretrainConfig())
    _merge(base, {
        "model": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 344},
        "data": {"name": "tinyshakespeare", "sources": [SHAKESPEARE], "seq_len": 128,
                 "tokenizer": {"vocab_size": 2048}},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 5},
        "scaling": {"workers": 2},
        "logger": {"wandb": False, "wandb_mode": "disabled", "progress": False},
        "train": {"max_steps": 10, "global_batch_tokens": 2048, "micro_batch_size": 4,
                  "eval_every": 5, "eval_batches": 1, "checkpoint_every": 5},
        "run": {"name": "run", "output_dir": str(output_dir)},
    })
    _merge(base, copy.deepcopy(upd))
    return validate_pretrain(from_dict(PretrainConfig, base))


_TINY_BASE: dict = {}


def tiny_base_model(tmp_path_factory) -> str:
    """The tiny model pretrained on Shakespeare (small_cfg, 10 steps) that the post-training
    tests start from: its HF export. Trained once per test session, by the first module that
    asks (its Ray runtime must be up: ray_local), and shared by the later ones, which only
    read it. The Shakespeare data it prepared is under ``<export>/../../data``."""
    if "hf" in _TINY_BASE:
        return _TINY_BASE["hf"]
    import contextlib

    from tests.conftest import shared_once
    from tidal.train.launch import run_stage

    lock, shared = shared_once("tiny_base")  # with two test processes, one trains it
    with lock or contextlib.nullcontext():
        if shared is not None and os.path.exists(shared):
            _TINY_BASE["hf"] = open(shared).read()
            return _TINY_BASE["hf"]
        out = tmp_path_factory.mktemp("tiny_base")
        _TINY_BASE["hf"] = run_stage("pretrain", small_cfg(out, run={"name": "base"},
                                                           train={"max_steps": 10}))["hf_export"]
        if shared is not None:
            with open(shared, "w") as f:
                f.write(_TINY_BASE["hf"])
    return _TINY_BASE["hf"]


def records(run_dir):
    """A run's per-step metrics (metrics.jsonl), one dict per step."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def events(run_dir):
    """A run's events (events.jsonl): starts, checkpoints, rollbacks, preemption notices."""
    with open(os.path.join(run_dir, "events.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_isolated(request, timeout: int = 1500) -> bool:
    """Run the calling test again, alone, in a fresh Python process, and report its result
    here; returns True in this (parent) process, which then skips the body. Tests that
    start their own Ray clusters use it: Ray Data and Ray Train keep per-process state
    (stats actors, cluster discovery) that an earlier test's runtime must not leak into."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    if os.environ.get("TIDAL_ISOLATED") == request.node.nodeid:
        return False
    env = dict(os.environ, TIDAL_ISOLATED=request.node.nodeid)
    for leaked in ("RAY_ADDRESS", "RAY_AUTH_MODE", "PYTHONBREAKPOINT"):  # set by ray.init here
        env.pop(leaked, None)
    for xdist in [k for k in env if k.startswith("PYTEST_XDIST_")]:  # one process, no session locks
        env.pop(xdist)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                        request.node.nodeid], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, (p.stdout[-8000:] + "\n" + p.stderr[-4000:])
    return True
