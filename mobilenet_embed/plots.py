"""Evaluation plots (matplotlib, drawn off-screen; no TensorFlow).

matplotlib is imported inside the functions, so importing this module stays light,
and the figures are drawn with the object API on an Agg canvas: no display is
needed and the pyplot global state (and its backend) is left untouched.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np


def _far_floor(fpr: np.ndarray, far: Optional[float]) -> float:
    """Left end of the log FAR axis: a decade below the smallest positive FAR, at most 1e-4."""
    values = [v for v in np.concatenate([fpr, [far if far is not None else 0.0]]) if v > 0]
    smallest = min(values) if values else 1e-4
    return min(1e-4, 10.0 ** math.floor(math.log10(smallest)))


def wrap_title(title: str, width: int = 60, max_lines: int = 3) -> str:
    """`title` in lines of at most `width` characters (long words, e.g. paths, broken too);
    beyond `max_lines`, the middle is elided with '...' so that start and end stay readable."""
    import textwrap

    lines = textwrap.wrap(title, width=width, break_long_words=True, break_on_hyphens=False) or [""]
    if len(lines) > max_lines:
        keep = max_lines * width - 3
        flat = " ".join(lines)
        lines = textwrap.wrap(flat[: keep // 2] + "..." + flat[-(keep - keep // 2):], width=width,
                              break_long_words=True, break_on_hyphens=False)[:max_lines]
    return "\n".join(lines)


def _fit_title(fig, ax, title: str) -> None:
    """Set a wrapped title, lay the figure out, and shrink the title's font until it lies
    inside the figure (a long run name or path would otherwise be cut off)."""
    text = ax.set_title(wrap_title(title))
    size = text.get_fontsize()
    for _ in range(8):
        fig.tight_layout()
        renderer = fig.canvas.get_renderer()
        box, frame = text.get_window_extent(renderer), fig.bbox
        if box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1:
            return
        size *= 0.85
        text.set_fontsize(size)


def plot_roc(
    fpr: Sequence[float],
    tpr: Sequence[float],
    path: str,
    operating_point: Optional[tuple[float, float]] = None,
    title: str = "ROC",
    auc: Optional[float] = None,
    eer: Optional[float] = None,
    far_target: Optional[float] = None,
) -> str:
    """Write the ROC curve (TPR over FAR, log FAR axis) as a PNG at `path`; return `path`.

    FAR values of 0 are drawn at the axis' left end (a decade below the smallest
    positive FAR, at most 1e-4). `operating_point` ``(far, val)`` (VAL@FAR) is marked;
    `auc` and `eer` go into the legend, `far_target` is drawn as a vertical line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if fpr.shape != tpr.shape or fpr.ndim != 1 or len(fpr) == 0:
        raise ValueError(f"fpr and tpr must be 1-D of the same length, received {fpr.shape} and {tpr.shape}")
    far = operating_point[0] if operating_point is not None else None
    floor = _far_floor(fpr, far)

    order = np.argsort(fpr, kind="stable")
    x = np.clip(fpr[order], floor, 1.0)
    y = tpr[order]

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    label = "ROC"
    extras = []
    if auc is not None:
        extras.append(f"AUC {auc:.4f}")
    if eer is not None:
        extras.append(f"EER {eer:.4f}")
    if extras:
        label += " (" + ", ".join(extras) + ")"
    ax.plot(x, y, color="tab:blue", linewidth=1.8, label=label)
    chance = np.logspace(math.log10(floor), 0, 200)
    ax.plot(chance, chance, color="grey", linestyle=":", linewidth=1, label="chance")
    if far_target is not None and far_target > 0:
        ax.axvline(max(far_target, floor), color="tab:red", linestyle="--", linewidth=1,
                   label=f"FAR target {far_target:g}")
    if operating_point is not None:
        op_far, op_val = operating_point
        ax.plot([max(op_far, floor)], [op_val], marker="o", markersize=8, color="tab:red",
                linestyle="none", label=f"VAL {op_val:.4f} @ FAR {op_far:.5f}")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR / VAL)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    _fit_title(fig, ax, title)
    folder = os.path.dirname(os.path.abspath(str(path)))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(str(path), format="png")
    return str(path)


def plot_roc_from_metrics(metrics: dict, path: str, title: str = "ROC") -> str:
    """`plot_roc` with the curve, operating point, AUC and EER of `verification_metrics`' dict."""
    return plot_roc(
        metrics["fpr"], metrics["tpr"], path,
        operating_point=(metrics["far"], metrics["val"]),
        title=title, auc=metrics.get("auc"), eer=metrics.get("eer"),
        far_target=metrics.get("far_target"),
    )
