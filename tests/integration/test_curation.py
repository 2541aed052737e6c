"""Curation on a local Ray runtime: dedup quality on a labelled set built from real text,
the curation report and the dropped-records side output."""
import json
import os

import pytest

from tests.integration.conftest import SHAKESPEARE, needs_shakespeare
from tidal.config import DataConfig, TokenizerConfig
from tidal.config.schema import CurationConfig, DedupConfig, FilterConfig
from tidal.data.curate import evalset
from tidal.data.prepare import prepare

pytestmark = [pytest.mark.integration, needs_shakespeare]


def test_near_dedup_precision_and_recall_on_labelled_shakespeare(ray_local, tmp_path):
    with open(SHAKESPEARE) as f:
        docs, truth = evalset.build(f.read(), seed=1)
    path = tmp_path / "labelled.jsonl"
    with open(path, "w") as f:  # line i is document i, so doc_id == i
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    out = tmp_path / "out"
    # distributed_min_docs=0: the group-bys run as Ray Data hash shuffles, as on a big corpus
    cfg = DataConfig(name="labelled", sources=[str(path)], seq_len=64,
                     tokenizer=TokenizerConfig(vocab_size=512),
                     curation=CurationConfig(filters=FilterConfig(enabled=False), write_dropped=True,
                                             dedup=DedupConfig(distributed_min_docs=0)))
    manifest = prepare(cfg, str(out))
    with open(out / "dropped.jsonl") as f:
        dropped = [json.loads(line) for line in f]
    assert all(r["reason"] in ("dedup:exact", "dedup:near") for r in dropped)
    scores = evalset.score({r["doc_id"]: r["duplicate_of"] for r in dropped}, truth)
    assert scores["precision"] >= 0.9 and scores["recall"] >= 0.9, scores
    # exact copies are found by the exact stage, the edited ones by MinHash
    kinds = {r["doc_id"]: r["reason"] for r in dropped}
    exact_ids = list(truth)[:40]
    assert sum(kinds.get(i) == "dedup:exact" for i in exact_ids) == 40
    assert sum(v == "dedup:near" for v in kinds.values()) >= 0.9 * 120
    dup = manifest["curation"]["duplicates"]
    # (a few reordered passages are single blocks, so their "near" copy is exact)
    assert dup["exact_removed"] >= 40 and dup["exact_removed"] + dup["near_removed"] == len(dropped)
    assert manifest["counts"]["documents"] == len(docs) - len(dropped)


def test_report_accounts_for_every_record(ray_local, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    good = ("The committee met on Tuesday to review the budget for the coming year, and after a "
            "long discussion the members agreed that the library would receive more money. ")
    topics = ("roads schools parks water power trains buses housing taxes police fire health "
              "libraries museums markets bridges ports airports farms forests").split()
    # Identical apart from the PII until a topic word is added: scrubbing makes exact copies.
    rows = [good + f"The topic was {topics[i]}. Contact clerk{i}@example.org or call 020 7946 0{i:03d}."
            for i in range(20)]
    rows += ["Too short.", "Lorem ipsum dolor sit amet, " + good, rows[0]]
    with open(corpus / "a.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"text": r}) + "\n")
        f.write("{broken\n")
    out = tmp_path / "out"
    cfg = DataConfig(name="r", sources=[str(corpus)], seq_len=16, tokenizer=TokenizerConfig(vocab_size=300),
                     curation=CurationConfig(dedup=DedupConfig(near=False), write_dropped=True))
    manifest = prepare(cfg, str(out))
    with open(out / "curation_report.json") as f:
        report = json.load(f)
    assert report["records_in"] == 24
    assert report["dropped"]["read"] == {"line is not JSON": 1}
    assert report["dropped"]["quality"] == {"boilerplate": 1, "too_few_words": 1}
    assert report["dropped"]["dedup"]["exact"] == 1
    assert report["documents_kept"] + report["dropped_total"] == report["records_in"]
    assert report["pii"] == {"email": report["documents_kept"], "phone": report["documents_kept"]}
    assert report["tokens_out"] > 0 and report["tokens_out"] == (
        manifest["counts"]["train"]["tokens"] + manifest["counts"]["val"]["tokens"])
    # per-stage progress counters (reported live from the Ray Data tasks) add up
    st = report["stages"]
    assert st["curate"]["records"] == report["records_in"] == st["dedup"]["records"]
    assert st["tokenize"]["records"] == st["pack"]["records"] == report["documents_kept"]
    assert st["tokenize"]["tokens"] + report["documents_kept"] == report["tokens_out"]  # + EOS each
    assert all(c["seconds"] > 0 and c["records_per_s"] > 0 for c in st.values())
    md = open(out / "curation_report.md").read()
    assert "| quality | boilerplate | 1 |" in md and "| email |" in md
    assert "| tokenize |" in md
    with open(out / "dropped.jsonl") as f:
        side = [json.loads(line) for line in f]
    assert len(side) == report["dropped_total"]
    assert {r["reason"] for r in side} >= {"read:line is not JSON", "quality:boilerplate", "dedup:exact"}
    # scrubbed text reaches the shards: the tokenizer never saw an address
    tok_vocab = json.load(open(out / "tokenizer" / "tokenizer.json"))["model"]["vocab"]
    assert not any("example.org" in t for t in tok_vocab)
    assert manifest["curation"]["dropped"] == report["dropped"]
    assert manifest["config"]["curation"]["dedup"]["bands"] == 32


def test_nothing_left_after_curation_is_a_clear_error(ray_local, tmp_path):
    (tmp_path / "short.txt").write_text("Hi.\n\nToo short.\n\nAlso short.")
    cfg = DataConfig(name="short", sources=[str(tmp_path / "short.txt")], seq_len=16,
                     tokenizer=TokenizerConfig(vocab_size=300))
    with pytest.raises(ValueError, match=r"curation kept none of 3 records .*too_few_words"):
        prepare(cfg, str(tmp_path / "out"))
    assert os.path.exists(tmp_path / "out" / "curation_report.json")
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_curriculum_scores_reach_the_loader(ray_local, tmp_path):
    import numpy as np

    from tidal.config.schema import CurriculumConfig, DedupConfig
    from tidal.data.loader import GlobalSampleLoader

    cfg = DataConfig(name="cur", sources=[SHAKESPEARE], seq_len=64,
                     tokenizer=TokenizerConfig(vocab_size=512),
                     curation=CurationConfig(filters=FilterConfig(enabled=False),
                                             dedup=DedupConfig(near=False)),
                     curriculum=CurriculumConfig(score="length", epochs=1))
    out = str(tmp_path / "cur")
    manifest = prepare(cfg, out)
    scores = np.load(os.path.join(out, "train_scores.npy"))
    assert manifest["curriculum"]["score"] == "length"
    assert len(scores) == manifest["counts"]["train"]["samples"] and scores.std() > 0
    loader = GlobalSampleLoader(out, manifest, seed=0, global_batch=32)
    first = scores[loader.global_indices(0, 32)].mean()
    last = scores[loader.global_indices(len(scores) - 32, 32)].mean()
    assert first < last  # short speeches first


def test_upsampled_mixture_repeats_the_small_source(ray_local, tmp_path):
    from tidal.config.schema import DedupConfig, SourceConfig

    para = "The {} of the river ran past the mill and the old stone bridge near the town."
    (tmp_path / "small.txt").write_text("\n\n".join(para.format(w) for w in ("bank", "bend", "mouth")))
    (tmp_path / "big.txt").write_text("\n\n".join(para.format(f"part {i}") for i in range(40)))
    off = CurationConfig(filters=FilterConfig(enabled=False), dedup=DedupConfig(exact=False, near=False))
    cfg = DataConfig(name="up", seq_len=16, val_fraction=0.05, tokenizer=TokenizerConfig(vocab_size=300),
                     curation=off, mixture_mode="upsample", mixture=[
                         SourceConfig(name="small", sources=[str(tmp_path / "small.txt")], weight=1),
                         SourceConfig(name="big", sources=[str(tmp_path / "big.txt")], weight=1)])
    m = prepare(cfg, str(tmp_path / "out"))
    mix = m["mixture"]
    assert mix["small"]["effective_share"] == pytest.approx(0.5, abs=0.05)
    assert mix["small"]["documents_used"] > 3 * 5 and mix["big"]["tokens_used"] == mix["big"]["tokens_available"]
