"""Where metrics go on the driver: metrics.jsonl, W&B, and a live progress bar.

A restarted worker group replays the steps after its last checkpoint; ``MetricsLog`` then
drops the records it already had from that step on, so every step appears once.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from tidal.config.schema import LoggerConfig


class MetricsLog:
    """The per-step records of a run, kept in memory and in ``metrics.jsonl``."""

    def __init__(self, path: str):
        self.path = path
        self.records: List[Dict] = []
        if os.path.exists(path):  # a resumed run keeps its history
            with open(path) as f:
                self.records = [json.loads(line) for line in f if line.strip()]

    def add(self, rec: Dict) -> bool:
        """Append a step record; returns True if it rewound earlier records."""
        rewound = bool(self.records) and rec["step"] <= self.records[-1]["step"]
        if rewound:
            self.records = [r for r in self.records if r["step"] < rec["step"]]
        self.records.append(rec)
        if rewound:
            self._rewrite()
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rewound

    def truncate_after(self, step: int) -> None:
        """Forget records past ``step`` (a run resumed from an earlier checkpoint)."""
        if self.records and self.records[-1]["step"] > step:
            self.records = [r for r in self.records if r["step"] <= step]
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def last(self, key: str) -> Optional[float]:
        for r in reversed(self.records):
            if key in r:
                return r[key]
        return None


def wandb_mode(cfg: LoggerConfig) -> str:
    if not cfg.wandb or cfg.wandb_mode == "disabled":
        return "disabled"
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
    return os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")


class WandbSink:
    def __init__(self, cfg: LoggerConfig, run_name: str, run_dir: str, config: Dict):
        self.run = None
        mode = wandb_mode(cfg)
        if mode == "disabled":
            return
        import wandb

        if not os.environ.get("WANDB_MODE"):
            os.environ.pop("WANDB_MODE", None)  # an empty value is rejected by wandb itself
        ids = [cfg.run_id or run_name] + ([run_name] if cfg.run_id and cfg.run_id != run_name else [])
        for i, run_id in enumerate(ids):
            try:
                self.run = wandb.init(project=cfg.project, group=cfg.group, name=run_id, id=run_id,
                                      resume="allow", dir=run_dir, mode=mode, config=config,
                                      tags=list(cfg.tags), settings=wandb.Settings(silent=True))
                break
            except Exception as e:  # tracking must never cost a training run
                if i + 1 < len(ids):  # e.g. the shared id still held by a run that just ended
                    print(f"warning: W&B run id {run_id} unavailable ({type(e).__name__}: {e}); "
                          f"logging this run as {ids[i + 1]} in group {cfg.group}")
                    continue
                print(f"warning: W&B disabled for this run: {type(e).__name__}: {e}")
                self.run = None
                return
        # Steps go on the x-axis as a metric, not W&B's own monotonic counter: steps replayed
        # after a restart from a checkpoint are then logged instead of dropped.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, rec: Dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in rec.items() if isinstance(v, (int, float))})

    def finish(self, summary: Dict) -> Optional[str]:
        if self.run is None:
            return None
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        path = self.run.dir
        self.run.finish()
        return path


class Progress:
    """A rich progress bar with the latest loss, throughput and validation loss."""

    def __init__(self, total: int, enabled: bool, start: int = 0):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
        from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), refresh_per_second=4)
        self.task = self.bar.add_task("train", total=total, completed=start, info="starting workers")
        self.bar.start()

    def update(self, rec: Dict, val: Optional[float]) -> None:
        if self.bar is None:
            return
        info = f"loss {rec['loss']:.3f}  lr {rec['lr']:.2e}  {rec['tokens_per_s']:,.0f} tok/s"
        if val is not None:
            info += f"  val {val:.3f}"
        self.bar.update(self.task, completed=rec["step"], info=info)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, info=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
