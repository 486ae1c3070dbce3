"""The PNG figures of a training run and an evaluation, drawn with matplotlib's Agg canvas.

Figures are built on ``matplotlib.figure.Figure`` objects, never through ``pyplot``, so nothing
depends on (or changes) pyplot's global state or the user's display backend.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

__all__ = [
    "TOP_BOTTOM",
    "CONFUSION_MAX_CLASSES",
    "confusion_matrix",
    "plot_confusion",
    "plot_per_class_accuracy",
    "plot_recall_at_k",
    "plot_train_curves",
    "per_class_accuracy",
    "read_train_log",
]

PathLike = Union[str, os.PathLike]

# Above this many classes a confusion matrix is unreadable; the report lists confused pairs instead.
CONFUSION_MAX_CLASSES = 50
# With more classes than 2 * TOP_BOTTOM the per-class plot shows only the best and the worst this many.
TOP_BOTTOM = 25
DPI = 100


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    # No software/date metadata: the same inputs give the same bytes (``paddlemix.report`` reruns compare).
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    return path


# ----------------------------------------------------------------------------- classification


def per_class_accuracy(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """(top-1 accuracy per class, samples per class); NaN accuracy for classes without samples."""
    labels = np.asarray(labels, dtype=np.int64)
    hits = np.bincount(labels, weights=(np.asarray(predicted) == labels).astype(np.float64), minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    return acc, counts


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return cm


def per_class_order(acc: np.ndarray) -> np.ndarray:
    """Class indices from best to worst accuracy (ties by class index); classes without samples last."""
    key = np.where(np.isnan(acc), np.inf, -acc)
    return np.lexsort((np.arange(len(acc)), key))


def plot_per_class_accuracy(acc: np.ndarray, counts: np.ndarray, classnames: Sequence[str], path: PathLike,
                            title: str = "") -> Path:
    """Horizontal bars, best class on top; with more than ``2 * TOP_BOTTOM`` classes the best and worst 25."""
    order = [int(i) for i in per_class_order(acc) if counts[i] > 0]
    panels: List[Tuple[str, List[int]]]
    if len(order) > 2 * TOP_BOTTOM:
        panels = [(f"best {TOP_BOTTOM} of {len(order)} classes", order[:TOP_BOTTOM]),
                  (f"worst {TOP_BOTTOM} of {len(order)} classes", order[-TOP_BOTTOM:])]
    else:
        panels = [(f"{len(order)} classes", order)]
    rows = max(len(p[1]) for p in panels)
    label_width = min(max((len(str(classnames[i])) for i in order), default=8), 40)
    fig = Figure(figsize=(2.0 + 0.07 * label_width + 4.5 * len(panels), 1.4 + 0.26 * rows))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (subtitle, idx) in zip(axes, panels):
        values = 100.0 * np.array([acc[i] for i in idx])
        y = np.arange(len(idx))
        colors = [(0.80, 0.25, 0.20) if v < 50 else (0.90, 0.60, 0.15) if v < 80 else (0.20, 0.55, 0.30)
                  for v in values]
        ax.barh(y, values, color=colors)
        ax.set_yticks(y, [_short(str(classnames[i]), 40) for i in idx], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("top-1 accuracy (%)")
        ax.set_title(subtitle, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        for yi, v, i in zip(y, values, idx):
            label = f"{v:.0f}% (n={int(counts[i])})"
            if v > 75:  # inside the bar, where there is room
                ax.text(v - 1, yi, label, va="center", ha="right", fontsize=7, color="white")
            else:
                ax.text(v + 1, yi, label, va="center", ha="left", fontsize=7)
    fig.suptitle(title or "Zero-shot top-1 accuracy per class")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, classnames: Sequence[str], path: PathLike, title: str = "") -> Path:
    """Row-normalised confusion matrix (share of each true class), counts written in when readable."""
    n = cm.shape[0]
    if n > CONFUSION_MAX_CLASSES:
        raise ValueError(f"a confusion plot of {n} classes is unreadable (max {CONFUSION_MAX_CLASSES}); "
                         "use the most-confused-pairs table instead")
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, np.maximum(rows, 1), dtype=np.float64)
    side = min(max(4.5, 0.32 * n + 2.5), 18.0)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    names = [_short(str(c), 24) for c in classnames]
    ticks = np.arange(n)
    font = 8 if n <= 25 else 6
    ax.set_xticks(ticks, names, rotation=90, fontsize=font)
    ax.set_yticks(ticks, names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 20:
        for t in range(n):
            for p in range(n):
                if cm[t, p]:
                    ax.text(p, t, str(int(cm[t, p])), ha="center", va="center", fontsize=7,
                            color="white" if share[t, p] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title or "Zero-shot confusion matrix")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- retrieval


def plot_recall_at_k(metrics: Dict[str, float], path: PathLike, title: str = "") -> Path:
    """recall@k of both directions against k, from ``{image,text}_retrieval_recall@k`` metrics."""
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.subplots()
    for prefix, label, marker, dy in (("image_retrieval_recall@", "text → image", "o", 6),
                                      ("text_retrieval_recall@", "image → text", "s", -11)):
        points = sorted((int(k[len(prefix):]), v) for k, v in metrics.items()
                        if k.startswith(prefix) and v is not None)
        if points:
            ks, values = zip(*points)
            ax.plot(ks, [100.0 * v for v in values], marker=marker, label=label)
            for k, v in points:
                ax.annotate(f"{100 * v:.1f}", (k, 100 * v), textcoords="offset points", xytext=(0, dy),
                            ha="center", fontsize=7)
    ax.set_xscale("log")
    ks_all = sorted({int(k.split("@")[1]) for k in metrics if "_recall@" in k})
    if ks_all:
        ax.set_xticks(ks_all, [str(k) for k in ks_all])
        ax.minorticks_off()
    ax.set_ylim(0, 105)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "Zero-shot retrieval recall@k", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- training


def read_train_log(path: PathLike) -> Dict[str, List[Tuple[int, float]]]:
    """Series ``{key: [(step, value), ...]}`` from ``train_log.jsonl``, sorted by step.

    A resumed run appends the steps after its checkpoint again; the later line wins.
    """
    series: Dict[str, Dict[int, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            entry = json.loads(line)
            step = int(entry.get("step", 0))
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    series.setdefault(key, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def _series(ax, series, key, label, scale=1.0, **kw) -> bool:
    points = series.get(key)
    if not points:
        return False
    steps, values = zip(*points)
    ax.plot(steps, [scale * v for v in values], label=label, **kw)
    return True


def _single(ax, series, key, what, color, title, ylabel) -> bool:
    """One series in its own panel; says so when the log has none."""
    ok = _series(ax, series, key, what, color=color)
    if not ok:
        _empty(ax, what)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return ok


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="0.5")


def _log_if_wide(ax, series, key) -> None:
    values = [v for _, v in series.get(key, []) if v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.2, 3, 40 rather than 2x10^-1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)


def plot_train_curves(log_path: PathLike, path: PathLike, title: Optional[str] = None) -> Path:
    """Loss, learning rate, logit scale (and bias), zero-shot accuracy, throughput and skips against step."""
    s = read_train_log(log_path)
    fig = Figure(figsize=(14.0, 7.5))
    axes = fig.subplots(2, 3).ravel()

    if _single(axes[0], s, "loss", "loss", "C0", "contrastive loss", "loss"):
        _log_if_wide(axes[0], s, "loss")
    if _single(axes[1], s, "learning_rate", "learning rate", "C1", "learning rate", "learning rate"):
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    ax = axes[2]
    has_scale = _series(ax, s, "logit_scale", "logit scale (exp)", color="C2")
    ax.set_ylabel("logit scale")
    if has_scale:
        _log_if_wide(ax, s, "logit_scale")
    if s.get("logit_bias"):
        twin = ax.twinx()
        _series(twin, s, "logit_bias", "logit bias", color="C3", linestyle="--")
        twin.set_ylabel("logit bias")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
    elif not has_scale:
        _empty(ax, "logit scale")
    ax.set_title("temperature")

    ax = axes[3]
    got = [_series(ax, s, key, label, scale=100.0, marker="o", color=color)
           for key, label, color in (("eval_acc1", "top-1", "C4"), ("eval_acc5", "top-5", "C5"))]
    if any(got):
        ax.set_ylim(0, 103)  # room for markers at 100%
        ax.legend(fontsize=8, loc="lower right")
    else:
        _empty(ax, "zero-shot evaluation")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title("zero-shot accuracy")

    _single(axes[4], s, "samples_per_second", "throughput", "C6", "throughput", "samples / s (all ranks)")

    ax = axes[5]
    reasons = sorted(k for k in s if k.startswith("skipped_") and k != "skipped_samples")
    if reasons:
        for i, key in enumerate(reasons):
            _series(ax, s, key, key[len("skipped_"):], color=f"C{(7 + i) % 10}")
        ax.legend(fontsize=8, loc="upper left")
    elif not _series(ax, s, "skipped_samples", "skipped", color="C7"):
        _empty(ax, "skip count")
    if not any(v for key in reasons + ["skipped_samples"] for _, v in s.get(key, [])):
        ax.text(0.5, 0.5, "no samples skipped", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    ax.set_ylabel("skipped samples (cumulative, rank 0)")
    ax.set_title("skipped samples")

    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"Training curves: {Path(log_path).parent.name}")
    fig.tight_layout()
    return _save(fig, path)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
