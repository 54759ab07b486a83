"""PNG plots of verification results (matplotlib, Agg canvas, no pyplot global state).

Figures are built with ``matplotlib.figure.Figure`` and saved directly, so the module is safe to
use from threads, tests and headless machines and never opens a window.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str) -> str:
    """ROC curves, TAR against FAR on a log axis, one line per name (e.g. untrained vs trained).

    Args:
      curves: name -> (far [T], tar [T]) from ``verification.roc_curve``.
      path: PNG to write.
    """
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    floor = 1.0
    for name, (far, tar) in curves.items():
        far, tar = np.asarray(far, float), np.asarray(tar, float)
        pos = far[far > 0]
        if len(pos):
            floor = min(floor, pos.min())
        # FAR = 0 cannot sit on a log axis; the curve starts at the smallest reachable FAR.
        keep = far > 0
        ax.plot(far[keep], tar[keep], label=name)
    ax.set_xscale("log")
    ax.set_xlim(max(floor, 1e-5), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_distance_histograms(
    distances: np.ndarray, issame: np.ndarray, threshold: float, path: str
) -> str:
    """Histograms of same-pair and different-pair distances, with the decision threshold."""
    d, y = np.asarray(distances, float), np.asarray(issame, bool)
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    bins = np.linspace(d.min(), d.max(), 50) if d.max() > d.min() else 10
    ax.hist(d[y], bins=bins, alpha=0.6, density=True, label=f"same ({int(y.sum())})")
    ax.hist(d[~y], bins=bins, alpha=0.6, density=True, label=f"different ({int((~y).sum())})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("distance")
    ax.set_ylabel("density")
    ax.legend()
    return _save(fig, path)


def plot_embeddings_2d(
    embeddings: np.ndarray, labels: np.ndarray, path: str, max_identities: int = 10
) -> str:
    """2-D PCA projection of the embeddings of the first ``max_identities`` identities.

    Args:
      embeddings: [N, D]; labels: [N] identity of each row (the smallest ids are shown).
    """
    from sklearn.decomposition import PCA

    e, lab = np.asarray(embeddings, float), np.asarray(labels)
    shown = np.unique(lab)[:max_identities]
    m = np.isin(lab, shown)
    e, lab = e[m], lab[m]
    n_comp = min(2, e.shape[0], e.shape[1])
    xy = PCA(n_components=n_comp).fit_transform(e) if n_comp else np.zeros((len(e), 2))
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    fig = Figure(figsize=(5.0, 5.0))
    ax = fig.add_subplot()
    for u in shown:
        k = lab == u
        ax.scatter(xy[k, 0], xy[k, 1], s=12, label=str(u))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize="small", markerscale=1.5, loc="best", title="identity")
    return _save(fig, path)


def plot_group_bars(values: Mapping[str, float], path: str, ylabel: str) -> str:
    """One bar per group (e.g. accuracy or FAR per demographic group); None values are skipped."""
    items = [(k, float(v)) for k, v in values.items() if v is not None]
    fig = Figure(figsize=(max(4.0, 0.7 * len(items) + 1.5), 4.0))
    ax = fig.add_subplot()
    names = [k for k, _ in items]
    heights = [v for _, v in items]
    ax.bar(range(len(items)), heights)
    ax.set_xticks(range(len(items)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    for x, h in enumerate(heights):
        ax.text(x, h, f"{h:.3g}", ha="center", va="bottom", fontsize="small")
    return _save(fig, path)
