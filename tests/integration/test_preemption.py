"""Preemption: when Ray is told a node hosting training workers is being drained (what the
autoscaler does when a spot instance is reclaimed), the workers checkpoint at once.

A two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and one
worker node, real raylets) stands in for a cloud cluster; the drain request goes through
the same GCS call the autoscaler makes, with reason PREEMPTION and a deadline.
"""
import json
import os
import threading
import time

import pytest

from tests.integration.conftest import needs_shakespeare, small_cfg
from tidal.train import integrity
from tidal.train.launch import run_pretrain

pytestmark = [pytest.mark.integration, needs_shakespeare]


@pytest.fixture()
def two_nodes(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def _steps(path):
    try:
        with open(path) as f:
            return [json.loads(line)["step"] for line in f]
    except (FileNotFoundError, ValueError):
        return []


def test_drain_notice_triggers_an_immediate_checkpoint(two_nodes, tmp_path):
    import ray
    from ray.core.generated import autoscaler_pb2

    cluster, worker = two_nodes
    cfg = small_cfg(tmp_path, run={"name": "spot"},
                    scaling={"workers": 2, "preemption_check_every": 1},
                    train={"max_steps": 40, "checkpoint_every": 100, "eval_every": 100})
    drained = {}

    def drain_when_training():
        metrics = os.path.join(str(tmp_path), "spot", "metrics.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline and max(_steps(metrics), default=0) < 5:
            time.sleep(0.2)
        gcs = ray._raylet.GcsClient(address=cluster.gcs_address)
        drained["after_step"] = max(_steps(metrics), default=0)
        drained["accepted"], _ = gcs.drain_node(
            worker.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "spot instance reclaimed (drill)", int((time.time() + 600) * 1000))

    t = threading.Thread(target=drain_when_training, daemon=True)
    t.start()
    summary = run_pretrain(cfg)
    t.join(timeout=5)
    assert drained.get("accepted"), drained
    with open(os.path.join(summary["run_dir"], "events.jsonl")) as f:
        events = [json.loads(line) for line in f]
    notices = [e for e in events if e["event"] == "preemption"]
    assert notices, "no preemption notice reached the workers"
    step = notices[0]["step"]
    assert drained["after_step"] <= step < 40  # promptly, long before the scheduled save
    assert worker.node_id in notices[0]["nodes"]
    saves = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert step in saves and 40 in saves
    path = os.path.join(str(tmp_path), "spot", integrity.checkpoint_name(step))
    assert integrity.verify(path) == []
