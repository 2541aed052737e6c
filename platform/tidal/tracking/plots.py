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
    return _save(fig, axes, path, title)


def dynamics_curves(records: List[Dict], path: str, title: str) -> str:
    """Beside the loss curve: per layer group, the gradient norm and the update-to-parameter
    ratio (log scales), and where each measured step's seconds went (communication, data
    wait, compute)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if "update_ratio" in r]
    steps = [r["step"] for r in recs]
    groups = sorted({k.split("/", 1)[1] for r in recs for k in r if k.startswith("update_ratio/")},
                    key=lambda g: (g != "embed", g == "head", int(g.split(".")[1].split("-")[0]) if g.startswith("blocks.") else 0))
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), dpi=110, sharex=True)
    colors = plt.get_cmap("viridis")
    for i, g in enumerate(groups):
        c = colors(i / max(1, len(groups) - 1))
        axes[0].plot(steps, [r.get(f"grad_norm/{g}", float("nan")) for r in recs], lw=1.1, color=c, label=g)
        axes[1].plot(steps, [r.get(f"update_ratio/{g}", float("nan")) for r in recs], lw=1.1, color=c, label=g)
    axes[1].plot(steps, [r["update_ratio"] for r in recs], "k--", lw=1.4, label="all")
    axes[0].set_ylabel("gradient norm")
    axes[1].set_ylabel("|update| / |weights|")
    for ax in axes[:2]:
        ax.set_yscale("log")
    axes[1].legend(fontsize=7, ncol=2)
    parts = [("comm_gather_s", "all-gather"), ("comm_reduce_s", "reduce-scatter"), ("data_wait_s", "data wait"),
             ("compute_s", "compute")]
    bottom = [0.0] * len(recs)
    for key, label in parts:
        vals = [r.get(key, 0.0) for r in recs]
        axes[2].bar(steps, vals, bottom=bottom, label=label, width=max(1, (steps[-1] - steps[0]) / max(1, 2 * len(steps))) if steps else 1)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[2].set_ylabel("seconds of a measured step")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    return _save(fig, axes, path, title)


def _save(fig, axes, path: str, title: str) -> str:
    """Title on the first panel, a light grid on each, written as a PNG."""
    import matplotlib.pyplot as plt

    axes[0].set_title(title)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
