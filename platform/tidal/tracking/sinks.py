"""Where metrics go on the driver: metrics.jsonl, events.jsonl, W&B, and progress (a live
bar on a terminal, plain lines in a log).

A restarted worker group replays the steps after its last checkpoint; ``MetricsLog`` then
drops the records it already had from that step on, so every step appears once. A driver
killed mid-write leaves a torn last line: readers skip what does not decode and say so,
and the undecodable text is kept beside the file (``<file>.undecodable``), not dropped.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

from tidal.config.schema import LoggerConfig


def read_jsonl(path: str) -> Tuple[List[Dict], List[str]]:
    """The records of a JSON-lines file and the lines that did not decode (a torn tail)."""
    records, bad = [], []
    if not os.path.exists(path):
        return records, bad
    with open(path, "rb") as f:
        for raw in f.read().split(b"\n"):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                bad.append(raw.decode("utf-8", "replace"))
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad.append(raw.decode("utf-8", "replace"))
    return records, bad


def set_aside(path: str, bad: List[str]) -> str:
    """Keep undecodable lines in ``<path>.undecodable`` (appended, never lost)."""
    aside = path + ".undecodable"
    with open(aside, "a") as f:
        for line in bad:
            f.write(line + "\n")
    return aside


class MetricsLog:
    """The per-step records of a run, kept in memory and in ``metrics.jsonl``."""

    def __init__(self, path: str, log=print):
        self.path = path
        self.records, bad = read_jsonl(path)  # a resumed run keeps its history
        self.records = [r for r in self.records if isinstance(r.get("step"), int)]
        if bad:  # a torn line from a killed driver: keep it aside, continue from what decodes
            aside = set_aside(path, bad)
            self._rewrite()
            log(f"{path}: {len(bad)} undecodable line(s) skipped (a driver killed mid-write); "
                f"kept in {aside}")

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


class EventLog:
    """``events.jsonl``: appended as each event arrives, across every attempt and driver
    session, so a driver killed outright loses nothing it had received."""

    def __init__(self, path: str, log=print):
        self.path = path
        _, bad = read_jsonl(path)
        if bad:
            log(f"{path}: {len(bad)} undecodable line(s) skipped; kept in {set_aside(path, bad)}")
        self._newline = os.path.exists(path) and os.path.getsize(path) > 0 and \
            not open(path, "rb").read()[-1:] == b"\n"

    def add(self, rec: Dict) -> None:
        with open(self.path, "a") as f:
            if self._newline:  # never glue a record onto a torn line
                f.write("\n")
                self._newline = False
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()


class SampleLog(EventLog):
    """``samples.jsonl`` of an RL run: one line per generated sample the learner sent
    (every ``rollout.samples_every`` iterations): iteration, prompt, completion, reward
    and its parts."""

    def __init__(self, run_dir: str, log=print):
        super().__init__(os.path.join(run_dir, "samples.jsonl"), log)

    def add(self, rec: Dict) -> None:
        for sample in rec.get("samples", []):
            super().add({"iteration": rec.get("iteration"), **sample})


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
    """Progress of a run: a rich live bar on a terminal; otherwise (``ray job submit``,
    output to a file) a plain line every ``every`` steps: step, loss, lr, tokens/s,
    elapsed time and ETA."""

    def __init__(self, total: int, enabled: bool, start: int = 0, every: int = 10, stream=None):
        self.bar = None
        self.total, self.every = total, every
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.t0 = time.time()
        self.first: Optional[Tuple[int, float]] = None  # (step, time) the ETA is measured from
        self.last_line = -1
        if not enabled or not _is_terminal(self.stream):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
        from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), refresh_per_second=4)
        self.task = self.bar.add_task("train", total=total, completed=start, info="starting workers")
        self.bar.start()

    def update(self, rec: Dict, val: Optional[float]) -> None:
        info = (f"loss {rec['loss']:.3f}  lr {rec['lr']:.2e}  {rec['tokens_per_s']:,.0f} tok/s" if "loss" in rec
                else f"value model only ({rec.get('value_loss', 0.0):.3f})")  # PPO's value-model warm-up
        if "reward_mean" in rec:  # an RL iteration: what it earned, how long it wrote, the sync
            kl = (f"kl {rec['kl']:.4f}" if "kl" in rec  # per token, a loss term; else per sequence (PPO)
                  else f"kl/seq {rec.get('kl_seq', 0.0):.2f}")
            info = (f"reward {rec['reward_mean']:.3f}  {kl}  len "
                    f"{rec['response_len_mean']:.1f}  {info}  sync {rec.get('sync_share', 0.0):.0%}")
        if val is not None:
            info += f"  val {val:.3f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=rec["step"], info=info)
            return
        if not self.enabled:
            return
        step, now = rec["step"], time.time()
        if self.first is None or step <= self.first[0]:
            self.first = (step, now)
        if step % self.every and step != self.total or step == self.last_line:
            return
        self.last_line = step
        done, rate_t = step - self.first[0], now - self.first[1]
        eta = (self.total - step) * rate_t / done if done > 0 else None
        print(f"step {step}/{self.total}  {info}  elapsed {_hms(now - self.t0)}  "
              f"eta {_hms(eta) if eta is not None else '?'}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, info=text)
        elif self.enabled:
            print(f"[{_hms(time.time() - self.t0)}] {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
