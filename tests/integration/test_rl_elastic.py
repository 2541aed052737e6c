"""An elastic rollout pool on a fake autoscaling cluster (see fake_cluster.py): an RL run with
``rollout.engines=1..2`` starts with the one engine node there is, takes a second engine when
the autoscaler adds a node, loses that node (its raylet and engine SIGKILLed) and carries on,
all without restarting its learner; and since every sample has its own seed, every
iteration's reward and loss equal those of a run on one fixed engine."""
import threading
import time

import pytest

from tests.integration.conftest import events, records, run_isolated
from tests.integration.fake_cluster import FakeAutoscalingCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.exclusive]
pytest.importorskip("vllm")

ITERATIONS = 200
# engines only where a node offers the "rollout" resource (worker nodes, no CPU slots), the
# learner on the head's one CPU
POOL = {"cpus_per_engine": 0, "resources": {"rollout": 1.0}}


def cfg_for(tmp_path, name, engines, stop_at=None):
    from tests.integration.test_rlhf import rl_cfg

    return rl_cfg(tmp_path, rollout={**POOL, "engines": engines}, scaling={"workers": 1},
                  train={"deterministic": True, "max_steps": ITERATIONS, "stop_at_step": stop_at,
                         "eval_every": ITERATIONS, "checkpoint_every": ITERATIONS, "export_hf": False},
                  run={"name": name})


def engine_nodes():
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name == "RolloutEngine"}


def test_rollout_pool_grows_and_shrinks_with_the_cluster(request, tmp_path, monkeypatch):
    if run_isolated(request):
        return
    import ray

    from tidal.train.launch import run_stage

    ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    result = {}
    with FakeAutoscalingCluster(worker_resources={"rollout": 1}, head_cpus=1, min_workers=1,
                                max_workers=1) as cluster:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        elastic_dir = tmp_path / "out" / "elastic"

        def run():
            try:
                result["summary"] = run_stage("rlhf", cfg_for(tmp_path, "elastic", "1..2"), log=lambda *a: None)
            except BaseException as e:  # re-raised below
                result["error"] = e

        def pool_sizes():
            try:
                return [r["engines"] for r in records(str(elastic_dir)) if "engines" in r]
            except (FileNotFoundError, ValueError):
                return []

        def wait_for(what, cond, timeout):
            end = time.time() + timeout
            while time.time() < end:
                assert trainer.is_alive(), f"the run ended while waiting for {what}: {result}"
                if cond():
                    return
                time.sleep(0.2)
            raise AssertionError(f"timed out waiting for {what}; pool sizes so far {pool_sizes()[-10:]}")

        trainer = threading.Thread(target=run, daemon=True)
        trainer.start()
        try:
            wait_for("3 iterations on one engine", lambda: pool_sizes().count(1) >= 3, 240)
            first = engine_nodes()
            cluster.set_max_workers(2)  # room for a second engine node: the pool takes it
            wait_for("2 iterations on two engines", lambda: pool_sizes().count(2) >= 2, 240)
            (victim,) = engine_nodes() - first
            grown_at = len(pool_sizes())
            cluster.kill_node(victim)
            wait_for("an iteration on one engine after the loss",
                     lambda: 1 in pool_sizes()[grown_at + 1:], 240)
            trainer.join(600)
            assert not trainer.is_alive(), "the run did not finish"
            # the reference: one fixed engine, through a few iterations past the loss (the
            # schedule is constant: stopping early changes nothing before)
            fixed = run_stage("rlhf", cfg_for(tmp_path, "fixed", 1, stop_at=grown_at + 10), log=lambda *a: None)
        finally:
            ray.shutdown()
    if "error" in result:
        raise result["error"]

    recs = [r for r in records(str(elastic_dir)) if "reward_mean" in r]
    assert [r["step"] for r in recs] == list(range(1, ITERATIONS + 1))
    sizes = [r["engines"] for r in recs]
    k = sizes.index(2)
    assert set(sizes[:k]) == {1} and 1 in sizes[k:], sizes
    ev = events(str(elastic_dir))
    assert sum(e["event"] == "start" for e in ev) == 1  # the learner never restarted
    assert any(e["event"] == "engines_joined" for e in ev)
    lost = [e for e in ev if e["event"] in ("engine_lost", "sync_retry")]
    assert lost and lost[0]["engines_lost"] == 1, lost
    # the same samples whatever the pool's size: every iteration as on one fixed engine
    base = [r for r in records(fixed["run_dir"]) if "reward_mean" in r]
    assert len(base) == grown_at + 10
    for a, b in zip(recs, base):
        assert (a["reward_mean"], a["loss"]) == (b["reward_mean"], b["loss"]), a["step"]
