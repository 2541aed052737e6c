"""The full curation pipeline over the three shared data sets as a weighted mixture, twice
(byte-identical output), then a short pretraining run on the result."""
import hashlib
import json
import os

import pytest

from tests.conftest import SHARED_DATA
from tests.integration.conftest import needs_shakespeare, small_cfg
from tidal.config import DataConfig, from_dict, to_dict
from tidal.data.prepare import prepare
from tidal.train.launch import run_stage

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_shakespeare]  # multi-minute: full suite only
WEIGHTS = {"shakespeare": 0.6, "alpaca": 0.25, "hh_rlhf": 0.15}


def mixture_dict():
    return {"name": "shared_mix", "seq_len": 128, "tokenizer": {"vocab_size": 2048}, "mixture": [
        {"name": "shakespeare", "sources": [os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")],
         "format": "text", "weight": 0.6},
        {"name": "alpaca", "sources": [os.path.join(SHARED_DATA, "alpaca", "alpaca_5000.json")],
         "format": "jsonl", "text_field": "output", "weight": 0.25},
        {"name": "hh_rlhf", "sources": [os.path.join(SHARED_DATA, "hh-rlhf", "harmless-base-pairs.jsonl.gz")],
         "format": "jsonl", "text_field": "chosen", "weight": 0.15}]}


def _files(d):
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(d)) if n.endswith((".npy", ".json")) and n != "curation_report.json"}


def _report(d):
    with open(os.path.join(d, "curation_report.json")) as f:
        report = json.load(f)
    return report, report.pop("stages")  # the per-stage timings are the one thing that varies


def test_three_datasets_mixture_is_deterministic_and_trains(ray_local, tmp_path):
    base = to_dict(DataConfig())
    base.update(mixture_dict())
    cfg = from_dict(DataConfig, base)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    manifest = prepare(cfg, a)
    assert prepare(cfg, b) == manifest
    assert _files(a) == _files(b)  # shards and manifest byte-identical
    (ra, stages), (rb, _) = _report(a), _report(b)
    assert ra == rb  # the report's counts too
    assert stages["pack"]["tokens"] + stages["pack"]["records"] == ra["tokens_out"]
    assert {i["source"] for i in manifest["inputs"]} == set(WEIGHTS)
    for name, w in WEIGHTS.items():
        assert manifest["mixture"][name]["effective_share"] == pytest.approx(w, abs=0.01)
    q = manifest["curation"]["dropped"]["quality"]
    assert q["too_few_words"] > 1000  # short Shakespeare speeches
    assert manifest["curation"]["records_in"] > 5000 + 2000

    run = small_cfg(tmp_path, run={"name": "mix"}, data=mixture_dict() | {"output_dir": a},
                    train={"max_steps": 12, "eval_every": 6, "checkpoint_every": 0,
                           "export_hf": False})
    summary = run_stage("pretrain", run)
    with open(summary["metrics"]) as f:
        recs = [json.loads(line) for line in f]
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0
