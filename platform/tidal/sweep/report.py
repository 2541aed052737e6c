"""The end of a sweep: the ranked table (console, CSV, JSON), the plots, and the best
trial's checkpoint and the overrides that reproduce it with the job itself."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, Optional

from tidal.config import from_dict
from tidal import stages
from tidal.sweep.space import coerce, trial_dict

PLOT_KEYS = ("schedule.name", "optim.lr", "schedule.warmup_steps", "schedule.warmup_fraction")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.4g}"
    return str(v)


def _history(result):
    """Every report of a trial: Tune's progress.csv keeps them across pauses and restores
    (its result.json, behind ``metrics_dataframe``, restarts with each restore)."""
    import pandas as pd

    path = os.path.join(result.path, "progress.csv")
    if os.path.exists(path) and os.path.getsize(path) > 0:
        try:
            return pd.read_csv(path)
        except Exception:  # noqa: BLE001 - fall back to Tune's own view
            pass
    return result.metrics_dataframe


def collect(grid, sweep, base: Dict) -> List[Dict]:
    """One row per trial: its values, best metric, progress, status and best checkpoint."""
    from tidal.sweep.trial import POINTER

    sign = 1 if sweep.mode == "min" else -1
    max_steps = base["train"]["max_steps"]
    rows = []
    for result in grid:
        df = _history(result)
        hist = [] if df is None or sweep.metric not in df else \
            df[[c for c in ("step", "tokens_seen", sweep.metric, "run_name", "trial_id") if c in df]].to_dict("records")
        hist = [h for h in hist if h.get(sweep.metric) is not None and not math.isnan(h[sweep.metric])]
        params = {p.key: coerce(p, result.config[p.key]) for p in sweep.search.space if p.key in result.config}
        trial = os.path.basename(result.path.rstrip("/"))
        tid = hist[-1].get("trial_id") if hist else None
        # a trial id of digits only reads back from progress.csv as a number
        row = {"trial": str(tid or trial), "dir": result.path, **params, "history": hist}
        if hist:
            best = min(hist, key=lambda h: sign * h[sweep.metric])
            last = hist[-1]
            row.update({f"best_{sweep.metric}": best[sweep.metric], "best_step": int(best["step"]),
                        "steps": int(last["step"]), "tokens_seen": int(last.get("tokens_seen", 0))})
            ckpt = None
            try:
                found = result.get_best_checkpoint(sweep.metric, sweep.mode)
                if found is not None:
                    with found.as_directory() as local:
                        with open(os.path.join(local, POINTER)) as f:
                            ckpt = json.load(f)["checkpoint"]
            except Exception:  # noqa: BLE001 - e.g. none kept, or unreadable from here
                ckpt = None
            row["checkpoint"] = ckpt
        if result.error is not None:
            row["status"] = f"failed: {type(result.error).__name__}"
        elif not hist:
            row["status"] = "no result"
        elif row["steps"] < max_steps:
            row["status"] = f"stopped at step {row['steps']}"
        else:
            row["status"] = "completed"
        rows.append(row)
    key = f"best_{sweep.metric}"
    rows.sort(key=lambda r: (key not in r, sign * r.get(key, 0.0)))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def override_string(sweep, row: Dict) -> str:
    values = [f"{p.key}={_fmt_override(row[p.key])}" for p in sweep.search.space if p.key in row]
    return " ".join([f"python jobs/{sweep.job}.py", *sweep.overrides, *values])


def _fmt_override(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def table(rows: List[Dict], sweep) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"sweep '{sweep.name}': {len(rows)} trials of {sweep.job}, ranked by "
                    f"{sweep.metric} ({sweep.mode})", title_justify="left")
    keys = [p.key for p in sweep.search.space]
    for col in ["#", "trial", *keys, f"best {sweep.metric}", "at step", "tokens seen", "status"]:
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(str(r["rank"]), escape(str(r["trial"])), *[escape(_fmt(r.get(k, ""))) for k in keys],
                  _fmt(r.get(f"best_{sweep.metric}", "-")), str(r.get("best_step", "-")),
                  f"{r.get('tokens_seen', 0):,}", r["status"],
                  style="bold green" if r["rank"] == 1 and "checkpoint" in r else None)
    Console().print(t)


def write(rows: List[Dict], sweep, base: Dict, root: str) -> Dict[str, str]:
    """results.csv, results.json, val_curves.png and lr_schedules.png under ``root``."""
    keys = [p.key for p in sweep.search.space]
    cols = ["rank", "trial", *keys, f"best_{sweep.metric}", "best_step", "steps", "tokens_seen",
            "status", "checkpoint", "dir"]
    csv_path = os.path.join(root, "results.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    best = rows[0] if rows and f"best_{sweep.metric}" in rows[0] else None
    out = {"results_csv": csv_path}
    json_path = os.path.join(root, "results.json")
    with open(json_path, "w") as f:
        json.dump({"sweep": sweep.name, "job": sweep.job, "metric": sweep.metric, "mode": sweep.mode,
                   "best": None if best is None else {
                       "trial": best["trial"], "checkpoint": best.get("checkpoint"),
                       sweep.metric: best[f"best_{sweep.metric}"],
                       "reproduce": override_string(sweep, best)},
                   "trials": rows}, f, indent=2, default=str)
    out["results_json"] = json_path
    out["val_plot"] = val_plot(rows, sweep, os.path.join(root, "val_curves.png"))
    out["lr_plot"] = lr_plot(rows, sweep, base, os.path.join(root, "lr_schedules.png"))
    return out


def _label(r: Dict, sweep) -> str:
    shown = [f"{k.split('.')[-1]}={_fmt(r[k])}" for k in PLOT_KEYS if k in r]
    shown = shown or [f"{k.split('.')[-1]}={_fmt(r[k])}" for k in (p.key for p in sweep.search.space) if k in r][:3]
    return f"{r['trial']} " + " ".join(shown)


def val_plot(rows: List[Dict], sweep, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for r in reversed(rows):  # the best drawn last, on top
        h = r["history"]
        if not h:
            continue
        x = [p.get("tokens_seen", p["step"]) for p in h]
        y = [p[sweep.metric] for p in h]
        best = r["rank"] == 1
        ax.plot(x, y, "o-" if best else ".-", lw=2.6 if best else 1.0, alpha=1.0 if best else 0.55,
                color="tab:red" if best else None, label=("best: " if best else "") + _label(r, sweep),
                zorder=3 if best else 2)
        if r["status"].startswith("stopped"):
            ax.plot(x[-1], y[-1], "kx", ms=8)
    return _save(fig, ax, "tokens seen", sweep.metric,
                 f"sweep '{sweep.name}': {sweep.metric} per trial (x: stopped early)", path)


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def lr_plot(rows: List[Dict], sweep, base: Dict, path: str) -> str:
    """The LR schedule each trial's (final) values give, over the full run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tidal.optim import lr_at

    schema = stages.get(sweep.job).schema
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for r in reversed(rows):
        params = {p.key: r[p.key] for p in sweep.search.space if p.key in r}
        cfg = from_dict(schema, trial_dict(base, sweep, params))
        steps = list(range(cfg.train.max_steps))
        best = r["rank"] == 1
        ax.plot(steps, [lr_at(s, cfg.train.max_steps, cfg.optim.lr, cfg.schedule) for s in steps],
                lw=2.6 if best else 1.0, color="tab:red" if best else None, alpha=1.0 if best else 0.6,
                label=("best: " if best else "") + _label(r, sweep), zorder=3 if best else 2)
    return _save(fig, ax, "step", "learning rate", f"sweep '{sweep.name}': learning-rate schedules tried", path)


def best_summary(rows: List[Dict], sweep) -> Optional[Dict]:
    if not rows or f"best_{sweep.metric}" not in rows[0]:
        return None
    b = rows[0]
    return {"best_trial": b["trial"], f"best_{sweep.metric}": b[f"best_{sweep.metric}"],
            "best_checkpoint": b.get("checkpoint"), "reproduce": override_string(sweep, b)}
