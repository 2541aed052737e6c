"""Reading sources from and writing prepared data to s3:// through pyarrow's S3 filesystem.

The S3 endpoint is moto's server on 127.0.0.1 (a local stand-in for the cloud service,
which cannot be reached here), selected with the standard AWS_ENDPOINT_URL variable.
"""
import gzip
import hashlib
import json
import os
import socket

import numpy as np
import pytest

pytestmark = pytest.mark.integration
moto_server = pytest.importorskip("moto.server", reason="moto[server] (dev extra) not installed")

# The synthetic documents are repetitive on purpose; curation is tested elsewhere.
DOCS = [f"Document {i}. " + " ".join(f"token{(i * 13 + j) % 40}" for j in range(60)) for i in range(40)]


def _off():
    from tidal.config.schema import CurationConfig, DedupConfig, FilterConfig

    return CurationConfig(filters=FilterConfig(enabled=False), dedup=DedupConfig(exact=False, near=False))


OFF = _off()


@pytest.fixture(scope="module")
def s3_ray():
    import pyarrow.fs as pafs
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init, so Ray Data's workers inherit it
    fs, _ = pafs.FileSystem.from_uri("s3://tidal-test?allow_bucket_creation=true")  # AWS_ENDPOINT_URL
    fs.create_dir("tidal-test")
    with fs.open_output_stream("tidal-test/corpus/a.txt", compression=None) as f:
        f.write("\n\n".join(DOCS[:20]).encode())
    with fs.open_output_stream("tidal-test/corpus/b.jsonl.gz", compression=None) as f:
        f.write(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS[20:]).encode()))
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield fs
    ray.shutdown()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_prepare_from_and_to_s3(s3_ray):
    from tidal.config import DataConfig, TokenizerConfig
    from tidal.data.loader import GlobalSampleLoader
    from tidal.data.prepare import load_manifest, prepare, tokenizer_path
    from tidal.data.tokenizer import load

    import pyarrow.fs as pafs

    fs = s3_ray
    cfg = DataConfig(name="s3", sources=["s3://tidal-test/corpus/"], seq_len=32, val_fraction=0.1,
                     output_dir="s3://tidal-test/prepared", tokenizer=TokenizerConfig(vocab_size=300),
                     curation=OFF)
    manifest = prepare(cfg, cfg.output_dir)
    assert load_manifest("s3://tidal-test/prepared") == manifest
    assert [i["uri"] for i in manifest["inputs"]] == ["s3://tidal-test/corpus/a.txt",
                                                     "s3://tidal-test/corpus/b.jsonl.gz"]
    with fs.open_input_stream("tidal-test/corpus/b.jsonl.gz", compression=None) as f:
        assert manifest["inputs"][1]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert manifest["counts"]["documents"] == 40 and manifest["tokenizer"]["path"] == "tokenizer"
    listing = {os.path.basename(i.path) for i in fs.get_file_info(
        pafs.FileSelector("tidal-test/prepared", recursive=True))}
    assert {"manifest.json", "train_00000.npy", "tokenizer.json"} <= listing
    # Training reads the shards straight from S3, and the tokenizer comes down to a local cache.
    tok = load(tokenizer_path(manifest, cfg.output_dir))
    loader = GlobalSampleLoader(cfg.output_dir, manifest, seed=0, global_batch=4)
    batch = loader.rank_batch(0, 0, 1)
    assert batch.shape == (4, 33)
    text = tok.decode(np.concatenate([batch[0]]))
    assert "token" in text


def test_training_with_checkpoints_and_export_on_s3(s3_ray, tmp_path):
    """Ray Train's storage (checkpoints) and the HF export on s3://, data read from s3://."""
    import pyarrow.fs as pafs
    from transformers import AutoModelForCausalLM

    from tests.integration.conftest import small_cfg
    from tidal.data import io as tio
    from tidal.train.launch import run_stage

    fs = s3_ray
    cfg = small_cfg(tmp_path, run={"name": "s3run", "storage_path": "s3://tidal-test/runs"},
                    data={"name": "s3", "sources": ["s3://tidal-test/corpus/"], "seq_len": 32,
                          "output_dir": "s3://tidal-test/prepared-train",
                          "tokenizer": {"vocab_size": 300},
                          "curation": {"filters": {"enabled": False},
                                       "dedup": {"exact": False, "near": False}}},
                    train={"max_steps": 4, "global_batch_tokens": 512, "checkpoint_every": 2,
                           "eval_every": 2},
                    schedule={"warmup_steps": 1})
    summary = run_stage("pretrain", cfg)
    assert summary["checkpoint"] == "tidal-test/runs/s3run/checkpoint_0000004" or \
        summary["checkpoint"].endswith("s3run/checkpoint_0000004")
    names = {i.path for i in fs.get_file_info(pafs.FileSelector("tidal-test/runs/s3run", recursive=True))}
    for step in ("0000002", "0000004"):
        assert f"tidal-test/runs/s3run/checkpoint_{step}/.metadata" in names
        assert f"tidal-test/runs/s3run/checkpoint_{step}/__1_0.distcp" in names
    assert summary["hf_export"] == "s3://tidal-test/runs/s3run/hf"
    model = AutoModelForCausalLM.from_pretrained(tio.local_dir(summary["hf_export"]), local_files_only=True)
    assert model.config.vocab_size <= 300
    # published whole: every file under its completion marker, no sentinel or staging left
    from tidal.train import publish

    assert publish.export_problems(summary["hf_export"], full=True) == []
    assert "tidal-test/runs/s3run/hf/tidal_export.json" in names
    assert not any(publish.PARTIAL in n or publish.TMP in n for n in names)
    assert not any(n.startswith("tidal-test/runs/s3run/LEASE.json") for n in names)  # released

    # a foreign prefix is refused as an export destination; a second export replaces the first
    fs.create_dir("tidal-test/theirs")
    with fs.open_output_stream("tidal-test/theirs/notes.txt") as f:
        f.write(b"keep me")
    ckpt = "s3://tidal-test/runs/s3run/checkpoint_0000004"
    from tidal.train.export import export_checkpoint

    with pytest.raises(publish.ExportRefused, match="files tidal did not export"):
        export_checkpoint(ckpt, "s3://tidal-test/theirs")
    assert tio.read_bytes("s3://tidal-test/theirs/notes.txt") == b"keep me"
    export_checkpoint(ckpt, summary["hf_export"])
    assert publish.export_problems(summary["hf_export"], full=True) == []
