"""Perturbation models: pseudobulk predictions per perturbation, and their scores next to baselines."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._settings import settings, torch_threads
from ..data import (
    AlignedMatrix,
    PerturbationDesign,
    check_finite,
    control_profiles,
    feature_source,
    group_moments,
    site_fields,
)
from ..data.schema import check_unique_features
from ..key import FederationKey
from ..model import FederatedModel
from ..train import infer, key_material

__all__ = ["predict_perturbation", "score_perturbation"]

PREDICTORS = ("model", "no_change", "mean_change")


def _design(model: FederatedModel) -> PerturbationDesign:
    if not isinstance(model, FederatedModel):
        raise TypeError(f"model must be a scinfl.FederatedModel, got {type(model).__name__}.")
    if model.config.task != "perturbation":
        raise ValueError(f"This model was trained for task {model.config.task!r}, not 'perturbation'.")
    return PerturbationDesign.from_dict(model.params["perturbation"])


def _aligned(adata: AnnData, model: FederatedModel, site: str, layer, use_raw) -> AlignedMatrix:
    if not isinstance(adata, AnnData):
        raise TypeError(f"{site} is a {type(adata).__name__}, not an AnnData.")
    if layer is None and use_raw is None:
        layer, use_raw = model.schema.layer, model.schema.use_raw
    fields = site_fields(adata, site, layer=layer, use_raw=bool(use_raw))
    matrix = AlignedMatrix.from_adata(adata, model.schema, fields)
    check_unique_features(feature_source(adata, fields)[1], site, used=pd.Index(model.schema.var_names))
    check_finite(matrix.matrix, site)
    if matrix.n_present < model.schema.n_features:
        raise ValueError(
            f"{site} lacks {model.schema.n_features - matrix.n_present} of the model's "
            f"{model.schema.n_features} features: a pseudobulk change needs every one of them."
        )
    return matrix


def predict_perturbation(
    adata: AnnData,
    model: FederatedModel,
    *,
    key: FederationKey | None,
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
        A model trained with ``task="perturbation"``.
    key
        The federation key (None for a plain model).
    perturbations
        Perturbations to predict (default: every perturbation of the model but the control).
    observed
        Cells whose mean change from ``adata``'s control profile is the observed change (e.g. held-out
        cells); default ``adata``.
    check_key
        Refuse a key of another version than the model's (the privacy audit passes False).
    layer, use_raw
        Where ``adata`` and ``observed`` keep the values the model was trained on, if not where training
        read them.

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
    design = _design(model)
    if check_key:
        model.check_key(key)
    categories = list(model.schema.categories)
    if perturbations is None:
        perturbations = [c for c in categories if c != design.control]
    perturbations = [str(p) for p in perturbations]
    unknown = [p for p in perturbations if p not in categories]
    if unknown:
        raise ValueError(
            f"Perturbations {unknown[:5]} are not among the model's ({len(categories)}: "
            f"{', '.join(categories[:5])}, ...): the model predicts the perturbations it was trained on."
        )
    if not perturbations:
        raise ValueError("No perturbations to predict.")

    reference = _aligned(adata, model, "adata", layer, use_raw)
    is_control = design.is_control(adata, "adata")
    if not is_control.any():
        raise ValueError(
            f"adata has no control cells ({design.perturbation_key!r} == {design.control!r}): every "
            "prediction starts from their mean profile."
        )
    codes = design.covariate_codes(adata, "adata")
    profiles, group = control_profiles(reference, is_control, codes, "adata")
    group_codes = np.unique(codes, axis=0)  # the rows of profiles, in the same order
    _, control_se, n_control = group_moments(reference, np.flatnonzero(is_control), group, len(group_codes))

    n_p, n_g, n_f = len(perturbations), len(group_codes), model.schema.n_features
    p_index = np.repeat(np.arange(n_p), n_g)
    g_index = np.tile(np.arange(n_g), n_p)
    inputs = np.zeros((n_p * n_g, 2 * n_f + len(categories) + design.n_covariates), dtype=np.float32)
    inputs[:, n_f : 2 * n_f] = profiles[g_index]
    inputs[
        np.arange(len(inputs)), 2 * n_f + np.array([categories.index(p) for p in perturbations])[p_index]
    ] = 1
    inputs[:, 2 * n_f + len(categories) :] = design.covariate_onehot(group_codes[g_index])
    material = key_material(key, model.config) if model.config.scheme is not None else None
    with torch_threads(settings.torch_threads):
        change, _ = infer(model.network, [(torch.from_numpy(inputs), torch.empty(0))], key_material=material)

    def changes(data: AnnData, matrix, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if design.perturbation_key not in data.obs:
            raise ValueError(f"{name} has no column {design.perturbation_key!r} in .obs.")
        labels = data.obs[design.perturbation_key].astype(str).to_numpy()
        cell_codes = design.covariate_codes(data, name)
        # each cell's row in the output (perturbation, group), -1 for cells outside it
        position = {tuple(c): i for i, c in enumerate(group_codes)}
        cell_group = np.array([position.get(tuple(c), -1) for c in cell_codes], dtype=np.int64)
        p_of = {p: i for i, p in enumerate(perturbations)}
        cell_p = np.array([p_of.get(label, -1) for label in labels], dtype=np.int64)
        row = np.where((cell_group >= 0) & (cell_p >= 0), cell_p * n_g + cell_group, -1)
        cells = np.flatnonzero(row >= 0)
        mean, se, count = group_moments(matrix, cells, np.where(row >= 0, row, 0), n_p * n_g)
        return mean - profiles[g_index], se, count

    reference_change, reference_se, n_reference = changes(adata, reference, "adata")
    if observed is None:
        observed_change, observed_se, n_observed = reference_change, reference_se, n_reference
    else:
        observed_change, observed_se, n_observed = changes(
            observed, _aligned(observed, model, "observed", layer, use_raw), "observed"
        )

    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(np.array(perturbations)[p_index], categories=perturbations)}
    )
    for j, (name, cats) in enumerate(zip(design.covariate_keys, design.covariate_categories, strict=True)):
        obs[name] = pd.Categorical(np.array(cats)[group_codes[g_index, j]], categories=list(cats))
    obs["n_control"] = n_control[g_index].astype(np.int64)
    obs["n_observed"] = n_observed.astype(np.int64)
    obs["n_reference"] = n_reference.astype(np.int64)
    obs.index = [
        "|".join([p, *(str(obs[k].iloc[i]) for k in design.covariate_keys)])
        for i, p in enumerate(obs["perturbation"])
    ]
    out = AnnData(
        X=(profiles[g_index] + change).astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(model.schema.var_names)),
        layers={
            "control": profiles[g_index],
            "control_se": control_se[g_index].astype(np.float32),
            "predicted_change": change.astype(np.float32),
            "observed_change": observed_change.astype(np.float32),
            "observed_se": observed_se.astype(np.float32),
            "reference_change": reference_change.astype(np.float32),
        },
    )
    out.uns["scinfl"] = {
        "perturbation": design.to_dict(),
        "scheme": model.config.scheme or "plain",
        **({"key_fingerprint": model.key_fingerprint} if model.key_fingerprint else {}),
    }
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (a no-change prediction has none)."""
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denominator) if denominator > 0 else float("nan")


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
                    "pearson_delta": _pearson(change, observed[i]),
                    "pearson_delta_top_de": _pearson(change[top], observed[i][top]),
                }
            )
    if not rows:
        raise ValueError(f"No perturbation of pseudobulk has {min_cells} or more observed cells to score.")
    out = pd.DataFrame(rows)
    out["predictor"] = pd.Categorical(out["predictor"], categories=list(PREDICTORS))
    return out
