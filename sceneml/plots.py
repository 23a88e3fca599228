"""Figures a person would rather look at than read. Each function returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def loss_curves(history: list[dict], batch_losses: list[tuple[int, float]] | None = None) -> Figure:
    """Train/val loss per epoch, and (right panel) the loss of every batch."""
    fig, axes = plt.subplots(1, 2 if batch_losses else 1, figsize=(11 if batch_losses else 6, 4), squeeze=False)
    epochs = [h["epoch"] for h in history]
    ax = axes[0, 0]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="val")
    ax.set(title="Loss per epoch", xlabel="epoch", ylabel="cross-entropy loss")
    ax.set_xticks(epochs)
    ax.legend()
    ax.grid(alpha=0.3)
    if batch_losses:
        steps, values = zip(*batch_losses)
        ax = axes[0, 1]
        ax.plot(steps, values, lw=0.8, alpha=0.6, label="batch")
        if len(values) >= 10:
            k = max(len(values) // 20, 2)
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, lw=2, label=f"moving mean ({k})")
        ax.set(title="Training loss per batch", xlabel="global batch", ylabel="loss")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def per_class_bars(values: dict[str, float], title: str, ylabel: str, mean_label: str) -> Figure:
    names = list(values)
    vals = np.array([values[n] for n in names], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, np.nan_to_num(vals), color="tab:blue")
    mean = float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else float("nan")
    ax.axhline(mean, color="tab:red", ls="--", label=f"{mean_label} = {mean:.3f}")
    for bar, v in zip(bars, vals):
        ax.text(bar.get_x() + bar.get_width() / 2, min(np.nan_to_num(v), 1.0) + 0.01,
                "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set(title=title, ylabel=ylabel, ylim=(0, 1.1))
    ax.tick_params(axis="x", rotation=20)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def metric_curves(history: list[dict], keys: list[str], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for key in keys:
        ax.plot(epochs, [h[key] for h in history], "o-", label=key)
    ax.set(title=title, xlabel="epoch", ylabel="score", ylim=(0, 1.02))
    ax.set_xticks(epochs)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_matrix_figure(cm: np.ndarray, classes: list[str], title: str) -> Figure:
    """Row-normalised colours (recall), raw counts written in each cell."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=35, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    return fig


def compare_runs(curves: dict[str, list[tuple[int, float]]], metric: str) -> Figure:
    """One line per child run: ``metric`` per epoch, on one axis."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in sorted(curves.items()):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-", label=name)
    ax.set(title=f"{metric} per epoch, all runs of the study", xlabel="epoch", ylabel=metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def gallery(images: np.ndarray, true: list[str], predicted: list[str], scores: np.ndarray, title: str,
            columns: int = 5) -> Figure:
    """Tiles of (N, H, W, 3) uint8 images, each labelled with true/predicted class and score; a
    misclassified tile gets a red frame and a cross."""
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(images[i])
        wrong = true[i] != predicted[i]
        ax.set_title(f"{'✗ ' if wrong else ''}true {true[i]}\npred {predicted[i]}\nscore {scores[i]:.3f}",
                     fontsize=8, color="tab:red" if wrong else "black")
        for spine in ax.spines.values():
            spine.set_color("tab:red" if wrong else "0.7")
            spine.set_linewidth(4 if wrong else 1)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def activation_bars(rows: list[dict]) -> Figure:
    """% of non-positive activations per module (mean over images, error bar one std)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    names = [r["module"] for r in rows]
    ax.bar(names, [r["nonpos_pct_mean"] for r in rows], yerr=[r["nonpos_pct_std"] for r in rows],
           capsize=4, color="tab:purple")
    for i, r in enumerate(rows):
        ax.text(i, r["nonpos_pct_mean"] / 2, f"{r['nonpos_pct_mean']:.1f}%", ha="center", color="white", fontsize=9)
    ax.set(title=f"Non-positive activations per module (n={rows[0]['n_images'] if rows else 0} images)",
           ylabel="% of values <= 0", ylim=(0, 100))
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return fig


def eigen_spectra(spectra: dict[str, np.ndarray], module: str, top: int) -> Figure:
    """The ``top`` largest eigenvalues of the feature covariance, one line per data set, log scale."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in spectra.items():
        shown = np.clip(values[:top], 1e-12, None)
        share = values[0] / values.sum() if values.sum() > 0 else float("nan")
        ax.semilogy(np.arange(1, len(shown) + 1), shown, "o-", label=f"{name} (top-1 share {share:.2f})")
    ax.set(title=f"Eigen-spectrum of the feature covariance: {module}", xlabel="rank", ylabel="eigenvalue")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
