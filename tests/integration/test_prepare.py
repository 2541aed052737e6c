"""jobs/prepare.py's pipeline on a local Ray runtime: shards, manifest, malformed input."""
import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from tidal.config import DataConfig, TokenizerConfig
from tidal.config.schema import CurationConfig, DedupConfig, FilterConfig
from tidal.data.prepare import load_manifest, prepare, tokenizer_path
from tidal.data.tokenizer import load as load_tokenizer

pytestmark = pytest.mark.integration

PARAS = [f"Paragraph {i}: " + " ".join(f"word{(i * 7 + j) % 50} and text" for j in range(30))
         for i in range(66)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text("\n\n".join(PARAS[:30]))
    with open(d / "b.jsonl", "w") as f:
        for p in PARAS[30:50]:
            f.write(json.dumps({"text": p}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"content": "no text field"}) + "\n")
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        for p in PARAS[50:60]:
            f.write(json.dumps({"text": p}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": PARAS[60:] + [None], "id": list(range(7))}), d / "d.parquet")
    (d / "bad.txt").write_bytes(b"valid start \xff\xfe invalid utf-8")
    (d / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 50)[:30])
    return d


def _cfg(corpus, **kw):
    # The synthetic paragraphs are deliberately repetitive: quality filters and dedup are
    # off here (they are tested in test_curation.py); this tests reading and packing.
    curation = CurationConfig(filters=FilterConfig(enabled=False),
                              dedup=DedupConfig(exact=False, near=False))
    return DataConfig(name="mini", sources=[str(corpus)], seq_len=32, val_fraction=0.1,
                      shard_samples=16, tokenizer=TokenizerConfig(vocab_size=300),
                      curation=curation, **kw)


def test_prepare_writes_shards_and_manifest(ray_local, corpus, tmp_path):
    out = str(tmp_path / "prepared")
    manifest = prepare(_cfg(corpus), out)
    assert load_manifest(out) == manifest
    # inputs: every file with its real sha256, sorted
    names = [os.path.basename(i["uri"]) for i in manifest["inputs"]]
    assert names == sorted(names) and {"b.jsonl", "c.jsonl.gz", "d.parquet"} <= set(names)
    for i in manifest["inputs"]:
        assert i["sha256"] == hashlib.sha256(open(i["uri"], "rb").read()).hexdigest()
    # the tokenizer was trained and saved in HF format, and its hash recorded
    tok = load_tokenizer(tokenizer_path(manifest, out))
    assert len(tok) == manifest["tokenizer"]["vocab_size"] <= 300
    assert len(manifest["tokenizer"]["sha256"]) == 64
    import tidal

    assert manifest["code"]["tidal"] == tidal.__version__ and manifest["code"]["commit"]
    assert manifest["code"]["packages"]["tokenizers"][0].isdigit()
    # malformed records are counted by reason, not fatal
    bad = manifest["counts"]["malformed"]
    assert bad["line is not JSON"] == 1
    assert bad["record has no string field 'text'"] == 2  # one jsonl record, one parquet null
    assert bad["invalid utf-8"] == 1
    assert sum(v for k, v in bad.items() if k.startswith("unreadable file")) == 1
    assert manifest["counts"]["documents"] == 66  # text + jsonl + jsonl.gz + parquet
    # shards: the files and hashes the manifest names, samples of seq_len + 1 tokens
    total = 0
    for split in ("train", "val"):
        for s in manifest["shards"][split]:
            path = os.path.join(out, s["file"])
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == s["sha256"]
            arr = np.load(path)
            assert arr.shape == (s["samples"], 33) and arr.dtype == np.uint16
            total += len(arr)
        assert manifest["counts"][split]["samples"] == sum(s["samples"] for s in manifest["shards"][split])
    assert manifest["counts"]["val"]["samples"] > 0 and total > 20
    assert len(manifest["shards"]["train"]) > 1  # shard_samples=16 splits the output
    # documents are joined with EOS, and consecutive samples overlap by one token
    first = np.load(os.path.join(out, manifest["shards"]["train"][0]["file"])).astype(np.int64)
    assert (first[:-1, -1] == first[1:, 0]).all()
    stream = np.concatenate([first[0]] + [r[1:] for r in first[1:]])
    assert (stream == tok.eos_token_id).sum() >= 1
    text = tok.decode(stream[: list(stream).index(tok.eos_token_id)])
    assert text in PARAS
    assert manifest["seq_len"] == 32 and manifest["config"]["val_fraction"] == 0.1


def test_prepare_is_deterministic(ray_local, corpus, tmp_path):
    a = prepare(_cfg(corpus), str(tmp_path / "a"))
    b = prepare(_cfg(corpus), str(tmp_path / "b"))
    assert a["shards"] == b["shards"]  # includes every shard's sha256
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]


def test_embedded_corpus_needs_no_files(ray_local, tmp_path):
    cfg = DataConfig(seq_len=256, tokenizer=TokenizerConfig(vocab_size=1024))
    m = prepare(cfg, str(tmp_path / "pydocs"))
    assert m["inputs"][0]["uri"] == "embedded:pydocs" and m["inputs"][0]["bytes"] > 900_000
    assert m["counts"]["train"]["samples"] > 500 and m["counts"]["val"]["samples"] > 10


def test_shards_of_another_data_config_are_refused(ray_local, corpus, tmp_path):
    from dataclasses import replace

    from tidal.data.ready import ensure_data

    out = str(tmp_path / "shared-out")
    cfg = replace(_cfg(corpus), output_dir=out)
    data_dir, manifest = ensure_data(cfg, str(tmp_path))
    assert data_dir == out and manifest["seq_len"] == 32
    assert ensure_data(cfg, str(tmp_path))[1] == manifest  # found, not prepared again
    with pytest.raises(ValueError, match="holds data prepared with another data config"):
        ensure_data(replace(cfg, seq_len=16), str(tmp_path))


def test_prepared_data_is_prepared_again_when_its_inputs_change(ray_local, corpus, tmp_path):
    import shutil
    from dataclasses import replace

    from tidal.data.ready import ensure_data

    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    cfg = replace(_cfg(src), output_dir=str(tmp_path / "data"))
    notes = []
    _, first = ensure_data(cfg, str(tmp_path), log=notes.append)
    os.utime(src / "a.txt")  # touched, same content: still the same data
    assert ensure_data(cfg, str(tmp_path), log=notes.append)[1] == first
    assert not any("changed since" in n for n in notes)
    (src / "a.txt").write_text("\n\n".join(PARAS[:10]))  # edited in place
    _, second = ensure_data(cfg, str(tmp_path), log=notes.append)
    changed = [n for n in notes if "changed since it was prepared" in n]
    assert len(changed) == 1 and "a.txt" in changed[0]
    a = lambda m: next(i for i in m["inputs"] if i["uri"].endswith("a.txt"))  # noqa: E731
    assert a(second)["sha256"] != a(first)["sha256"]
    assert second["counts"]["train"]["tokens"] < first["counts"]["train"]["tokens"]


def test_changed_inputs_under_a_resumed_run_are_refused_before_training(ray_local, corpus, tmp_path):
    import shutil
    from dataclasses import replace

    from tidal.data import DataError
    from tidal.data.ready import ensure_data

    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    cfg = replace(_cfg(src), output_dir=str(tmp_path / "data"))
    _, first = ensure_data(cfg, str(tmp_path))
    (src / "a.txt").write_text("\n\n".join(PARAS[:10]))
    with pytest.raises(DataError, match="changed since it was prepared, and this run resumes from ckpt"):
        ensure_data(cfg, str(tmp_path), resuming="ckpt")
    assert json.load(open(tmp_path / "data" / "manifest.json")) == first  # the old shards stay
