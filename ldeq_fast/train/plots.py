"""Training curves: loss and evaluation NME from a run's metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path


def plot_curves(log_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train" and r["loss"] is not None]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    for split in sorted({r["split"] for r in evals}):
        rs = [r for r in evals if r["split"] == split]
        axes[1].plot([r["step"] for r in rs], [100 * r["nme"] for r in rs], marker="o", label=split)
    axes[1].set(xlabel="step", ylabel="NME (%)", title="evaluation")
    if evals:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
