"""Checkpoints are data, never code: a crafted checkpoint cannot run anything when a run
resumes from it or when it is exported, and with a key set only signed checkpoints load."""
import json
import os
import pickle
import subprocess

import pytest
import torch

from tests.conftest import PYTHON, ROOT
from tidal.config import PretrainConfig, from_dict
from tidal.train import checkpoint as ckpt
from tidal.train import integrity
from tidal.train.engine import build_engine
from tidal.train.safe_dcp import UnsafeCheckpointError

TINY = {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                  "intermediate_size": 64}, "data": {"seq_len": 16},
        "train": {"global_batch_tokens": 64, "micro_batch_size": 4},
        "scaling": {"workers": 1, "precision": "fp32"}}


pytestmark = pytest.mark.usefixtures("single_rank_group")


def _engine():
    cfg = from_dict(PretrainConfig, TINY)
    return build_engine(cfg, 300, 0, 0, rank=0, world=1, device=torch.device("cpu"))


def _checkpoint(path, engine=None):
    """A real single-worker tidal checkpoint: DCP shards, state, RNG, commit record."""
    engine = engine or _engine()
    engine.step = 3
    ckpt.save(engine, path, {"config": {}}, states={"source": {"cursor": 12, "skipped": []}})
    integrity.write_rank_manifest(path, 0)
    integrity.commit(path, 1, 3)
    return engine


class _Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _tamper_metadata(path, target, recommit=True):
    meta_file = os.path.join(path, ".metadata")
    with open(meta_file, "rb") as f:
        meta = pickle.load(f)  # the test's own, freshly written file
    meta.planner_data = _Payload(target)
    with open(meta_file, "wb") as f:
        pickle.dump(meta, f)
    if recommit:  # whoever can write the storage can rewrite an unsigned record too
        os.remove(os.path.join(path, integrity.COMMIT))
        os.remove(os.path.join(path, integrity.RANK_DIR, "rank_0.json"))
        integrity.write_rank_manifest(path, 0)
        integrity.commit(path, 1, 3)


def test_real_checkpoint_round_trips(tmp_path):
    path = str(tmp_path / "checkpoint_0000003")
    engine = _checkpoint(path)
    assert integrity.verify(path) == []
    other = _engine()
    with torch.no_grad():
        for p in other.model.parameters():
            p.zero_()
    state = ckpt.load(other, path)
    assert state["step"] == 3 and state["states"]["source"]["cursor"] == 12
    for a, b in zip(engine.model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(a, b)


def test_crafted_metadata_is_refused_on_resume_and_export(tmp_path):
    path = str(tmp_path / "run" / "checkpoint_0000003")
    _checkpoint(path)
    target = str(tmp_path / "code-ran")
    _tamper_metadata(path, target)
    # the record was rewritten, every digest matches: the metadata check itself refuses it,
    # so a resume skips it like a damaged checkpoint instead of retrying it
    assert integrity.verify(path, full=False) == []
    assert "refused to load 'io.open'" in integrity.verify(path)[0]
    with pytest.raises(UnsafeCheckpointError, match="refused to load 'io.open'"):
        ckpt.load(_engine(), path)
    assert not os.path.exists(target)

    out = subprocess.run([PYTHON, os.path.join(ROOT, "jobs", "export.py"), f"checkpoint={path}",
                          f"output={tmp_path / 'hf'}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "refused to load 'io.open'" in out.stderr and "Traceback" not in out.stderr
    assert not os.path.exists(target) and not os.path.exists(tmp_path / "hf")


def test_crafted_optimizer_entry_is_refused(tmp_path):
    """Non-tensor entries (optimizer param groups) load with weights_only: an object
    smuggled into one is refused, not constructed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    engine = _engine()
    path = str(tmp_path / "checkpoint_0000003")
    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
    target = str(tmp_path / "code-ran")
    optim_sd["param_groups"][0]["lr"] = _Payload(target)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, no_dist=True)
    assert not os.path.exists(target)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"step": 3, "cursor": 0, "tokens_seen": 0}, f)
    with pytest.raises(UnsafeCheckpointError, match="param_groups.0.lr.*'io.open'"):
        ckpt.load(_engine(), path)
    assert not os.path.exists(target)


def test_signed_checkpoints(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_0000003")
    monkeypatch.setenv(integrity.KEY_ENV, "s3cret")
    _checkpoint(path)
    marker = json.load(open(os.path.join(path, integrity.COMMIT)))
    assert marker["signature"]["alg"] == "hmac-sha256"
    assert integrity.verify(path) == []

    monkeypatch.setenv(integrity.KEY_ENV, "another")
    assert "signature does not match" in integrity.verify(path)[0]
    monkeypatch.setenv(integrity.KEY_ENV, "s3cret")

    # a rewritten record without the key: unsigned, refused even though every digest matches
    target = str(tmp_path / "code-ran")
    monkeypatch.delenv(integrity.KEY_ENV)
    _tamper_metadata(path, target)
    monkeypatch.setenv(integrity.KEY_ENV, "s3cret")
    assert "not signed" in integrity.verify(path)[0]
    with pytest.raises(ValueError, match="not signed"):
        integrity.require_valid(path)

    # the new digests under the old signature: the signature no longer matches the record
    forged = dict(marker, files=json.load(open(os.path.join(path, integrity.COMMIT)))["files"])
    with open(os.path.join(path, integrity.COMMIT), "w") as f:
        json.dump(forged, f)
    assert "signature does not match" in integrity.verify(path)[0]
    assert not os.path.exists(target)


def test_commit_record_must_cover_what_is_loaded(tmp_path):
    path = str(tmp_path / "checkpoint_0000003")
    _checkpoint(path)
    marker = json.load(open(os.path.join(path, integrity.COMMIT)))
    del marker["files"][".metadata"]
    marker["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    with open(os.path.join(path, integrity.COMMIT), "w") as f:
        json.dump(marker, f)
    problems = integrity.verify(path)
    assert any("does not cover .metadata" in p for p in problems)
    assert any("not a path inside the checkpoint" in p for p in problems)


def test_export_job_refuses_a_foreign_output_and_changes_nothing(tmp_path):
    path = str(tmp_path / "run" / "checkpoint_0000003")
    _checkpoint(path)
    outputs = tmp_path / "outputs"
    (outputs / "other-run").mkdir(parents=True)
    (outputs / "other-run" / "metrics.jsonl").write_bytes(b'{"step": 1}\n')
    before = {p: open(os.path.join(outputs, p), "rb").read() for p in ["other-run/metrics.jsonl"]}
    out = subprocess.run([PYTHON, os.path.join(ROOT, "jobs", "export.py"), f"checkpoint={path}",
                          f"output={outputs}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "not a tidal export" in out.stderr and "overwrite=true" in out.stderr
    assert sorted(os.listdir(outputs)) == ["other-run"]
    assert {p: open(os.path.join(outputs, p), "rb").read() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["outputs", "run"]


def test_metadata_cannot_point_outside_the_checkpoint(tmp_path):
    """DCP joins each entry's relative path onto the checkpoint directory: a crafted one
    could read any file on the node into the model. Only the checkpoint's own shards pass."""
    path = str(tmp_path / "checkpoint_0000003")
    _checkpoint(path)
    secret = tmp_path / "secret.distcp"
    secret.write_bytes(b"x" * 64)
    meta_file = os.path.join(path, ".metadata")
    good = pickle.load(open(meta_file, "rb"))
    for bad in ("../secret.distcp", str(secret), "/dev/zero"):
        meta = pickle.load(open(meta_file, "rb"))
        for key, info in meta.storage_data.items():
            meta.storage_data[key] = type(info)(relative_path=bad, offset=info.offset, length=info.length,
                                                transform_descriptors=info.transform_descriptors)
        pickle.dump(meta, open(meta_file, "wb"))
        with pytest.raises(UnsafeCheckpointError, match="only the checkpoint's own"):
            ckpt.load(_engine(), path)
    pickle.dump(good, open(meta_file, "wb"))
    ckpt.load(_engine(), path)  # the original still loads


def test_a_signed_checkpoint_is_bound_to_its_run_and_step(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv(integrity.KEY_ENV, "s3cret")
    path = str(tmp_path / "run-a" / "checkpoint_0000003")
    _checkpoint(path)
    assert integrity.verify(path) == []
    for elsewhere in (tmp_path / "run-b" / "checkpoint_0000003", tmp_path / "run-a" / "checkpoint_0000009"):
        shutil.copytree(path, elsewhere)
        assert "a signed checkpoint is bound to its run and step" in integrity.verify(str(elsewhere))[0]
        assert integrity.verify(str(elsewhere), copy=True) == []  # a download of a verified one
