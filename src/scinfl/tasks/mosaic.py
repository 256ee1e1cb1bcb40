"""Multi-omics mosaic integration: one encoder per modality into a joint latent, one decoder per modality.

A site is a MuData (``rna`` + ``prot``, ``rna`` + ``atac``, ...; a cell may lack some of its modalities) or
an AnnData holding one modality (its registration's ``modality``, else ``"rna"``). Each modality's features
are agreed over the sites that hold it; each site trains and sends only its modalities' modules, and FedAvg
averages each parameter over the sites that sent it (:func:`scinfl.federation.fedavg`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import Tensor, nn

from .._warnings import warn
from ..data import (
    FederationSchema,
    MosaicMatrix,
    build_mosaic_schema,
    describe_mosaic_site,
    is_mudata,
    scinfl_entry,
    site_modalities,
)
from ..nn import MOSAIC_LIKELIHOODS, MosaicAutoencoder, MosaicOutput, cell_losses, modality_parameter_names
from ._base import ModelConfig, PerCellObjective, Task, _check_overlap, register

__all__ = ["Mosaic", "MosaicReconstruction"]


class MosaicReconstruction(PerCellObjective):
    """The mosaic objective: per cell, the sum over its modalities of that modality's reconstruction loss
    from the joint latent (:func:`scinfl.nn.cell_losses`, over the features the site measures), plus, for a
    cell with several modalities, ``alignment`` times the mean squared distance of each modality's latent
    to the joint latent, so that one modality alone places the cell where all of them do."""

    def __init__(self, alignment: float, measured: np.ndarray | None = None) -> None:
        self.alignment = float(alignment)
        self.measured = None if measured is None else torch.from_numpy(measured)

    def cell_losses(self, output: MosaicOutput, x: Tensor) -> Tensor:
        losses = x.new_zeros(len(x))
        measured = None if self.measured is None else self.measured.to(x.device)
        for name, rows in output.index.items():
            columns, likelihood = output.columns[name]
            per_cell = cell_losses(
                likelihood,
                output.reconstruction[name],
                x[rows, columns],
                None if measured is None else measured[columns],
            )
            losses = losses.index_add(0, rows, per_cell)
        if self.alignment > 0 and len(output.index) > 1:
            count = x.new_zeros(len(x))
            spread = x.new_zeros(len(x))
            for name, rows in output.index.items():
                distance = (output.latents[name] - output.joint[rows]).pow(2).mean(dim=1)
                spread = spread.index_add(0, rows, distance)
                count = count.index_add(0, rows, torch.ones_like(distance))
            losses = losses + self.alignment * torch.where(count > 1, spread, 0.0)
        return losses


@register
@dataclass(frozen=True, kw_only=True)
class Mosaic(Task):
    """A joint embedding of several modalities (:class:`~scinfl.nn.MosaicAutoencoder`), without labels.

    A site that is an AnnData holds the modality of its registration (:func:`scinfl.pp.register_site`,
    ``modality=``), else ``"rna"``, read where its registration says (``.X`` by default); each modality of
    a MuData is read from its ``.X``.

    Writes ``.obsm[f"X_{key_added}"]`` (on a MuData site, in the MuData's own ``.obsm``).

    Parameters
    ----------
    n_latent
        Width of the joint latent (the mean of a cell's modality latents).
    likelihood
        One likelihood for every modality, or a mapping modality -> likelihood (``"gaussian"`` for those not
        named), among ``"gaussian"``, ``"poisson"`` and ``"clr"``, e.g. ``{"rna": "poisson", "prot": "clr"}``
        for raw CITE-seq counts (:mod:`scinfl.nn.likelihoods`).
    modality_dropout
        In training, the probability that a cell with several modalities is encoded from one of them only.
    alignment
        Weight of the pull of each modality's latent towards the joint latent.
    label_key
        Optional ``.obs`` column of labels; they only stratify each site's validation cells.
    """

    n_latent: int = 16
    likelihood: str | Mapping[str, str] = "gaussian"
    modality_dropout: float = 0.5
    alignment: float = 1.0
    label_key: str | None = None

    name: ClassVar[str] = "mosaic"
    output: ClassVar[str] = "embedding"
    supports_dp: ClassVar[bool] = False
    supports_init: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        likelihood = self.likelihood
        if not isinstance(likelihood, str):  # hashable and in a stable order
            object.__setattr__(
                self, "likelihood", tuple(sorted((str(k), str(v)) for k, v in dict(likelihood).items()))
            )
        for value in [likelihood] if isinstance(likelihood, str) else dict(likelihood).values():
            if value not in MOSAIC_LIKELIHOODS:
                raise ValueError(
                    f"likelihood must be one of {', '.join(map(repr, MOSAIC_LIKELIHOODS))} (or a mapping of modalities "
                    f"to them), got {value!r}."
                )
        if self.n_latent < 1:
            raise ValueError(f"n_latent must be positive, got {self.n_latent}.")

    def likelihoods(self, schema: FederationSchema) -> dict[str, str]:
        """Each modality's likelihood."""
        if isinstance(self.likelihood, str):
            return {name: self.likelihood for name, _ in schema.modalities}
        return {name: dict(self.likelihood).get(name, "gaussian") for name, _ in schema.modalities}

    # ---- sites ----
    def check_site(self, data: Any, site: str) -> None:
        if not isinstance(data, AnnData) and not is_mudata(data):
            raise TypeError(f"Site {site!r} is a {type(data).__name__}, not an AnnData or a MuData.")
        if data.n_obs == 0:
            raise ValueError(f"Site {site!r} has no cells.")

    def _label_key(self, data, site: str) -> str | None:
        return self.label_key or scinfl_entry(data, site, "scinfl").get("registration", {}).get("label_key")

    def describe(self, data, site: str) -> dict[str, Any]:
        self.check_site(data, site)
        return describe_mosaic_site(
            data, site, site_modalities(data, site), label_key=self._label_key(data, site)
        )

    def agree(self, descriptions: Mapping[str, Mapping[str, Any]], *, join: str) -> FederationSchema:
        schema = build_mosaic_schema(descriptions, join=join)
        if not isinstance(self.likelihood, str):
            extra = sorted(set(dict(self.likelihood)) - {name for name, _ in schema.modalities})
            if extra:
                raise ValueError(
                    f"likelihood= names modalities no site holds: {', '.join(map(repr, extra))}."
                )
        return schema

    def inputs(
        self,
        data,
        site: str,
        schema: FederationSchema,
        *,
        min_overlap: float | None = None,
        modality: str | None = None,
        layer: str | None = None,
        use_raw: bool | None = None,
    ) -> MosaicMatrix:
        """One row per cell: every modality's aligned features (zeros where the cell lacks it), then one
        presence flag per modality (:class:`~scinfl.data.MosaicMatrix`). ``modality`` names the modality
        of an AnnData query; modalities the model does not know are ignored with a warning."""
        self.check_site(data, site)
        if layer is not None or use_raw:
            raise ValueError(
                "A mosaic model reads each modality where its registration says: register the query "
                "(si.pp.register_site) instead of passing layer= or use_raw=."
            )
        if modality is not None and is_mudata(data):
            raise ValueError(f"Site {site!r} is a MuData: its modalities are named by its .mod.")
        modalities = site_modalities(data, site, modality)
        known = {name for name, _ in schema.modalities}
        unknown = sorted(set(modalities) - known)
        if unknown and not set(modalities) & known:
            raise ValueError(
                f"Site {site!r} holds modality {', '.join(map(repr, unknown))}, which the model does not know "
                f"(it knows {', '.join(map(repr, sorted(known)))}); name an AnnData's modality with modality=."
            )
        if unknown:
            warn(
                f"Site {site!r}: the model does not know modality {', '.join(map(repr, unknown))}; it is ignored."
            )
        matrix = MosaicMatrix(modalities, schema, data.n_obs, site)
        if min_overlap is not None:
            for name in matrix.modalities:
                present, total = matrix.present(name)
                _check_overlap(site, present, total, min_overlap, what=f"{name!r} ")
        matrix.check_finite()
        return matrix

    def labels(self, data, site: str, schema: FederationSchema) -> np.ndarray:
        if schema.label_key is None:
            return np.zeros(data.n_obs, dtype=np.int64)
        codes = pd.Categorical(
            data.obs[schema.label_key].astype(str), categories=list(schema.categories)
        ).codes
        return codes.astype(np.int64)

    # ---- network ----
    def norm(self, *, private: bool) -> str:
        return "layer"  # a batch may hold a single cell of a modality, which BatchNorm cannot normalise

    def build_network(self, config: ModelConfig) -> nn.Module:
        likelihoods = self.likelihoods(config.schema)
        return MosaicAutoencoder(
            tuple((name, n, likelihoods[name]) for name, n in config.schema.modalities),
            n_latent=self.n_latent,
            hidden=self.hidden,
            dropout=self.dropout,
            norm=config.norm,
            modality_dropout=self.modality_dropout,
        )

    def trained_parameters(self, network: nn.Module, inputs: MosaicMatrix) -> frozenset[str]:
        return modality_parameter_names(network, inputs.modalities)

    def objective(self, config: ModelConfig, measured: np.ndarray | None = None) -> MosaicReconstruction:
        return MosaicReconstruction(self.alignment, measured)
