"""Draw: training history (and, later, privacy audits)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from .model import FederatedModel

__all__ = ["history"]

_LABELS = {
    "train_loss": "local training loss",
    "val_loss": "validation loss (global model)",
    "val_accuracy": "validation accuracy (global model)",
}


def history(
    model: FederatedModel,
    *,
    metrics: Sequence[str] = ("train_loss", "val_accuracy"),
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> list[Axes]:
    """Per-round curves of a federated training run, one line per site, the selected round dashed.

    Parameters
    ----------
    model
        A trained model (its ``history``).
    metrics
        History columns to draw, one panel each.
    ax
        Axes to draw into, one per metric; new ones by default.
    show
        Show the figure (default: only when no ``ax`` and not saving, as in scanpy).
    save
        File to write the figure to.

    Returns
    -------
    The Axes, one per metric.
    """
    frame = model.history
    if frame.empty:
        raise ValueError("This model has no training history to draw.")
    missing = [m for m in metrics if m not in frame]
    if missing:
        raise ValueError(f"History has no column {missing}; available: {', '.join(frame.columns)}.")
    if ax is None:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        axes = list(axes[0])
    else:
        axes = [ax] if isinstance(ax, Axes) else list(ax)
        if len(axes) != len(metrics):
            raise ValueError(f"Got {len(axes)} Axes for {len(metrics)} metrics.")
        fig = axes[0].figure
    best_round = model.params.get("best_round")
    for axis, metric in zip(axes, metrics, strict=True):
        for site, rows in frame.groupby("site", sort=False):
            rows = rows[np.isfinite(rows[metric].to_numpy(dtype=float))]
            axis.plot(rows["round"], rows[metric], marker="o", markersize=3, label=str(site))
        if best_round:
            axis.axvline(best_round, color="0.5", linestyle="--", linewidth=1, label="selected round")
        axis.set_xlabel("round")
        axis.set_ylabel(_LABELS.get(metric, metric))
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize="small", frameon=False)
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show or (show is None and ax is None and save is None and plt.isinteractive()):
        plt.show()
    return axes
