"""Draw: training history, privacy audits, reconstructions, perturbation effects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from .model import FederatedModel
from .privacy.metrics import pearson

__all__ = ["history", "perturbation", "privacy", "reconstruction"]

_LABELS = {
    "train_loss": "local training loss",
    "val_loss": "validation loss (global model)",
    "val_accuracy": "validation accuracy (global model)",
}


def _panels(
    ax: Axes | Sequence[Axes] | None,
    n: int,
    what: str,
    size: tuple[float, float],
    *,
    ncols: int | None = None,
    heights: Sequence[float] | None = None,
):
    """The given Axes (checked: one per panel), or new panels of ``size`` inches each: one row, or a grid
    of ``ncols`` columns whose rows are as tall as ``heights`` (inches per panel) asks."""
    if ax is None:
        ncols = min(n, ncols or n)
        nrows = -(-n // ncols)
        heights = list(heights) if heights is not None else [size[1]] * n
        row_heights = [max(heights[r * ncols : (r + 1) * ncols]) for r in range(nrows)]
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(size[0] * ncols, sum(row_heights)),
            squeeze=False,
            gridspec_kw={"height_ratios": row_heights},
        )
        for extra in axes.ravel()[n:]:
            extra.remove()
        return fig, list(axes.ravel()[:n])
    axes = [ax] if isinstance(ax, Axes) else list(ax)
    if len(axes) != n:
        raise ValueError(f"Got {len(axes)} Axes for {n} {what}.")
    return axes[0].figure, axes


def history(
    model: FederatedModel,
    *,
    metrics: Sequence[str] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> list[Axes]:
    """Per-round curves of a federated training run, one line per site, the selected round dashed (and
    the round early stopping ended the run on, dotted).

    Parameters
    ----------
    model
        A trained model (its ``history``).
    metrics
        History columns to draw, one panel each; default: ``train_loss`` (absent for DP-SGD sites, which
        do not report it) and ``val_accuracy``, or ``val_loss`` (what selects the round) for a model that
        reports no accuracy (regression, embedding).
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
    if metrics is None:
        reported = [
            m for m in ("train_loss", "val_accuracy", "val_loss") if m in frame and frame[m].notna().any()
        ]
        metrics = reported[:2] if "val_accuracy" in reported else reported
    missing = [m for m in metrics if m not in frame]
    if missing:
        raise ValueError(f"History has no column {missing}; available: {', '.join(frame.columns)}.")
    fig, axes = _panels(ax, len(metrics), "metrics", (4.2, 3.4))
    best_round = model.params.get("best_round")
    for axis, metric in zip(axes, metrics, strict=True):
        for site, rows in frame.groupby("site", sort=False):
            rows = rows[np.isfinite(rows[metric].to_numpy(dtype=float))]
            axis.plot(rows["round"], rows[metric], marker="o", markersize=3, label=str(site))
        if best_round:
            axis.axvline(best_round, color="0.5", linestyle="--", linewidth=1, label="selected round")
        if model.params.get("stopped_round"):
            axis.axvline(
                model.params["stopped_round"], color="C3", linestyle=":", linewidth=1, label="early stop"
            )
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        axis.set_ylabel(_LABELS.get(metric, metric))
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize="small", frameon=False)
    _finish(fig, axes, show, save, ax is not None)
    return axes


# What each family's panel shows: the metric, and the reference line an attack must beat to mean anything.
def _privacy_panels() -> dict[str, tuple[str, str]]:
    """Each attack family's panel (its metric and axis label), by its name in an audit table."""
    from .privacy.audit import family_names, get_family

    return {get_family(name).table_name: get_family(name).panel for name in family_names()}


def _finish(fig, axes, show: bool | None, save: str | Path | None, ax_given: bool) -> None:
    if not ax_given:  # the caller's figure holds other panels: its layout is the caller's
        fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show or (show is None and not ax_given and save is None and plt.isinteractive()):
        plt.show()


def privacy(
    audit: pd.DataFrame,
    *,
    families: Sequence[str] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> list[Axes]:
    """Draw a privacy audit (:func:`scinfl.tl.privacy_audit`): one panel per attack family.

    Each bar is an attack under one attacker view, with its 95% confidence interval. Utility panels show
    chance as a dashed line; reconstruction panels show what the public and cell-type mean profiles give
    for free (dotted lines): an attack leaks only what it adds above those. The geometry panel shows how
    well each server view links leaks to the victims' own cells, against a random ranking (1).

    Parameters
    ----------
    audit
        The audit table.
    families
        Families to draw, in order; default: those present.
    ax
        Axes to draw into, one per family.
    show, save
        As in scanpy.

    Returns
    -------
    The Axes, one per family.
    """
    panels = _privacy_panels()
    present = [f for f in panels if f in set(audit["family"])]
    families = list(families) if families is not None else present
    missing = [f for f in families if f not in present]
    if missing or not families:
        raise ValueError(f"The audit has no family {missing or families}; it has {', '.join(present)}.")
    n_bars = [  # a perturbation model's utility panel shows its Pearson delta instead of accuracy
        int(((audit["family"] == f) & audit["metric"].isin((panels[f][0], "pearson_delta"))).sum())
        for f in families
    ]
    # Two columns, each panel as tall as its bars need, so that every label stays readable in a notebook.
    fig, axes = _panels(
        ax, len(families), "families", (6.5, 3.0), ncols=2, heights=[1.2 + 0.32 * n for n in n_bars]
    )
    for axis, family in zip(axes, families, strict=True):
        metric, label = panels[family]
        if family == "utility" and not ((audit["family"] == family) & (audit["metric"] == metric)).any():
            # a perturbation model's utility
            metric, label = "pearson_delta", "Pearson delta on never-trained cells"
        rows = audit[(audit["family"] == family) & (audit["metric"] == metric)]
        if family == "utility":
            chance = rows[rows["view"] == "chance"]
            rows = rows[rows["view"] != "chance"]
        names = [
            f"{a}\n[{v}]" if family != "utility" else v
            for a, v in zip(rows["attack"], rows["view"], strict=True)
        ]
        position = np.arange(len(rows))
        error = np.vstack([rows["mean"] - rows["ci_low"], rows["ci_high"] - rows["mean"]])
        axis.barh(position, rows["mean"], xerr=np.clip(error, 0, None), color="0.6", capsize=3)
        axis.set_yticks(position, names, fontsize="x-small")
        axis.invert_yaxis()
        axis.set_xlabel(label)
        axis.set_title(family)
        if family == "utility" and len(chance):
            axis.axvline(float(chance["mean"].iloc[0]), color="C3", linestyle="--", label="chance")
        if family in ("analytic", "inversion"):
            priors = audit[(audit["family"] == "prior") & (audit["metric"] == metric)]
            for style, (_, prior) in zip((":", "-."), priors.iterrows(), strict=False):
                axis.axvline(prior["mean"], color="C0", linestyle=style, label=f"{prior['attack']} (free)")
        if family == "membership":
            axis.axvline(0.5, color="C3", linestyle="--", label="guessing")
        if family == "geometry":
            axis.axvline(1.0, color="C3", linestyle="--", label="chance")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="x-small", frameon=False)
        axis.grid(axis="x", alpha=0.3)
    _finish(fig, axes, show, save, ax is not None)
    return axes


def reconstruction(
    examples: Mapping[str, np.ndarray],
    *,
    attacks: Sequence[str] | None = None,
    var_names: Sequence[str] | None = None,
    n_genes: int = 5,
    show: bool | None = None,
    save: str | Path | None = None,
) -> list[Axes]:
    """Reconstructed vs true expression of one victim, one panel per ``"attack | view"``.

    Parameters
    ----------
    examples
        ``adata.uns["scinfl_privacy_examples"]`` from :func:`scinfl.tl.privacy_audit`.
    attacks
        Which ``"attack | view"`` entries to draw; default: all.
    var_names
        Gene names (the model's ``schema.var_names``) to label the victim's ``n_genes`` top genes.
    n_genes
        How many top genes to label.
    show, save
        As in scanpy.

    Returns
    -------
    The Axes, one per entry.
    """
    if "truth" not in examples:
        raise ValueError("No reconstruction examples: pass adata.uns['scinfl_privacy_examples'].")
    truth = np.asarray(examples["truth"])
    names = list(attacks) if attacks is not None else [k for k in examples if k != "truth"]
    if not names:
        raise ValueError("The examples hold no reconstruction.")
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    axes = list(axes[0])
    top = np.argsort(truth)[::-1][:n_genes]
    for axis, name in zip(axes, names, strict=True):
        rec = np.asarray(examples[name])
        axis.scatter(truth, rec, s=6, alpha=0.5, color="0.4")
        axis.scatter(truth[top], rec[top], s=14, color="C3")
        if var_names is not None:
            for i in top:
                axis.annotate(str(var_names[i]), (truth[i], rec[i]), fontsize="xx-small")
        lim = [min(truth.min(), rec.min()), max(truth.max(), rec.max())]
        axis.plot(lim, lim, color="C0", linewidth=0.8, linestyle="--")
        axis.set_xlabel("true expression")
        axis.set_ylabel("reconstructed")
        axis.set_title(name, fontsize="x-small")
    _finish(fig, axes, show, save, False)
    return axes


def perturbation(
    pseudobulk: AnnData,
    *,
    perturbations: Sequence[str] | None = None,
    groups: Mapping[str, str] | None = None,
    n_top: int = 4,
    n_genes: int = 5,
    min_cells: int = 10,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> list[Axes]:
    """Predicted vs observed change from control, one panel per perturbation (a dot per gene).

    Parameters
    ----------
    pseudobulk
        From :func:`scinfl.tl.predict_perturbation` with observed cells.
    perturbations
        Perturbations to draw; default: the ``n_top`` with the largest observed change (root mean square
        over genes) among those with at least ``min_cells`` observed cells.
    groups
        Covariate values to draw, e.g. ``{"condition": "stimulated"}``; a covariate left out must have a
        single value among the rows drawn.
    n_top
        How many perturbations to draw by default.
    n_genes
        How many genes to name per panel: those with the largest observed change.
    min_cells
        Observed cells a perturbation needs to be drawn by default: the mean change of a few cells is
        mostly noise, and the largest observed changes are often theirs.
    ax
        Axes to draw into, one per perturbation.
    show, save
        As in scanpy.

    Returns
    -------
    The Axes, one per perturbation.
    """
    if not isinstance(pseudobulk, AnnData) or "observed_change" not in pseudobulk.layers:
        raise ValueError("pl.perturbation draws the AnnData that tl.predict_perturbation returns.")
    obs = pseudobulk.obs
    rows = obs["n_observed"].to_numpy() > 0
    for name, value in (groups or {}).items():
        if name not in obs:
            raise ValueError(f"No covariate {name!r}; the rows have {', '.join(map(str, obs.columns))}.")
        rows &= (obs[name].astype(str) == str(value)).to_numpy()
    observed = np.asarray(pseudobulk.layers["observed_change"])
    predicted = np.asarray(pseudobulk.layers["predicted_change"])
    if perturbations is None:
        candidates = np.flatnonzero(rows & (obs["n_observed"].to_numpy() >= min_cells))
        if not len(candidates):
            raise ValueError(
                f"No perturbation has {min_cells} or more observed cells among those selected; pass "
                "min_cells= or perturbations=."
            )
        size = np.sqrt(np.nanmean(observed[candidates] ** 2, axis=1))
        chosen = candidates[np.argsort(-size, kind="stable")[:n_top]]
    else:
        chosen = []
        for name in perturbations:
            match = np.flatnonzero(rows & (obs["perturbation"].astype(str) == str(name)).to_numpy())
            if len(match) != 1:
                raise ValueError(
                    f"Perturbation {name!r} has {len(match)} rows with observed cells among those selected; "
                    "pass groups= to pick one covariate group."
                )
            chosen.append(match[0])
    if not len(chosen):
        raise ValueError("No perturbation with observed cells matches.")
    fig, axes = _panels(ax, len(chosen), "perturbations", (3.6, 3.6))
    for axis, i in zip(axes, chosen, strict=True):
        x, y = observed[i], predicted[i]
        axis.scatter(x, y, s=6, alpha=0.5, color="0.4", rasterized=True)
        top = np.argsort(-np.abs(x), kind="stable")[:n_genes]
        axis.scatter(x[top], y[top], s=14, color="C3")
        for j in top:
            axis.annotate(str(pseudobulk.var_names[j]), (x[j], y[j]), fontsize="xx-small")
        lim = [min(x.min(), y.min()), max(x.max(), y.max())]
        axis.plot(lim, lim, color="C0", linewidth=0.8, linestyle="--")
        axis.axhline(0, color="0.8", linewidth=0.6)
        axis.axvline(0, color="0.8", linewidth=0.6)
        correlation = pearson(x, y)  # NaN for a constant (no-change) prediction
        axis.set_title(
            f"{obs.index[i]}\nPearson delta {correlation:.2f}, {int(obs['n_observed'].iloc[i])} cells",
            fontsize="x-small",
        )
        axis.set_xlabel("observed change from control")
        axis.set_ylabel("predicted change")
    _finish(fig, axes, show, save, ax is not None)
    return axes
