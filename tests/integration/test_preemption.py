"""Preemption: when Ray is told a node hosting training workers is being drained (what the
autoscaler does when a spot instance is reclaimed), the workers checkpoint at once.

A two-node Ray cluster on this machine (a head and one worker node, real raylets) stands
in for a cloud cluster; the drain request goes through
the same GCS call the autoscaler makes, with reason PREEMPTION and a deadline.
"""
import json
import os
import threading
import time

import pytest

from tests.integration.conftest import needs_shakespeare, run_isolated, small_cfg
from tidal.train import integrity
from tidal.train.launch import run_stage

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.exclusive, needs_shakespeare]  # multi-minute: full suite only


@pytest.fixture()
def two_nodes(request, monkeypatch):
    """A private head (no CPUs: it trains nothing) and one worker node with 2 CPUs, both
    real raylets started with ``ray start`` (see fake_cluster.py)."""
    import ray

    from tests.integration.fake_cluster import FakeAutoscalingCluster

    if os.environ.get("TIDAL_ISOLATED") != request.node.nodeid:
        yield None  # the test re-runs itself in a fresh process (run_isolated)
        return
    ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with FakeAutoscalingCluster(worker_resources={"CPU": 2}, head_cpus=0, min_workers=1,
                                max_workers=1, coordinator_tick_s=None) as cluster:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        ray.init(address=cluster.address, logging_level="WARNING")
        try:
            worker = cluster.worker_nodes()[0]["NodeID"]
            yield cluster, worker
        finally:
            ray.shutdown()


def _steps(path):
    try:
        with open(path) as f:
            return [json.loads(line)["step"] for line in f]
    except (FileNotFoundError, ValueError):
        return []


def test_drain_notice_triggers_an_immediate_checkpoint(request, two_nodes, tmp_path):
    if run_isolated(request):
        return
    import ray
    from ray.core.generated import autoscaler_pb2

    cluster, worker_id = two_nodes
    cfg = small_cfg(tmp_path, run={"name": "spot"},
                    scaling={"workers": 2, "preemption_check_every": 1},
                    train={"max_steps": 40, "checkpoint_every": 100, "eval_every": 100})
    drained = {}

    def drain_when_training():
        metrics = os.path.join(str(tmp_path), "spot", "metrics.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline and max(_steps(metrics), default=0) < 5:
            time.sleep(0.2)
        gcs = ray._raylet.GcsClient(address=cluster.address)
        drained["after_step"] = max(_steps(metrics), default=0)
        drained["accepted"], _ = gcs.drain_node(
            worker_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "spot instance reclaimed (drill)", int((time.time() + 600) * 1000))

    t = threading.Thread(target=drain_when_training, daemon=True)
    t.start()
    summary = run_stage("pretrain", cfg)
    t.join(timeout=5)
    assert drained.get("accepted"), drained
    with open(os.path.join(summary["run_dir"], "events.jsonl")) as f:
        events = [json.loads(line) for line in f]
    notices = [e for e in events if e["event"] == "preemption"]
    assert notices, "no preemption notice reached the workers"
    step = notices[0]["step"]
    assert drained["after_step"] <= step < 40  # promptly, long before the scheduled save
    assert worker_id in notices[0]["nodes"]
    saves = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert step in saves and 40 in saves
    path = os.path.join(str(tmp_path), "spot", integrity.checkpoint_name(step))
    assert integrity.verify(path) == []
