"""Perturbation models: pseudobulk predictions per perturbation, and their scores next to baselines."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .._settings import settings, torch_threads
from ..key import FederationKey, as_key
from ..model import FederatedModel
from ..privacy.metrics import pearson
from ._federated import _h5ad_safe

__all__ = ["predict_perturbation", "score_perturbation"]

PREDICTORS = ("model", "no_change", "mean_change")


def predict_perturbation(
    adata: AnnData,
    model: FederatedModel,
    *,
    key: FederationKey | str | os.PathLike[str] | None,
    perturbations: Sequence[str] | None = None,
    observed: AnnData | None = None,
    check_key: bool = True,
    layer: str | None = None,
    use_raw: bool | None = None,
) -> AnnData:
    """Predicted pseudobulk profiles of perturbations, from ``adata``'s control cells.

    For every covariate group of ``adata`` (e.g. stimulated, unstimulated) and every perturbation, the
    model reads the group's mean control profile and predicts the mean profile of cells so perturbed.
    Where cells of a perturbation are at hand, their observed mean change from control is recorded beside
    the prediction, for :func:`score_perturbation` and :func:`scinfl.pl.perturbation`.

    Parameters
    ----------
    adata
        Cells with the model's perturbation column and covariates, including control cells: the reference
        whose control profile every prediction starts from (e.g. one site's training cells).
    model
        A model trained with ``task="perturbation"`` (:class:`scinfl.tasks.Perturbation`).
    key
        The federation key, or its file's path (None for a plain model).
    perturbations
        Perturbations to predict (default: every perturbation of the model but the control).
    observed
        Cells whose mean change from ``adata``'s control profile is the observed change (e.g. held-out
        cells); default ``adata``.
    check_key
        Refuse a key of another version than the model's (the privacy audit passes False).
    layer, use_raw
        Where ``adata`` and ``observed`` keep the values the model was trained on, if not where training
        read them. Both need every feature of the model.

    Returns
    -------
    An AnnData with one observation per perturbation and covariate group, and the model's features:

    ``.X``
        The predicted profile: the control profile plus ``layers["predicted_change"]``.
    ``.layers``
        ``"control"`` (the group's mean control profile in ``adata``, with ``"control_se"``, its
        standard error), ``"predicted_change"``, ``"observed_change"`` (mean of ``observed``'s cells
        minus the control profile, with ``"observed_se"``; NaN without such cells) and
        ``"reference_change"`` (the same from ``adata``'s own cells, which the mean-change baseline
        averages).
    ``.obs``
        ``perturbation``, the covariates, ``n_control``, ``n_observed`` and ``n_reference``.
    """
    if not isinstance(model, FederatedModel):
        raise TypeError(f"model must be a scinfl.FederatedModel, got {type(model).__name__}.")
    if not hasattr(model.task, "pseudobulk"):
        raise ValueError(
            f"This model was trained for task {model.task.name!r}; predict_perturbation needs a perturbation "
            "model (si.tasks.Perturbation)."
        )
    for name, data in (("adata", adata), ("observed", observed)):
        if data is not None and not isinstance(data, AnnData):
            raise TypeError(f"{name} is a {type(data).__name__}, not an AnnData.")
    key = as_key(key)
    if check_key:
        model.check_key(key)
    with torch_threads(settings.torch_threads):
        out = model.task.pseudobulk(
            model.network,
            model.config,
            adata,
            key_material=model.key_material(key),
            perturbations=perturbations,
            observed=observed,
            layer=layer,
            use_raw=use_raw,
        )
    out.uns["scinfl"] = {
        "perturbation": _h5ad_safe(model.task.to_dict()),
        "scheme": model.config.scheme or "plain",
        **({"key_fingerprint": model.key_fingerprint} if model.key_fingerprint else {}),
    }
    return out


def score_perturbation(pseudobulk: AnnData, *, top_de: int = 20, min_cells: int = 2) -> pd.DataFrame:
    """Score predicted perturbation effects as the perturbation literature does, next to two baselines.

    For every perturbation and covariate group of ``pseudobulk`` (from :func:`predict_perturbation`)
    with at least ``min_cells`` observed cells, three predictions of the change from control are scored
    against the observed change:

    ``"model"``
        The model's predicted change.
    ``"no_change"``
        Zero: the perturbed cells look like the controls.
    ``"mean_change"``
        The mean of the reference's changes for the other perturbations of the same covariate group
        (leave-one-out, so the perturbation scored does not inform its own baseline).

    Metrics: ``mse`` (mean squared error of the predicted profile over all features), ``mse_top_de``
    (over the perturbation's ``top_de`` most differentially expressed features: the largest
    ``|observed change| / standard error``, Welch's t against the controls), ``pearson_delta`` (Pearson
    correlation of the predicted and observed changes over all features) and ``pearson_delta_top_de``
    (over the top features). A constant prediction has no correlation: ``"no_change"``'s are NaN.

    Returns
    -------
    One row per perturbation, covariate group and predictor: ``perturbation``, the covariates,
    ``n_observed``, ``predictor`` and the metrics. ``df.groupby("predictor")[metrics].mean()`` summarises.
    """
    layers = pseudobulk.layers
    needed = {"predicted_change", "observed_change", "observed_se", "control_se", "reference_change"}
    if not isinstance(pseudobulk, AnnData) or not needed <= set(layers):
        raise ValueError("score_perturbation reads the AnnData that tl.predict_perturbation returns.")
    if top_de < 1:
        raise ValueError(f"top_de must be positive, got {top_de}.")
    covariates = [
        c
        for c in pseudobulk.obs.columns
        if c not in {"perturbation", "n_control", "n_observed", "n_reference"}
    ]
    group = (
        pseudobulk.obs[covariates].astype(str).agg("|".join, axis=1).to_numpy()
        if covariates
        else np.zeros(pseudobulk.n_obs, dtype=str)
    )
    observed = np.asarray(layers["observed_change"], dtype=np.float64)
    reference = np.asarray(layers["reference_change"], dtype=np.float64)
    has_reference = pseudobulk.obs["n_reference"].to_numpy() > 0
    se = np.sqrt(
        np.asarray(layers["observed_se"], dtype=np.float64) ** 2
        + np.asarray(layers["control_se"], dtype=np.float64) ** 2
    )
    rows = []
    for i in np.flatnonzero(pseudobulk.obs["n_observed"].to_numpy() >= min_cells):
        others = (group == group[i]) & has_reference
        others[i] = False
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(se[i] > 0, np.abs(observed[i]) / se[i], 0.0)
        top = np.argsort(-np.nan_to_num(t), kind="stable")[:top_de]
        predictions = {
            "model": np.asarray(layers["predicted_change"][i], dtype=np.float64),
            "no_change": np.zeros(pseudobulk.n_vars),
            "mean_change": reference[others].mean(axis=0)
            if others.any()
            else np.full(pseudobulk.n_vars, np.nan),
        }
        for predictor, change in predictions.items():
            error = (change - observed[i]) ** 2
            rows.append(
                {
                    "perturbation": pseudobulk.obs["perturbation"].iloc[i],
                    **{c: pseudobulk.obs[c].iloc[i] for c in covariates},
                    "n_observed": int(pseudobulk.obs["n_observed"].iloc[i]),
                    "predictor": predictor,
                    "mse": float(error.mean()),
                    "mse_top_de": float(error[top].mean()),
                    "pearson_delta": pearson(change, observed[i]),
                    "pearson_delta_top_de": pearson(change[top], observed[i][top]),
                }
            )
    if not rows:
        raise ValueError(f"No perturbation of pseudobulk has {min_cells} or more observed cells to score.")
    out = pd.DataFrame(rows)
    out["predictor"] = pd.Categorical(out["predictor"], categories=list(PREDICTORS))
    return out
