"""Figures a person would rather look at than read. Each function returns a matplotlib Figure."""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sceneml.class_keys import class_keys  # noqa: E402

# one style per metric, so lines that coincide (val_acc and val_mean_class_acc on balanced data) stay visible
_STYLES = [dict(marker="o", ls="-", lw=2.5, alpha=0.8), dict(marker="s", ls="--", lw=1.8),
           dict(marker="^", ls=":", lw=1.5)]


# PNG at zlib level 1 (PIL's default is 6): a gallery of ten photos encodes 2.2x faster, its file 7 % larger
PNG_OPTIONS = {"pil_kwargs": {"compress_level": 1}}


def tight(fig: Figure) -> None:
    """``fig.tight_layout()``, once. It leaves a placeholder layout engine on the figure, and savefig draws
    a figure that has one twice; the layout is done, so drop it (the same pixels, one draw fewer)."""
    fig.tight_layout()
    fig.set_layout_engine(None)


def score_text(value: float) -> str:
    """A score with enough digits to rank: 0.973, but 0.99994 rather than 1.000."""
    if not np.isfinite(value) or value <= 0.999:
        return f"{value:.3f}"
    significant = min(8, int(np.ceil(-np.log10(max(1.0 - value, 1e-8)))))
    return f"{value:.{max(significant, 4)}g}"


def loss_curves(history: list[dict], batch_losses: list[tuple[int, float]] | None = None, label: str = "") -> Figure:
    """Train/val loss per epoch, and (right panel) the loss of every batch; ``label`` names the run."""
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
    if label:
        fig.suptitle(label)
    tight(fig)
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
    tight(fig)
    return fig


def metric_curves(history: list[dict], keys: list[str], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for key, style in zip(keys, _STYLES * len(keys)):
        ax.plot(epochs, [h[key] for h in history], label=key, **style)
    ax.set(title=title, xlabel="epoch", ylabel="score", ylim=(0, 1.02))
    ax.set_xticks(epochs)
    ax.legend()
    ax.grid(alpha=0.3)
    tight(fig)
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
    tight(fig)
    return fig


def compare_runs(curves: dict[str, list[tuple[int, float]]], metric: str, title: str = "", ax=None) -> Figure:
    """One line per child run: ``metric`` per epoch, on one axis (integer epoch ticks)."""
    owned = ax is None
    fig, ax = plt.subplots(figsize=(7, 4)) if ax is None else (ax.figure, ax)
    for name, points in sorted(curves.items()):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-", label=name)
    ax.set(title=title or f"{metric} per epoch, all runs of the study", xlabel="epoch", ylabel=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    if owned:  # a panel of a larger figure is laid out with it
        tight(fig)
    return fig


def compare_losses(histories: dict[str, list[tuple[int, float, float]]], title: str, ax=None) -> Figure:
    """Train (dashed) and val (solid) loss per epoch of every child run, one colour per run."""
    owned = ax is None
    fig, ax = plt.subplots(figsize=(7, 4)) if ax is None else (ax.figure, ax)
    for i, (name, rows) in enumerate(sorted(histories.items())):
        if rows:
            epochs, train, val = zip(*rows)
            ax.plot(epochs, val, "o-", color=f"C{i}", label=f"{name} val")
            ax.plot(epochs, train, "s--", color=f"C{i}", alpha=0.6, label=f"{name} train")
    ax.set(title=title, xlabel="epoch", ylabel="cross-entropy loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if owned:  # a panel of a larger figure is laid out with it
        tight(fig)
    return fig


def study_curves(curves: dict[str, list[tuple[int, float]]], metric: str,
                 losses: dict[str, list[tuple[int, float, float]]], title: str) -> Figure:
    """:func:`compare_runs` and :func:`compare_losses` side by side: the optimizers at one glance."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    compare_runs(curves, metric, f"{metric} per epoch", ax=left)
    compare_losses(losses, "Train (dashed) and val (solid) loss per epoch", ax=right)
    fig.suptitle(title)
    tight(fig)
    return fig


def repeated_configurations(values: dict[str, list[float]], intervals: dict[str, tuple[float, float]],
                            curves: dict[str, list[list[tuple[int, float]]]], metric: str, title: str) -> Figure:
    """Left: each configuration's repeats as dots (best-first order of ``values``), its mean as a bar and
    its 95 % interval as a line. Right: the repeats' val curves per configuration, the mean per epoch
    as a line and the range of the repeats (min to max) as a band."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    rng = np.random.default_rng(0)  # the horizontal jitter of the dots only
    for i, (config, vals) in enumerate(values.items()):
        color = f"C{i % 10}"
        left.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, color=color, alpha=0.7, zorder=3)
        left.hlines(np.mean(vals), i - 0.25, i + 0.25, color=color, lw=2.5, zorder=4)
        low, high = intervals.get(config, (np.nan, np.nan))
        if np.isfinite(low) and np.isfinite(high):
            left.vlines(i + 0.3, low, high, color=color, lw=1.5)
        by_step: dict[int, list[float]] = {}
        for curve in curves.get(config, []):
            for step, v in curve:
                by_step.setdefault(step, []).append(v)
        steps = sorted(by_step)
        if steps:
            mean = [np.mean(by_step[s]) for s in steps]
            right.plot(steps, mean, "o-", color=color, label=f"{config} ({len(vals)} repeats)")
            right.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                               color=color, alpha=0.2)
    left.set_xticks(range(len(values)), list(values), rotation=20, ha="right")
    left.set(title="each repeat's best epoch (dots), the mean (bar)\nand its 95 % interval (line)", ylabel=metric)
    left.grid(alpha=0.3, axis="y")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set(title="per epoch: the mean of the repeats (line)\nand their range (band)", xlabel="epoch", ylabel=metric)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(title)
    tight(fig)
    return fig


def reliability_diagram(bins: list[dict], ece: float, title: str) -> Figure:
    """Accuracy against mean confidence per confidence bin (bars), the diagonal of perfect
    calibration, and the share of images per bin (right panel); ``bins`` from ``metrics.reliability_bins``."""
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    width = bins[0]["hi"] - bins[0]["lo"]
    lo = np.array([b["lo"] for b in bins])
    acc = np.array([b["accuracy"] for b in bins])
    conf = np.array([b["confidence"] for b in bins])
    filled = ~np.isnan(acc)
    ax.bar(lo[filled], acc[filled], width=width, align="edge", color="tab:blue", edgecolor="white", label="accuracy")
    ax.bar(lo[filled], (conf - acc)[filled], bottom=acc[filled], width=width, align="edge", color="tab:red",
           alpha=0.35, edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(title=f"Reliability (ECE = {ece:.3f}, {len(bins)} bins)", xlabel="top-1 confidence",
           ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    counts = np.array([b["count"] for b in bins], dtype=float)
    hist.bar(lo, counts / max(counts.sum(), 1), width=width, align="edge", color="0.5", edgecolor="white")
    hist.set(title="Images per bin", xlabel="top-1 confidence", ylabel="share of images", xlim=(0, 1))
    fig.suptitle(title)
    tight(fig)
    return fig


def gallery(images: list[np.ndarray], true: list[str], predicted: list[str], scores: np.ndarray, title: str,
            columns: int = 5, heatmaps: list[np.ndarray] | None = None) -> Figure:
    """Tiles of (H, W, 3) uint8 images of any size (the original photos), each labelled with the
    predicted class and its score (the true class, shared by the page, is in the title); a
    misclassified tile gets a red frame and a cross. With ``heatmaps`` (Grad-CAM maps in [0, 1], any
    size) each is stretched over its photo and the tile names the true class too.

    All tiles are drawn on one Axes, each photo fitted into its cell at its own aspect ratio: an Axes
    per tile (its ticks, spines and layout) cost more to set up and draw than the photo it holds, and
    analyze draws dozens of these pages."""
    n = len(images)
    columns = max(1, min(columns, n))  # a short gallery draws no empty cells
    rows = max(1, -(-n // columns))
    width = 2.4 * columns
    # the title wrapped to the page (about 10 characters an inch at the suptitle's 12 pt): a gallery of one
    # or two photos is narrower than its title, which would be cut at both edges
    lines = [part for line in title.splitlines() for part in textwrap.wrap(line, int(width * 10)) or [""]]
    band = 0.2 + 0.2 * len(lines)  # the suptitle's band, in inches: a 12 pt line and a margin
    fig = plt.figure(figsize=(width, 2.9 * rows + band))
    top = 1 - band / (2.9 * rows + band)
    ax = fig.add_axes((0.0, 0.0, 1.0, top))
    ax.axis("off")
    cell_h = 2.9 / 2.4  # a cell's height in cell widths
    # the box a photo is fitted into: the cell's width less a margin for the frame, and the lowest 83 %
    # of its height (the label sits above) less a margin
    box_w, box_h = 0.9, 0.83 * 0.92 * cell_h
    for i in range(n):
        h, w = images[i].shape[:2]
        scale = min(box_w / w, box_h / h)
        x0 = i % columns + (1 - w * scale) / 2
        y0 = (i // columns + 1) * cell_h - 0.04 - h * scale
        extent = (x0, x0 + w * scale, y0 + h * scale, y0)
        ax.imshow(images[i], extent=extent, interpolation="antialiased")
        if heatmaps is not None:
            ax.imshow(heatmaps[i], cmap="jet", alpha=0.45, extent=extent, vmin=0, vmax=1, interpolation="bilinear")
        wrong = true[i] != predicted[i]
        label = f"{'✗ ' if wrong else ''}pred {predicted[i]}\nscore {score_text(float(scores[i]))}"
        if heatmaps is not None:
            label = f"true {true[i]}\n{label}"
        ax.add_patch(plt.Rectangle((extent[0], extent[3]), w * scale, h * scale, fill=False,
                                   edgecolor="tab:red" if wrong else "0.7", linewidth=4 if wrong else 1))
        ax.text((extent[0] + extent[1]) / 2, extent[3] - 0.03, label, ha="center", va="bottom", fontsize=8,
                color="tab:red" if wrong else "black")
    ax.set(xlim=(0, columns), ylim=(rows * cell_h, 0))  # after the images: imshow fits the limits to each
    fig.suptitle("\n".join(lines))
    return fig


def activation_bars(rows: list[dict], title: str = "") -> Figure:
    """% of non-positive activations per module, one bar per data set (mean over images, error bar one std)."""
    modules = list(dict.fromkeys(r["module"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    width = 0.8 / max(len(datasets), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(modules)), 4.5))
    for j, name in enumerate(datasets):
        by_module = {r["module"]: r for r in rows if r["dataset"] == name}
        xs = [i + (j - (len(datasets) - 1) / 2) * width for i in range(len(modules))]
        ax.bar(xs, [by_module[m]["nonpos_pct_mean"] if m in by_module else np.nan for m in modules], width,
               yerr=[by_module[m]["nonpos_pct_std"] if m in by_module else 0 for m in modules], capsize=3,
               label=f"{name} (n={next(iter(by_module.values()))['n_images'] if by_module else 0})")
    ax.set_xticks(range(len(modules)), modules, rotation=20)
    ax.set(title=title or "Non-positive activations per module", ylabel="% of values <= 0", ylim=(0, 100))
    ax.legend(fontsize=8)
    tight(fig)
    return fig


def eigen_spectra(spectra: dict[str, np.ndarray], module: str, top: int, title: str = "") -> Figure:
    """The ``top`` largest eigenvalues of the feature covariance, one line per data set, log scale. A
    set of n images has at most n - 1 non-zero eigenvalues: only those are given, and the legend says so."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in spectra.items():
        shown = values[:top]
        share = values[0] / values.sum() if values.sum() > 0 else float("nan")
        note = f", only {len(values)} (fewer images than {top})" if len(values) < top else ""
        ax.semilogy(np.arange(1, len(shown) + 1), shown, "o-", label=f"{name} (top-1 share {share:.2f}{note})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title or f"Eigen-spectrum of the feature covariance: {module}", xlabel="rank", ylabel="eigenvalue")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    tight(fig)
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)


def class_figures(split: str, metrics: dict[str, float], cm, classes: list[str], caption: str,
                  what: str = "") -> dict[str, object]:
    """The figures of one split's scores, by artifact name: confusion matrix, per-class average
    precision and per-class accuracy (``what`` says which epoch or model, e.g. "best epoch 3")."""
    where = f"{split}, {what}" if what else split
    n = int(cm.sum())
    keys = class_keys(classes)
    return {
        f"figures/{split}_confusion_matrix.png": confusion_matrix_figure(
            cm, classes, f"Confusion matrix ({where}, n={n})\n{caption}"),
        f"figures/{split}_per_class_ap.png": per_class_bars(
            {c: metrics[f"{split}_ap_{k}"] for c, k in zip(classes, keys)},
            f"Per-class average precision ({where})\n{caption}",
            "average precision", "mAP"),
        f"figures/{split}_per_class_acc.png": per_class_bars(
            {c: metrics[f"{split}_acc_{k}"] for c, k in zip(classes, keys)}, f"Per-class accuracy ({where})\n{caption}",
            "accuracy (recall)", "mean class acc"),
    }
