"""PNG figures with matplotlib's Agg canvas (no pyplot, no global state), written atomically.

Sizes are fixed in inches at ``DPI`` (no tight cropping), so a figure's pixel size depends only
on its content's shape: ``confusion_size``, ``CURVES_SIZE``, ``strip_size``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from volclf import runs
from volclf.report.stats import Summary

DPI = 100
CURVES_SIZE = (12.0, 8.0)
CURVE_PANELS = (("train_loss", "train loss"), ("val_loss", "val loss"), ("train_acc", "train accuracy"),
                ("val_acc", "val accuracy"))
ANNOTATE_MAX_CLASSES = 20  # beyond this, numbers in the cells are unreadable


def colors(archs: list[str]) -> dict[str, str]:
    """One colour per architecture, the same in every figure."""
    cycle = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    return {a: cycle[i % len(cycle)] for i, a in enumerate(archs)}


def confusion_size(num_classes: int) -> tuple[float, float]:
    side = max(5.0, 0.4 * num_classes + 2.0)
    return (2 * side + 1.0, side)


def strip_size(num_archs: int) -> tuple[float, float]:
    return (max(6.0, 2.0 + 1.5 * num_archs), 5.0)


def confusion_figure(path: Path, arch: str, classes: list[str], counts: np.ndarray, n_runs: int) -> Path:
    """Summed counts and row-normalized rates side by side; rows are the true class."""
    fig = Figure(figsize=confusion_size(len(classes)), dpi=DPI, layout="constrained")
    support = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, support, out=np.zeros(counts.shape, dtype=float), where=support > 0)
    raw_ax, norm_ax = fig.subplots(1, 2)
    for ax, values, top, title, text in (
        (raw_ax, counts, max(float(counts.max()), 1.0), f"{arch}: counts summed over {n_runs} completed run(s)",
         lambda v: f"{int(v)}"),
        # One fixed scale for rates, so the architectures' figures compare at a glance.
        (norm_ax, rates, 1.0, f"{arch}: row-normalized (recall on the diagonal)", lambda v: f"{v:.2f}"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=top)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ticks = np.arange(len(classes))
        ax.set_xticks(ticks, classes, rotation=45 if max(map(len, classes)) > 4 else 0, ha="right")
        ax.set_yticks(ticks, classes)
        if len(classes) <= ANNOTATE_MAX_CLASSES:
            cut = top / 2
            for (i, j), v in np.ndenumerate(values):
                ax.text(j, i, text(v), ha="center", va="center", fontsize=8,
                        color="white" if v > cut else "black")
    return _save(fig, path)


def learning_curves_figure(path: Path, curves: dict[str, list[list[dict]]]) -> Path:
    """Mean over runs per epoch with a ±1 std band, one colour per architecture."""
    fig = Figure(figsize=CURVES_SIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    palette = colors(list(curves))
    columns = {arch: _columns(arch_curves) for arch, arch_curves in curves.items()}
    for ax, (key, title) in zip(axes.flat, CURVE_PANELS):
        for arch, arch_curves in curves.items():
            epochs, mean, std, count = _aggregate(columns[arch], key)
            if not len(epochs):
                continue
            ax.plot(epochs, mean, color=palette[arch], label=f"{arch} (n={len(arch_curves)})")
            band = count >= 2
            ax.fill_between(epochs, mean - std, mean + std, where=band, color=palette[arch], alpha=0.2, linewidth=0)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0, 0].set_ylabel("loss")
    axes[1, 0].set_ylabel("accuracy")
    if any(ax.get_legend_handles_labels()[0] for ax in axes.flat):
        axes[0, 1].legend(title="mean ± 1 std over completed runs", fontsize=9)
    return _save(fig, path)


def strip_figure(path: Path, metric: str, values: dict[str, list[float]], summaries: dict[str, Summary],
                 reported: dict[str, float]) -> Path:
    """Every completed run as a dot, the mean with its 95% interval, and the reported figure."""
    archs = list(values)
    fig = Figure(figsize=strip_size(len(archs)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    palette = colors(archs)
    labelled: set[str] = set()

    def label(name: str) -> str | None:
        """The legend entry, the first time only."""
        if name in labelled:
            return None
        labelled.add(name)
        return name

    for i, arch in enumerate(archs):
        y = np.asarray(values[arch], dtype=float)
        x = i + np.linspace(-0.12, 0.12, len(y)) if len(y) > 1 else np.full(len(y), float(i))
        ax.scatter(x, y, color=palette[arch], s=40, alpha=0.8, zorder=3, label=label("completed run"))
        s = summaries[arch]
        if s.mean is not None:
            if s.ci_low is not None:
                ax.errorbar(i + 0.3, s.mean, yerr=[[s.mean - s.ci_low], [s.ci_high - s.mean]], fmt="o", color="black",
                            capsize=5, zorder=3, label=label("mean and 95% CI"))
            else:
                ax.plot(i + 0.3, s.mean, "o", color="black", zorder=3, label=label("mean and 95% CI"))
        if arch in reported:
            ax.plot(i - 0.3, reported[arch], "D", mfc="none", mec="tab:red", ms=8, zorder=3,
                    label=label("reported (group's data, not this campaign)"))
    ax.set_xticks(range(len(archs)), [f"{a}\n(n={len(values[a])})" for a in archs])
    ax.set_xlim(-0.7, len(archs) - 0.3)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per completed run")
    ax.grid(axis="y", alpha=0.3)
    if labelled:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _columns(curves: list[list[dict]]) -> dict[str, np.ndarray]:
    """All rows of an architecture's curves as float columns (NaN where a value is missing)."""
    rows = [row for curve in curves for row in curve]
    out = {}
    for key in ("epoch", *(k for k, _ in CURVE_PANELS)):
        try:
            out[key] = np.array([row.get(key) for row in rows], dtype=np.float64)
        except (TypeError, ValueError):  # a stray text value: keep the numbers only
            out[key] = np.array([v if isinstance(v, (int, float)) else np.nan for v in (r.get(key) for r in rows)],
                                dtype=np.float64)
    return out


def _aggregate(columns: dict[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch: mean, sample std (0 where fewer than 2 runs) and the number of runs."""
    epoch, value = columns["epoch"], columns[key]
    keep = np.isfinite(epoch) & (epoch >= 0) & np.isfinite(value)
    epoch, value = epoch[keep].astype(np.int64), value[keep]
    count = np.bincount(epoch)
    seen = np.flatnonzero(count)
    mean = np.bincount(epoch, value) / np.maximum(count, 1)
    squares = np.bincount(epoch, (value - mean[epoch]) ** 2) if len(epoch) else np.zeros(0)
    std = np.sqrt(np.divide(squares, count - 1, out=np.zeros(len(count)), where=count > 1))
    return seen, mean[seen], std[seen], count[seen]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    runs.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI), mode="wb")
    return path
