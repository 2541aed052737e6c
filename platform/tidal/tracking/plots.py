"""PNG plots of a run (matplotlib, headless)."""
from __future__ import annotations

from typing import Dict, List


def loss_curve(records: List[Dict], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "loss" in r]
    loss = [r["loss"] for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, loss, lw=1.2, label="train loss")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", lw=1.5, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
