"""PNG plots for people: learning curves, confusion matrix, a grid of test predictions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np


def learning_curves(phases: list[tuple[str, dict[str, list[float]]]], path: Path) -> None:
    """Loss and accuracy per epoch, both phases on one axis with the phase boundary marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        start = 0
        for i, (name, hist) in enumerate(phases):
            train = hist.get(metric, [])
            val = hist.get(f"val_{metric}", [])
            epochs = np.arange(start + 1, start + len(train) + 1)
            ax.plot(epochs, train, "-o", ms=3, color=f"C{2 * i}", label=f"{name} train")
            if val:
                ax.plot(epochs[: len(val)], val, "--o", ms=3, color=f"C{2 * i + 1}", label=f"{name} val")
            if i:
                ax.axvline(start + 0.5, color="grey", lw=0.8, ls=":")
            start += len(train)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(cm: list[list[int]], class_names: list[str], path: Path, title: str = "") -> None:
    cm_arr = np.asarray(cm)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.2 * n + 2))
    ax.imshow(cm_arr, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = cm_arr.max() if cm_arr.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm_arr[i, j]), ha="center", va="center",
                    color="white" if cm_arr[i, j] > peak / 2 else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prediction_grid(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray,
                    class_names: list[str], path: Path, max_images: int = 24, seed: int = 0) -> None:
    """Test images titled 'predicted (score) / true': green when right, red when wrong.

    Mistakes are shown first so the grid is useful, then correct ones fill the rest.
    """
    idx = np.arange(len(images))
    rng = np.random.default_rng(seed)
    wrong = rng.permutation(idx[y_true != y_pred])
    right = rng.permutation(idx[y_true == y_pred])
    chosen = np.concatenate([wrong[: max_images // 2], right])[:max_images]
    cols = 6
    rows = max(1, int(np.ceil(len(chosen) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.5))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, i in zip(np.atleast_1d(axes).ravel(), chosen, strict=False):
        ok = y_true[i] == y_pred[i]
        ax.imshow(images[i])
        ax.set_title(f"{class_names[y_pred[i]]} ({scores[i]:.2f})\ntrue: {class_names[y_true[i]]}",
                     fontsize=8, color="green" if ok else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
