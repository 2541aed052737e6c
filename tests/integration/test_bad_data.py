"""Bad inputs in the pretraining pipeline (Ray Data, local runtime): counted and set aside
with a reason in the manifest, never a failed task; with nothing usable, an error before
any training that names each file and why; a set too small for a validation split is
prepared without one."""
import gzip
import json
import os

import pytest
import zstandard

from tidal.config import DataConfig, TokenizerConfig
from tidal.config.schema import CurationConfig, DedupConfig, FilterConfig
from tidal.data.inputs import changed_inputs
from tidal.data.loader import GlobalSampleLoader
from tidal.data.prepare import prepare

pytestmark = pytest.mark.integration

PARAS = [f"Paragraph {i}: " + " ".join(f"word{(i * 7 + j) % 50} and text" for j in range(30))
         for i in range(40)]
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4


def _jsonl(paras) -> bytes:
    return b"".join(json.dumps({"text": p}).encode() + b"\n" for p in paras)


def _zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _write(d, name: str, data: bytes) -> str:
    (d / name).write_bytes(data)
    return str(d / name)


def _bad_files(d) -> dict:
    """One of each kind of unusable input, and the reason it must be counted under."""
    return {
        _write(d, "corrupt.jsonl.gz", gzip.compress(_jsonl(PARAS))[:10] + bytes(range(256)) * 4):
            "unreadable file: zlib.error",
        _write(d, "corrupt.jsonl.zst", _zst(_jsonl(PARAS))[:20] + b"x" * 50):
            "unreadable file: ",  # truncated or corrupt, as the bytes fall
        _write(d, "deep.json", b"[" * 100_000): "JSON nested too deeply",
        _write(d, "empty.txt", b""): "empty file",
        _write(d, "image.png", PNG): "binary file (not UTF-8 text)",
    }


def _cfg(sources, **kw):
    # filters and dedup off: the synthetic paragraphs are repetitive (as in test_prepare.py)
    curation = CurationConfig(filters=FilterConfig(enabled=False),
                              dedup=DedupConfig(exact=False, near=False))
    kw.setdefault("val_fraction", 0.1)
    kw.setdefault("shard_samples", 16)
    return DataConfig(name="bad", sources=sources, seq_len=32, curation=curation,
                      tokenizer=TokenizerConfig(vocab_size=300), **kw)


def test_bad_inputs_are_set_aside_and_the_rest_prepared(ray_local, tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    _bad_files(d)
    (d / "a.txt").write_text("\n\n".join(PARAS[:20]))
    deep_line = b'{"a":' * 100_000 + b"\n"
    _write(d, "b.jsonl", _jsonl(PARAS[20:25]) + deep_line + _jsonl(PARAS[25:30]))
    _write(d, "c.jsonl.zst", _zst(_jsonl(PARAS[30:])))
    cfg = _cfg([str(d)])
    m = prepare(cfg, str(tmp_path / "out"), show_progress=False)
    assert m["counts"]["malformed"] == {"unreadable file": 2, "JSON nested too deeply": 2,
                                        "empty file": 1, "binary file (not UTF-8 text)": 1}
    assert m["counts"]["documents"] == 40  # every paragraph of the text, jsonl and zstd files
    assert {os.path.basename(e["source"]) for e in m["counts"]["malformed_examples"]} >= {
        "corrupt.jsonl.gz", "corrupt.jsonl.zst", "deep.json", "empty.txt", "image.png"}
    assert all(i["mtime_ns"] and i["bytes"] == os.path.getsize(i["uri"]) for i in m["inputs"])
    assert changed_inputs(m, cfg) == []


def test_nothing_usable_names_each_file_and_reason(ray_local, tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    bad = _bad_files(d)
    with pytest.raises(ValueError, match="curation kept none of 5 records") as e:
        prepare(_cfg([str(d)]), str(tmp_path / "out"), show_progress=False)
    msg = str(e.value)
    for path, reason in bad.items():
        assert f"  {path}: {reason}" in msg, msg


def test_too_little_text_for_a_val_split_is_prepared_without_one(ray_local, tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(PARAS[:3]))
    # every sample is written as soon as it is packed (shard_samples=1), so none is left to
    # move to validation, and no document falls in the (tiny) validation fraction
    out = str(tmp_path / "out")
    m = prepare(_cfg([str(d)], val_fraction=1e-9, shard_samples=1), out, show_progress=False)
    assert m["shards"]["val"] == [] and m["counts"]["val"]["samples"] == 0
    assert m["counts"]["train"]["samples"] > 1
    loader = GlobalSampleLoader(out, m, seed=0, global_batch=2)
    assert len(loader.val) == 0 and list(loader.val_batches(8, 0, 1, 1)) == []
