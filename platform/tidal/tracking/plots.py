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


def rl_curves(records: List[Dict], path: str, title: str, start_reward=None) -> str:
    """An RL run's reward (train and held-out), KL to the reference and response length
    per iteration, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if "reward_mean" in r]
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), dpi=110, sharex=True)
    axes[0].plot(steps, [r["reward_mean"] for r in recs], lw=1.2, label="reward (train samples)")
    val = [(r["step"], r["val_reward"]) for r in records if "val_reward" in r]
    val = [(0, start) for start in [start_reward] if start is not None] + val
    if val:
        axes[0].plot([s for s, _ in val], [v for _, v in val], "o-", lw=1.5, label="held-out reward")
    axes[0].set_ylabel("reward")
    axes[0].legend()
    key = "kl" if any("kl" in r for r in recs) else "kl_seq"  # per token (a loss term) or per sequence
    axes[1].plot(steps, [r.get(key, 0.0) for r in recs], lw=1.2, color="tab:red")
    axes[1].set_ylabel("KL to reference" + (" per sequence" if key == "kl_seq" else ""))
    axes[2].plot(steps, [r["response_len_mean"] for r in recs], lw=1.2, color="tab:green")
    axes[2].set_ylabel("response tokens")
    axes[2].set_xlabel("iteration")
    axes[0].set_title(title)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
