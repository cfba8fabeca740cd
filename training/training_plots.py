"""One PNG per CNN training run: learning curves by phase, and the reliability diagram before
and after temperature scaling (what the numbers in metrics.jsonl and the manifest say, seen)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _reliability(probs: np.ndarray, y: np.ndarray, n_bins: int = 15):
    conf, correct = probs.max(1), (probs.argmax(1) == y)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    centers, accs = [], []
    for b in range(n_bins):
        m = bins == b
        if m.any():
            centers.append(conf[m].mean())
            accs.append(correct[m].mean())
    return np.array(centers), np.array(accs)


def plot_training(history: list[dict], val_logits: np.ndarray, val_labels: np.ndarray, temperature: float,
                  path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from catcascade.cnn_stage.topk import softmax
    from catcascade.ensemble.metrics import expected_calibration_error

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    epochs = [r["epoch"] for r in history]
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    axb = ax1.twinx()
    axb.plot(epochs, [r["val_balanced_accuracy"] for r in history], "s-", color="tab:green",
             label="val balanced accuracy")
    axb.plot(epochs, [r["val_top1"] for r in history], "^--", color="tab:olive", label="val top-1")
    axb.set_ylim(0, 1)
    for prev, row in zip(history, history[1:]):
        if row["phase"] != prev["phase"]:
            ax1.axvline(row["epoch"] - 0.5, color="grey", ls=":", lw=1)
    ax1.set_title("progressive unfreezing (dotted: next phase)")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = axb.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=8)

    ax2.plot([0, 1], [0, 1], color="grey", lw=1)
    for t, name in ((1.0, "before"), (temperature, f"after (T={temperature:.2f})")):
        p = softmax(val_logits, t)
        c, a = _reliability(p, val_labels)
        ax2.plot(c, a, "o-", label=f"{name}: ECE {expected_calibration_error(p, val_labels):.3f}")
    ax2.set_xlabel("confidence (top-1 probability)")
    ax2.set_ylabel("accuracy")
    ax2.set_xlim(0, 1)
    ax2.set_ylim(0, 1)
    ax2.set_title("reliability on validation (15 bins)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
