import json

from tidal.tracking import plots, run_card
from tidal.tracking.sinks import MetricsLog


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_metrics_log_drops_replayed_steps(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for s in range(1, 8):
        log.add({"step": s, "loss": 10.0 - s})
    # A worker group restarted from the step-5 checkpoint replays steps 6 and 7.
    log.truncate_after(5)
    assert log.add({"step": 6, "loss": 1.5}) is False
    log.add({"step": 7, "loss": 1.25})
    assert [r["step"] for r in _lines(path)] == list(range(1, 8))
    assert _lines(path)[-1]["loss"] == 1.25
    # A replay that arrives without a start event still never duplicates a step.
    assert log.add({"step": 3, "loss": 0.5}) is True
    assert [r["step"] for r in _lines(path)] == [1, 2, 3]
    # A relaunched driver picks up the history.
    assert [r["step"] for r in MetricsLog(path).records] == [1, 2, 3]
    assert log.last("loss") == 0.5


def test_run_card_and_plot(tmp_path):
    config = {"train": {"max_steps": 10, "global_batch_tokens": 512, "eval_every": 5,
                        "checkpoint_every": 0}}
    text = run_card.render(config, {"run_name": "r1", "seed": 3}, {"final_val_loss": 2.5})
    assert "# Run card: r1" in text and "| seed | 3 |" in text and "| final_val_loss | 2.5 |" in text
    assert "5,120 tokens" in text and "checkpoint every end only" in text
    assert "| torch |" in text and "max_steps: 10" in text
    recs = [{"step": s, "loss": 5.0 / s} for s in range(1, 11)] + [{"step": 10, "val_loss": 1.0}]
    png = plots.loss_curve(recs, str(tmp_path / "loss.png"), "t")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
