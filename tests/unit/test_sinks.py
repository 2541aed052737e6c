"""Driver-side records survive a killed driver; progress shows in plain logs; persisted
configs carry no credentials."""
import io
import json

from tidal.config import DPOConfig, PretrainConfig, from_dict, to_dict
from tidal.config.redact import credential_problems, redact
from tidal.tracking.sinks import EventLog, MetricsLog, Progress, read_jsonl


def _rec(step, loss=1.0):
    return {"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 1000.0}


def test_a_torn_metrics_line_is_skipped_kept_aside_and_never_glued(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for s in (1, 2, 3):
        log.add(_rec(s))
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # the driver died mid-write
    notes = []
    resumed = MetricsLog(path, log=notes.append)
    assert [r["step"] for r in resumed.records] == [1, 2, 3]
    assert "1 undecodable line(s) skipped" in notes[0]
    assert open(path + ".undecodable").read() == '{"step": 4, "lo\n'
    resumed.add(_rec(4, 0.5))
    records, bad = read_jsonl(path)
    assert bad == [] and [r["step"] for r in records] == [1, 2, 3, 4]


def test_events_are_appended_as_they_arrive_across_sessions(tmp_path):
    path = str(tmp_path / "events.jsonl")
    first = EventLog(path)
    first.add({"event": "start", "step": 0})
    first.add({"event": "checkpoint", "step": 5})
    # on disk at once: a driver killed now has lost nothing it received
    assert [e["event"] for e in read_jsonl(path)[0]] == ["start", "checkpoint"]
    with open(path, "a") as f:
        f.write('{"event": "rollb')  # torn by a kill
    second = EventLog(path, log=lambda m: None)
    second.add({"event": "start", "step": 5})
    records, bad = read_jsonl(path)
    assert [(e["event"], e["step"]) for e in records] == [("start", 0), ("checkpoint", 5), ("start", 5)]
    assert bad == ['{"event": "rollb']


def test_plain_progress_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = Progress(total=30, enabled=True, every=10, stream=out)
    assert bar.bar is None  # no live bar off a terminal
    for s in range(1, 31):
        bar.update(_rec(s, loss=3.0 - s / 100), val=2.5 if s == 20 else None)
    bar.note("checkpoint skipped")
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["10/30", "20/30", "30/30"]
    assert "loss 2.900" in lines[0] and "lr 1.00e-03" in lines[0] and "1,000 tok/s" in lines[0]
    assert "elapsed 0:00:00" in lines[0] and "eta " in lines[0]
    assert "val 2.500" in lines[1]
    assert lines[3].endswith("checkpoint skipped")
    quiet = io.StringIO()
    Progress(total=30, enabled=False, stream=quiet).update(_rec(10), None)
    assert quiet.getvalue() == ""


def test_credentials_are_refused_and_redacted():
    d = to_dict(from_dict(PretrainConfig, {"run": {"storage_path": "s3://AKIA123:s3cr3t@bucket/runs"},
                                           "data": {"sources": ["https://host/x?X-Amz-Signature=abc&part=1",
                                                                "embedded:pydocs"]}}))
    problems = credential_problems(d)
    assert sorted(p.split(":")[0] for p in problems) == ["data.sources[0]", "run.storage_path"]
    safe = redact(d)
    blob = json.dumps(safe)
    assert "s3cr3t" not in blob and "AKIA123" not in blob and "abc" not in blob
    assert safe["run"]["storage_path"] == "s3://***@bucket/runs"
    assert safe["data"]["sources"] == ["https://host/x?X-Amz-Signature=***&part=1", "embedded:pydocs"]
    assert redact(to_dict(PretrainConfig())) == to_dict(PretrainConfig())  # nothing else touched


def test_reference_cache_key_follows_the_weights(tmp_path):
    from tidal.train.launch import _reference_digest

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights-1")
    cfg = from_dict(DPOConfig,
                    {"model": {"pretrained": str(model)}, "dpo": {"reference": "precompute"}})
    first = _reference_digest(cfg, "dpo")
    assert first == _reference_digest(cfg, "dpo")
    (model / "model.safetensors").write_bytes(b"weights-2")  # re-exported in place
    assert _reference_digest(cfg, "dpo") != first
    assert _reference_digest(cfg, "sft") is None
