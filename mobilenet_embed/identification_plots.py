"""CMC and DET curves of the identification protocol as PNG (matplotlib, off-screen Agg canvas)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    fig.savefig(str(path), format="png")
    return str(path)


def plot_cmc(cmc: Sequence[float], path: str, title: str = "CMC", max_rank: int = 50) -> str:
    """Identification rate over rank 1..max_rank (closed set) as a PNG at `path`."""
    cmc = np.asarray(cmc, dtype=np.float64)[:max_rank]
    ranks = np.arange(1, len(cmc) + 1)
    fig, ax = _figure()
    ax.plot(ranks, cmc, marker="o", markersize=3, linewidth=1.5, color="tab:blue",
            label=f"rank-1 {cmc[0]:.3f}" + (f", rank-5 {cmc[4]:.3f}" if len(cmc) >= 5 else ""))
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_ylim(0.0, 1.01)
    ax.set_xlim(1, max(len(cmc), 2))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def plot_det(fpir: Sequence[float], fnir: Sequence[float], path: str, title: str = "DET",
             points: Optional[list] = None) -> str:
    """FNIR over FPIR (log-log; zeros drawn at a decade below the smallest positive value), with
    the `points` of `dir_at_fpir` marked."""
    fpir, fnir = np.asarray(fpir, np.float64), np.asarray(fnir, np.float64)
    positive = fpir[fpir > 0]
    floor = 10.0 ** np.floor(np.log10(positive.min())) / 10 if len(positive) else 1e-3
    yfloor = 10.0 ** np.floor(np.log10(fnir[fnir > 0].min())) / 10 if np.any(fnir > 0) else 1e-3
    fig, ax = _figure()
    ax.step(np.clip(fpir, floor, 1), np.clip(fnir, yfloor, 1), where="post", color="tab:blue", linewidth=1.5,
            label="open-set search (rank 1)")
    for p, colour in zip(points or [], ("tab:red", "tab:orange", "tab:green", "tab:purple")):
        ax.plot([max(p["fpir"], floor)], [max(1 - p["dir"], yfloor)], "o", color=colour, markersize=6,
                label=f"DIR {p['dir']:.3f} @ FPIR {p['fpir']:.4f} (target {p['fpir_target']:g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(yfloor, 1.05)
    ax.set_xlabel("false positive identification rate (FPIR)")
    ax.set_ylabel("false negative identification rate (FNIR = 1 - DIR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    return _save(fig, path)
