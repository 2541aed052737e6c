"""The parts of fault tolerance that need no cluster: checkpoint commit and verification,
divergence guards, fault specs, elastic worker bounds and config drift on resume."""
import json
import os
import shutil

import pytest

from tidal.config import ConfigError, PretrainConfig, from_dict, to_dict, validate_pretrain
from tidal.config.schema import GuardConfig, worker_bounds
from tidal.train import integrity
from tidal.train.faults import parse
from tidal.train.guards import DivergenceGuard
from tidal.train.launch import check_resume, config_drift


def _empty_dcp_metadata() -> bytes:
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata

    return pickle.dumps(Metadata(state_dict_metadata={}, storage_data={}))


_EMPTY_DCP_METADATA = _empty_dcp_metadata()


def _fake_checkpoint(run_dir, step, files, world=2, commit=True, config=None):
    """A checkpoint directory as the workers leave it: each rank writes and digests its
    files in a staging directory, then they are merged into storage (as Ray Train does)."""
    path = os.path.join(run_dir, integrity.checkpoint_name(step))
    for rank in range(world):
        staging = os.path.join(run_dir, f".stage-{step}-{rank}")
        os.makedirs(staging)
        mine = {f"__{rank}_0.distcp": files.get(rank, b"x" * (100 + rank))}
        if rank == 0:
            mine["trainer_state.json"] = json.dumps({"step": step, "config": config or {}}).encode()
            mine[".metadata"] = _EMPTY_DCP_METADATA
        for name, data in mine.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
        integrity.write_rank_manifest(staging, rank)
        shutil.copytree(staging, path, dirs_exist_ok=True)
        shutil.rmtree(staging)
    if commit:
        integrity.commit(path, world, step)
    return path


def test_commit_verify_and_damage(tmp_path):
    run = str(tmp_path)
    good = _fake_checkpoint(run, 10, {0: os.urandom(4096), 1: os.urandom(4096)})
    assert integrity.verify(good) == []
    marker = json.load(open(os.path.join(good, integrity.COMMIT)))
    assert set(marker["files"]) == {"__0_0.distcp", "__1_0.distcp", "trainer_state.json", ".metadata"}
    assert marker["world_size"] == 2 and marker["step"] == 10

    shard = os.path.join(good, "__1_0.distcp")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:  # same size, one byte flipped
        f.write(data[:7] + bytes([data[7] ^ 1]) + data[8:])
    assert integrity.verify(good, full=False) == []  # sizes alone cannot see it
    assert "corrupted" in integrity.verify(good)[0]
    with open(shard, "wb") as f:
        f.write(data[:100])
    assert "truncated" in integrity.verify(good, full=False)[0]
    os.remove(shard)
    assert integrity.verify(good) == ["__1_0.distcp: missing"]


def test_latest_valid_walks_back_and_prune_keeps_committed(tmp_path):
    run = str(tmp_path)
    _fake_checkpoint(run, 5, {})
    _fake_checkpoint(run, 10, {})
    _fake_checkpoint(run, 15, {}, commit=False)  # a save cut short
    path, skipped = integrity.latest_valid(run)
    assert path.endswith("checkpoint_0000010")
    assert skipped[0]["step"] == 15 and "never finished" in skipped[0]["problems"][0]
    _fake_checkpoint(run, 20, {})
    removed = integrity.prune(run, keep=2)
    # the unfinished 15 is older than the newest committed: gone; 5 is beyond keep=2
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint_0000005", "checkpoint_0000015"]
    assert [s for s, _ in integrity.list_checkpoints(run)] == [20, 10]


def test_ranks_that_disagree_cannot_commit(tmp_path):
    run = str(tmp_path)
    path = _fake_checkpoint(run, 1, {}, commit=False)
    with open(os.path.join(path, integrity.RANK_DIR, "rank_1.json"), "w") as f:
        json.dump({"trainer_state.json": {"bytes": 1, "sha256": "0"}}, f)
    with pytest.raises(RuntimeError, match="ranks wrote different trainer_state.json"):
        integrity.commit(path, 2, 1)
    assert not os.path.exists(os.path.join(path, integrity.COMMIT))


def test_guard_flags_non_finite_and_spikes_after_history():
    g = DivergenceGuard(GuardConfig(min_history=3, window=5, loss_spike_factor=2.0, grad_spike_factor=5.0))
    assert g.check(float("nan"), 1.0).startswith("non-finite loss")
    assert g.check(1.0, float("inf")).startswith("non-finite gradient")
    assert g.check(100.0, 1.0) is None  # no history yet: a high first loss is normal
    for loss in (3.0, 2.9, 2.8):
        assert g.check(loss, 1.0) is None
    assert "loss spike" in g.check(2.9 * 2.1, 1.0)
    assert g.check(2.9 * 1.9, 1.0) is None
    assert "gradient-norm spike" in g.check(2.7, 6.0)
    g.reset()
    assert g.check(50.0, 100.0) is None
    off = DivergenceGuard(GuardConfig(enabled=False))
    assert off.check(float("nan"), float("nan")) is None


def test_fault_specs():
    f = parse(["kill@6:1", "nan@3", "kill_in_save@8"])
    assert [(x.kind, x.step, x.rank) for x in f] == [("kill", 6, 1), ("nan", 3, 0), ("kill_in_save", 8, 0)]
    for bad in ("explode@3", "kill@", "kill@x", "nan@3:a"):
        with pytest.raises(ValueError, match="kind@step"):
            parse([bad])


def _cfg(**upd):
    base = to_dict(PretrainConfig())
    for section, values in upd.items():
        base[section].update(values)
    return validate_pretrain(from_dict(PretrainConfig, base))


def test_elastic_worker_bounds_and_batch_split():
    assert worker_bounds(2) == (2, 2) and worker_bounds("3") == (3, 3)
    assert worker_bounds("1..4") == (1, 4) and worker_bounds(" 2 .. 3 ") == (2, 3)
    for bad in ("1-3", "a..b", True, "..2"):
        with pytest.raises(ValueError):
            worker_bounds(bad)
    # 64 sequences split over 1, 2 and 4 workers, but not over 3
    _cfg(scaling={"workers": "1..2"}, train={"global_batch_tokens": 64 * 256})
    with pytest.raises(ConfigError) as e:
        _cfg(scaling={"workers": "1..3"}, train={"global_batch_tokens": 64 * 256})
    assert "cannot be split evenly over 3 workers" in str(e.value)
    assert f"a multiple of {6 * 256} tokens" in str(e.value)
    for bad in ("3..1", "0..2", "two"):
        with pytest.raises(ConfigError, match="scaling.workers"):
            _cfg(scaling={"workers": bad})
    with pytest.raises(ConfigError, match="train.inject_faults"):
        _cfg(train={"inject_faults": ["boom@1"]})
    with pytest.raises(ConfigError, match="train.guard.min_history"):
        _cfg(train={"guard": {"min_history": 80, "window": 50}})


def test_config_drift_lists_meaningful_changes():
    old = to_dict(PretrainConfig())
    new = to_dict(PretrainConfig())
    new["model"]["hidden_size"] = 512
    new["optim"]["lr"] = 1e-4
    new["scaling"]["workers"] = "1..4"          # free: elasticity
    new["train"]["stop_at_step"] = 50            # free
    new["data"]["output_dir"] = "/elsewhere"     # free: where, not what
    refused, allowed = config_drift(old, new, [])
    assert [r.split(":")[0] for r in refused] == ["model.hidden_size", "optim.lr"]
    refused, allowed = config_drift(old, new, ["optim"])
    assert [r.split(":")[0] for r in refused] == ["model.hidden_size"] and len(allowed) == 1
    refused, _ = config_drift(old, new, ["*"])
    assert "cannot be loaded" in refused[0]  # a shape change can never be resumed


def test_check_resume_reads_the_newest_committed_checkpoint(tmp_path):
    cfg = _cfg(run={"name": "r", "output_dir": str(tmp_path)})
    run = os.path.join(str(tmp_path), "r")
    assert check_resume(cfg, run) is None  # nothing yet
    old = to_dict(cfg)
    _fake_checkpoint(run, 4, {}, config=old)
    changed = _cfg(run={"name": "r", "output_dir": str(tmp_path)}, schedule={"name": "wsd"})
    with pytest.raises(ValueError, match=r"schedule.name: 'cosine' in the checkpoint -> 'wsd' now"):
        check_resume(changed, run)
    assert check_resume(cfg, run).endswith("checkpoint_0000004")
