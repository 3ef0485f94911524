"""Loss-curve PNG of a training run (matplotlib, headless)."""
from __future__ import annotations

import json
from pathlib import Path


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    """Train loss per step (and validation loss where measured) from metrics.jsonl, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in Path(metrics_path).read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        if "val_loss" in rec:
            val.append((rec["step"], rec["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), lw=1, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=4, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per target token (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title or "fastmath train")
    fig.tight_layout()
    out_path = Path(out_path)
    from .fsio import atomic_open

    try:
        with atomic_open(out_path, "wb") as f:  # a full disk leaves the old plot or none, never half a PNG
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return out_path
