"""Perturbation response: predict a perturbed cell's profile from its site's control profile, its
perturbation and its covariates (regression, mean squared error)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import Tensor, nn

from ..data import (
    FederationSchema,
    PerturbationDesign,
    control_profiles,
    group_moments,
    perturbation_matrix,
)
from ..nn import PerturbationNetwork, cell_losses
from ..train import infer
from ._base import AuditView, ModelConfig, PerCellObjective, Predictions, Task, register

__all__ = ["Perturbation", "ProfileError"]


class ProfileError(PerCellObjective):
    """The perturbation model's objective: per-cell mean squared error of the predicted profile against
    the observed one (the first ``n_features`` columns of a row), over the features the site measures.

    Its optimum is each condition's mean profile, the level at which perturbation effects are scored
    (:func:`scinfl.tl.score_perturbation`).
    """

    def __init__(self, n_features: int, measured: np.ndarray | None = None) -> None:
        self.n_features = n_features
        measured = None if measured is None else measured[:n_features]
        self.measured = None if measured is None or measured.all() else torch.from_numpy(measured)

    def cell_losses(self, output: Tensor, x: Tensor) -> Tensor:
        measured = None if self.measured is None else self.measured.to(x.device)
        return cell_losses("gaussian", output, x[:, : self.n_features], measured)


@register
@dataclass(frozen=True, kw_only=True)
class Perturbation(Task):
    """Predict each cell's profile from its site's mean control profile, its perturbation and its
    covariates (:class:`~scinfl.nn.PerturbationNetwork`; use log-normalised values).

    Every site needs control cells: the network reads the mean control profile of the cell's covariate
    group at its site (computed there, never sent), the perturbation and the covariates, and predicts the
    cell's values. A perturbation is predicted from its own cells, so it must be among the training
    perturbations; validation splits are stratified by perturbation.

    Writes ``.layers[f"{key_added}_predicted"]`` (the cell's control profile plus the predicted change;
    NaN for genes the model lacks) and ``.obsm[f"X_{key_added}"]`` (the encoding of the cell's condition).
    :func:`scinfl.tl.predict_perturbation` predicts pseudobulk profiles per perturbation.

    Parameters
    ----------
    perturbation_key
        ``.obs`` column naming each cell's perturbation.
    control
        The perturbation label of control cells.
    covariate_keys
        ``.obs`` columns of covariates (e.g. ``("condition",)``); their categories are agreed over the sites.
    """

    perturbation_key: str | None = None
    control: str = "control"
    covariate_keys: tuple[str, ...] = ()

    name: ClassVar[str] = "perturbation"
    output: ClassVar[str] = "profile"
    needs_labels: ClassVar[bool] = True
    uses_outputs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.perturbation_key is None:
            raise ValueError(
                "task='perturbation' needs perturbation_key=, the .obs column of perturbations: "
                "si.tasks.Perturbation(perturbation_key='guide')."
            )
        covariates = (self.covariate_keys,) if isinstance(self.covariate_keys, str) else self.covariate_keys
        object.__setattr__(self, "covariate_keys", tuple(str(k) for k in covariates))
        object.__setattr__(self, "control", str(self.control))
        if self.perturbation_key in self.covariate_keys:
            raise ValueError(
                f"{self.perturbation_key!r} is the perturbation column; it cannot also be a covariate."
            )

    @property
    def label_key(self) -> str:
        """The labels of a perturbation model are its perturbations."""
        return self.perturbation_key

    # ---- schema and inputs ----
    def agreed_columns(self) -> tuple[str, ...]:
        return self.covariate_keys

    def agree(self, descriptions: Mapping[str, Mapping[str, Any]], *, join: str) -> FederationSchema:
        schema = super().agree(descriptions, join=join)
        if self.control not in schema.categories:
            raise ValueError(
                f"No site has control cells labelled {self.control!r} in {self.perturbation_key!r}."
            )
        return schema

    def design(self, schema: FederationSchema) -> PerturbationDesign:
        return PerturbationDesign.from_schema(
            schema,
            perturbation_key=self.perturbation_key,
            control=self.control,
            covariate_keys=self.covariate_keys,
        )

    def inputs(
        self, data, site: str, schema: FederationSchema, *, min_overlap: float | None = None, **fields
    ):
        """Rows ``[observed | control profile | perturbation one-hot | covariates one-hot]``
        (:class:`~scinfl.data.PerturbationMatrix`), from the site's own control cells."""
        aligned = self.aligned(data, site, schema, min_overlap=min_overlap, **fields)
        return perturbation_matrix(aligned, data, self.design(schema), schema, site)

    # ---- network and objective ----
    def build_network(self, config: ModelConfig) -> nn.Module:
        return PerturbationNetwork(
            config.n_features,
            config.n_classes,
            self.design(config.schema).n_covariates,
            hidden=self.hidden,
            dropout=self.dropout,
            norm=config.norm,
        )

    def objective(self, config: ModelConfig, measured: np.ndarray | None = None) -> ProfileError:
        return ProfileError(config.n_features, measured)

    # ---- predictions ----
    def predictions(self, outputs: np.ndarray, embedding: np.ndarray, inputs, schema: FederationSchema):
        # The head predicts the change from the control profile each cell read.
        expression = outputs + inputs.control_rows(np.arange(inputs.n_obs))
        return Predictions(
            probabilities=None, embedding=embedding, categories=schema.categories, expression=expression
        )

    def output_keys(self, key_added: str) -> dict[str, tuple[str, ...]]:
        return super().output_keys(key_added) | {"layers": (f"{key_added}_predicted",)}

    def write(
        self,
        data,
        predictions: Predictions,
        *,
        key_added: str,
        uns: Mapping[str, Any],
        schema: FederationSchema,
    ) -> None:
        super().write(data, predictions, key_added=key_added, uns=uns, schema=schema)
        position = pd.Index(schema.var_names).get_indexer(data.var_names)
        layer = np.full((data.n_obs, data.n_vars), np.nan, dtype=np.float32)
        layer[:, position >= 0] = predictions.expression[:, position[position >= 0]]
        data.layers[f"{key_added}_predicted"] = layer

    def audit_view(self, config: ModelConfig) -> AuditView:
        n, n_classes = config.n_features, config.n_classes
        return AuditView(
            output="profile",
            objective=self.objective(config),
            profile=slice(0, n),
            control=slice(n, 2 * n),
            condition=slice(2 * n, None),
            label=slice(2 * n, 2 * n + n_classes),
        )

    # ---- pseudobulk prediction (scinfl.tl.predict_perturbation) ----
    def pseudobulk(
        self,
        network: nn.Module,
        config: ModelConfig,
        reference: AnnData,
        *,
        key_material,
        perturbations: Sequence[str] | None = None,
        observed: AnnData | None = None,
        layer: str | None = None,
        use_raw: bool | None = None,
    ) -> AnnData:
        """Predicted pseudobulk profiles from ``reference``'s control cells; see
        :func:`scinfl.tl.predict_perturbation`, which documents the parameters and the result."""
        schema = config.schema
        design = self.design(schema)
        categories = list(schema.categories)
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

        matrix = self.aligned(reference, "adata", schema, layer=layer, use_raw=use_raw, min_overlap=1.0)
        is_control = design.is_control(reference, "adata")
        if not is_control.any():
            raise ValueError(
                f"adata has no control cells ({design.perturbation_key!r} == {design.control!r}): every "
                "prediction starts from their mean profile."
            )
        codes = design.covariate_codes(reference, "adata")
        profiles, group = control_profiles(matrix, is_control, codes, "adata")
        group_codes = np.unique(codes, axis=0)  # the rows of profiles, in the same order
        _, control_se, n_control = group_moments(matrix, np.flatnonzero(is_control), group, len(group_codes))

        n_p, n_g, n_f = len(perturbations), len(group_codes), schema.n_features
        p_index = np.repeat(np.arange(n_p), n_g)
        g_index = np.tile(np.arange(n_g), n_p)
        view = self.audit_view(config)
        inputs = np.zeros((n_p * n_g, 2 * n_f + len(categories) + design.n_covariates), dtype=np.float32)
        inputs[:, view.control] = profiles[g_index]
        label_columns = np.arange(inputs.shape[1])[view.label]
        inputs[
            np.arange(len(inputs)), label_columns[[categories.index(p) for p in perturbations]][p_index]
        ] = 1
        inputs[:, view.label.stop :] = design.covariate_onehot(group_codes[g_index])
        change, _ = infer(network, [(torch.from_numpy(inputs), torch.empty(0))], key_material=key_material)

        def changes(data: AnnData, aligned, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
            mean, se, count = group_moments(aligned, cells, np.where(row >= 0, row, 0), n_p * n_g)
            return mean - profiles[g_index], se, count

        reference_change, reference_se, n_reference = changes(reference, matrix, "adata")
        if observed is None:
            observed_change, observed_se, n_observed = reference_change, reference_se, n_reference
        else:
            aligned = self.aligned(
                observed, "observed", schema, layer=layer, use_raw=use_raw, min_overlap=1.0
            )
            observed_change, observed_se, n_observed = changes(observed, aligned, "observed")

        obs = pd.DataFrame(
            {"perturbation": pd.Categorical(np.array(perturbations)[p_index], categories=perturbations)}
        )
        for j, (name, cats) in enumerate(
            zip(design.covariate_keys, design.covariate_categories, strict=True)
        ):
            obs[name] = pd.Categorical(np.array(cats)[group_codes[g_index, j]], categories=list(cats))
        obs["n_control"] = n_control[g_index].astype(np.int64)
        obs["n_observed"] = n_observed.astype(np.int64)
        obs["n_reference"] = n_reference.astype(np.int64)
        obs.index = [
            "|".join([p, *(str(obs[k].iloc[i]) for k in design.covariate_keys)])
            for i, p in enumerate(obs["perturbation"])
        ]
        return AnnData(
            X=(profiles[g_index] + change).astype(np.float32),
            obs=obs,
            var=pd.DataFrame(index=pd.Index(schema.var_names)),
            layers={
                "control": profiles[g_index],
                "control_se": control_se[g_index].astype(np.float32),
                "predicted_change": change.astype(np.float32),
                "observed_change": observed_change.astype(np.float32),
                "observed_se": observed_se.astype(np.float32),
                "reference_change": reference_change.astype(np.float32),
            },
        )
