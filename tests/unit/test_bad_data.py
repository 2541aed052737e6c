"""Bad inputs are counted and set aside with a reason, never a crash of the whole job:
damaged compressed files, JSON nested past the parser's limit, empty and binary files,
records the chat template cannot encode, sets too small for a validation split; stale
inputs are found before prepared shards are reused. No Ray here: the readers are the
functions Ray Data's tasks run (see tests/integration/test_bad_data.py for the pipeline)."""
import gzip
import json
import os

import numpy as np
import pytest
import zstandard

from tidal.config import TokenizerConfig
from tidal.config.schema import DataConfig, PairDataConfig, SFTDataConfig, SourceConfig
from tidal.data import sft
from tidal.data.inputs import changed_inputs
from tidal.data.loader import GlobalSampleLoader
from tidal.data.pairs import prepare_pairs
from tidal.data.prepare import manifest_hash
from tidal.data.sources import read_file

RECORDS = [json.dumps({"text": f"record {i}", "instruction": f"Name king {i}.",
                      "output": f"Richard the {i}th."}).encode() + b"\n" for i in range(40)]
LINES = b"".join(RECORDS)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4


def _zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _corrupt_gz() -> bytes:
    """A valid gzip header, then a deflate stream with a broken block (zlib.error)."""
    good = gzip.compress(LINES, mtime=0)
    return good[:10] + bytes(range(256)) * 4


DAMAGED = {
    "corrupt.jsonl.gz": _corrupt_gz(),
    "truncated.jsonl.gz": gzip.compress(LINES, mtime=0)[:40],
    "corrupt.jsonl.zst": _zst(LINES)[:20] + b"garbage" * 10,
    "truncated.jsonl.zst": _zst(LINES)[:-5],  # zstd's stream reader would return b"" here
}


def _write(d, name: str, data: bytes) -> str:
    path = os.path.join(str(d), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _pretrain_rows(path: str):
    """What one Ray Data read task produces for ``path``: ``[(text, error)]``."""
    rows = read_file({"uri": path, "index": 0, "mix": "m"}, SourceConfig(name="m", sources=[path]))
    return [(r["text"], r["error"]) for r in rows]


def _sft_rows(path: str):
    return [(rec, err or "") for _, rec, err in sft._records(path)]


# --- 1 and 3: damaged and zstd-compressed files, in both readers --------------------------

@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_compressed_file_is_one_unreadable_record(tmp_path, name):
    path = _write(tmp_path, name, DAMAGED[name])
    for rows in (_pretrain_rows(path), _sft_rows(path)):
        assert len(rows) == 1 and rows[0][1].startswith("unreadable file: "), rows


def test_zstd_files_are_read_by_both_readers(tmp_path):
    # two frames, as `zstd` writes for concatenated files
    frames = _zst(b"".join(RECORDS[:15])) + _zst(b"".join(RECORDS[15:]))
    path = _write(tmp_path, "data.jsonl.zst", frames)
    assert [t for t, e in _pretrain_rows(path)] == [f"record {i}" for i in range(40)]
    assert [r["instruction"] for r, e in _sft_rows(path)] == [f"Name king {i}." for i in range(40)]


# --- 2: JSON nested past the parser's recursion limit -------------------------------------

def test_deeply_nested_json_line_is_set_aside_alone(tmp_path):
    deep = b'{"a":' * 100_000 + b"\n"
    path = _write(tmp_path, "deep.jsonl", b"".join(RECORDS[:2]) + deep + b"".join(RECORDS[2:4]))
    rows = _pretrain_rows(path)
    assert [e for _, e in rows] == ["", "", "JSON nested too deeply", "", ""]
    rows = _sft_rows(path)
    assert [e for _, e in rows] == ["", "", "JSON nested too deeply", "", ""]


def test_deeply_nested_json_list_file_is_one_bad_file(tmp_path):
    path = _write(tmp_path, "deep.json", b"[" * 100_000)
    assert _pretrain_rows(path) == [("", "JSON nested too deeply")]
    assert _sft_rows(path) == [(None, "JSON nested too deeply")]


# --- 6: empty and binary files ------------------------------------------------------------

@pytest.mark.parametrize("name,data,reason", [
    ("empty.txt", b"", "empty file"), ("blank.jsonl", b"\n \n", "empty file"),
    ("empty.jsonl.gz", gzip.compress(b"", mtime=0), "empty file"),
    ("image.png", PNG, "binary file (not UTF-8 text)"),
    ("image.jsonl", PNG, "binary file (not UTF-8 text)")])
def test_empty_and_binary_files_are_counted_with_a_reason(tmp_path, name, data, reason):
    path = _write(tmp_path, name, data)
    assert [e for _, e in _pretrain_rows(path)] == [reason]
    assert [e for _, e in _sft_rows(path)] == [reason]


def test_invalid_utf8_costs_only_its_line(tmp_path):
    latin1 = b'{"text": "caf\xe9"}\n'
    path = _write(tmp_path, "latin1.jsonl", b"".join(RECORDS[:2]) + latin1 + b"".join(RECORDS[2:4]))
    assert [e for _, e in _sft_rows(path)] == ["", "", "line is not JSON", "", ""]


# --- 4: records the chat template cannot encode -------------------------------------------

@pytest.fixture(scope="module")
def ws_tok(tmp_path_factory):
    """A byte-level BPE that merges whitespace runs, as GPT-2, Llama and Qwen tokenizers do:
    with it, ChatML's "assistant\\n" followed by a reply of "   " becomes one token "\\n   ",
    so the turn boundary falls inside a token and encode_conversation raises."""
    from tidal.data.tokenizer import train_bpe

    d = str(tmp_path_factory.mktemp("ws_tok"))
    base = "Name a king of England. Richard the Third was one. The user asks and the assistant answers."
    train_bpe([base] * 20 + [base + "\n\n", base + "\n   "] * 20, TokenizerConfig(vocab_size=400), d)
    return d


ALPACA = [{"instruction": f"Name king number {i}.", "output": f"Richard the {i}th."} for i in range(20)]
MIDDLE_BLANK = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "   "},
                             {"role": "user", "content": "Name a king"},
                             {"role": "assistant", "content": "Richard."}]}
# passes every format check; only the tokenizer finds that "\n\n" merges across the turn boundary
UNENCODABLE = {"messages": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "\n\nRichard."}]}


def _jsonl(d, name, records) -> str:
    return _write(d, name, b"".join(json.dumps(r).encode() + b"\n" for r in records))


def test_one_unencodable_record_does_not_abort_sft(tmp_path, ws_tok):
    path = _jsonl(tmp_path, "sft.jsonl", ALPACA + [MIDDLE_BLANK, UNENCODABLE])
    m = sft.prepare_sft(SFTDataConfig(name="x", sources=[path], seq_len=64), ws_tok,
                        str(tmp_path / "out"), log=lambda *a: None)
    bad = m["counts"]["malformed"]
    assert bad["message 1: an empty assistant turn"] == 1
    assert [k for k in bad if k.startswith("cannot be encoded: ")] and sum(bad.values()) == 2
    assert m["counts"]["train"]["examples"] + m["counts"]["val"]["examples"] == 20
    assert m["inputs"][0]["set_aside"] == bad  # and per input file


def test_no_usable_sft_example_lists_every_reason(tmp_path, ws_tok):
    path = _jsonl(tmp_path, "sft.jsonl", [UNENCODABLE])
    with pytest.raises(ValueError, match="no usable examples") as e:
        sft.prepare_sft(SFTDataConfig(name="x", sources=[path], seq_len=64), ws_tok,
                        str(tmp_path / "out"), log=lambda *a: None)
    assert path in str(e.value) and "cannot be encoded: the chat template" in str(e.value)


def test_no_usable_example_names_the_empty_and_binary_files(tmp_path, ws_tok):
    empty, image = _write(tmp_path, "a.jsonl", b""), _write(tmp_path, "b.jsonl", PNG)
    for prep, cfg_cls in ((sft.prepare_sft, SFTDataConfig), (prepare_pairs, PairDataConfig)):
        with pytest.raises(ValueError, match="no usable") as e:
            prep(cfg_cls(name="x", sources=[str(tmp_path)], seq_len=64), ws_tok,
                 str(tmp_path / "out"), log=lambda *a: None)
        msg = str(e.value)
        assert f"{empty}: empty file" in msg and f"{image}: binary file (not UTF-8 text)" in msg, msg


# --- 5: too few examples for a validation split -------------------------------------------

def _assert_no_val(m, out):
    assert m["shards"]["val"] == [] and m["counts"]["val"]["samples"] == 0
    loader = GlobalSampleLoader(out, m, seed=0, global_batch=2)
    assert len(loader.train) == 1 and len(loader.val) == 0
    assert list(loader.val_batches(8, 0, 1, 2)) == []
    assert len(loader.rank_batch(0, 0, 1)) == 2  # training still draws its batches


def test_a_single_preference_pair_gives_an_empty_val_split(tmp_path, ws_tok):
    path = _jsonl(tmp_path, "pairs.jsonl", [{"prompt": "Name a king.", "chosen": "Richard.",
                                             "rejected": "The user."}])
    out = str(tmp_path / "out")
    _assert_no_val(prepare_pairs(PairDataConfig(name="p", sources=[path], seq_len=64), ws_tok, out,
                                 log=lambda *a: None), out)


def test_a_single_sft_example_gives_an_empty_val_split(tmp_path, ws_tok):
    path = _jsonl(tmp_path, "sft.jsonl", ALPACA[:1])
    out = str(tmp_path / "out")
    _assert_no_val(sft.prepare_sft(SFTDataConfig(name="x", sources=[path], seq_len=64), ws_tok, out,
                                   log=lambda *a: None), out)


def test_loader_accepts_a_manifest_without_a_val_split(tmp_path):
    from tidal.data import io as tio

    tio.save_npy(str(tmp_path / "train.npy"), np.arange(12, dtype=np.int32).reshape(4, 3))
    for shards in ({"train": [{"file": "train.npy", "samples": 4}], "val": []},
                   {"train": [{"file": "train.npy", "samples": 4}]}):
        loader = GlobalSampleLoader(str(tmp_path), {"shards": shards}, seed=0, global_batch=2)
        assert len(loader.val) == 0 and list(loader.val_batches(4, 0, 2, 1)) == []


# --- 7: stale inputs ----------------------------------------------------------------------

@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for name in ("a.txt", "b.txt"):
        (d / name).write_text(f"the text of {name}\n")
    return d


def _pretrain_manifest(cfg: DataConfig):
    """The ``inputs`` part of a pretraining manifest, as prepare() records it."""
    from tidal.data.prepare import _hash_inputs
    from tidal.data.sources import list_inputs, source_groups

    return {"inputs": _hash_inputs(list_inputs(cfg), source_groups(cfg))}


def _sft_manifest(cfg):
    inputs = []
    counts = {"records": 0, "malformed": {}}
    list(sft.read_examples(cfg, lambda r: (r, None), {}, counts, inputs))
    return {"kind": "sft", "inputs": inputs}


def _bump_mtime(path, by_s=100):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + by_s * 10**9))


@pytest.mark.parametrize("build", [_pretrain_manifest, _sft_manifest])
def test_inputs_record_size_and_mtime(corpus, build):
    cfg = DataConfig(sources=[str(corpus / "*.txt")]) if build is _pretrain_manifest else \
        SFTDataConfig(sources=[str(corpus / "*.txt")])
    m = build(cfg)
    a = str(corpus / "a.txt")
    assert [i["uri"] for i in m["inputs"]] == [a, str(corpus / "b.txt")]
    assert m["inputs"][0]["bytes"] == os.path.getsize(a)
    assert m["inputs"][0]["mtime_ns"] == os.stat(a).st_mtime_ns
    assert changed_inputs(m, cfg) == []


@pytest.mark.parametrize("build", [_pretrain_manifest, _sft_manifest])
def test_changed_inputs_finds_what_changed(corpus, build):
    cfg = DataConfig(sources=[str(corpus / "*.txt")]) if build is _pretrain_manifest else \
        SFTDataConfig(sources=[str(corpus / "*.txt")])
    m = build(cfg)
    a, b = str(corpus / "a.txt"), str(corpus / "b.txt")
    _bump_mtime(a)  # touched, same content: still the data the shards were made from
    assert changed_inputs(m, cfg) == []
    with open(a, "w") as f:  # same size, other content
        f.write("the TEXT of a.txt\n")
    _bump_mtime(a, 200)
    assert changed_inputs(m, cfg) == [f"{a}: content changed (sha256 differs)"]
    os.remove(b)
    assert changed_inputs(m)[1] == f"{b}: missing"
    (corpus / "c.txt").write_text("a new file\n")
    assert changed_inputs(m, cfg)[2].startswith(f"{corpus / 'c.txt'}: new input")
    (corpus / "a.txt").write_text("longer content now\n")
    assert changed_inputs(m)[0].startswith(f"{a}: size changed")


def test_an_old_manifest_without_times_falls_back_to_the_hash(corpus):
    cfg = DataConfig(sources=[str(corpus)])
    m = _pretrain_manifest(cfg)
    for i in m["inputs"]:
        del i["mtime_ns"]
    assert changed_inputs(m, cfg) == []
    (corpus / "a.txt").write_text("the text of X.txt\n")
    assert changed_inputs(m, cfg) == [f"{corpus / 'a.txt'}: content changed (sha256 differs)"]


def test_embedded_corpus_is_compared_by_version():
    m = {"inputs": [{"uri": "embedded:pydocs", "version": "python-2.7.18", "sha256": "0" * 64}]}
    from tidal.data.corpus import embedded_version

    assert changed_inputs(m) == [f"embedded:pydocs: built from python-2.7.18, now {embedded_version()}"]


def test_manifest_hash_ignores_input_times(corpus):
    """A re-prepared set whose only difference is a touched file keeps its identity, so
    checkpoints trained on it still resume."""
    m = _pretrain_manifest(DataConfig(sources=[str(corpus)]))
    touched = json.loads(json.dumps(m))
    touched["inputs"][0]["mtime_ns"] += 1
    assert manifest_hash(touched) == manifest_hash(m)
    touched["inputs"][0]["sha256"] = "0" * 64
    assert manifest_hash(touched) != manifest_hash(m)
