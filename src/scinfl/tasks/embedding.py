"""A cell embedding without labels: a keyed autoencoder whose latent is the embedding (optionally spatial)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .._warnings import warn
from ..data import FederationSchema, NeighbourhoodMatrix, spatial_graph
from ..nn import LIKELIHOODS, Autoencoder, cell_losses
from ._base import AuditView, ModelConfig, PerCellObjective, Task, register

# Likelihoods of raw counts: their losses need non-negative values and model whole numbers.
COUNT_LIKELIHOODS = ("poisson", "nb", "clr")


def check_counts(values: np.ndarray, likelihood: str, site: str) -> None:
    """Refuse negative values under a count likelihood; warn when the values are not whole numbers (they
    look normalised or log-transformed), as scvi-tools does for its count models."""
    advice = (
        "Register the site's raw counts (si.pp.register_site(adata, layer='counts')) or use "
        "likelihood='gaussian' for normalised values."
    )
    if values.size and values.min() < 0:
        raise ValueError(
            f"Site {site!r}: likelihood={likelihood!r} models raw counts, but its values include negative "
            f"ones (minimum {values.min():.3g}); they look scaled. {advice}"
        )
    fractional = values[values != np.round(values)]
    if fractional.size:
        warn(
            f"Site {site!r}: likelihood={likelihood!r} models raw counts, but {fractional.size / values.size:.0%} "
            f"of its values are not whole numbers (e.g. {fractional[0]:.3g}); they look normalised or "
            f"log-transformed. {advice}"
        )


__all__ = ["BATCHES", "BatchMatrix", "Embedding", "Reconstruction", "batch_of"]

# The schema's entry (among its covariates) of the batches a site-aware network knows, in one-hot order.
BATCHES = "scinfl:batches"


class Reconstruction(PerCellObjective):
    """The autoencoder's objective: a per-cell reconstruction loss (:func:`scinfl.nn.cell_losses`) of the
    input's first ``n_features`` columns (the rest are batch flags), over the features the site measures
    (``measured``), averaged over cells."""

    def __init__(self, likelihood: str, measured: np.ndarray | None = None, n_features: int | None = None):
        self.likelihood = likelihood
        self.measured = None if measured is None or measured.all() else torch.from_numpy(measured)
        self.n_features = n_features

    def cell_losses(self, output: Tensor, x: Tensor) -> Tensor:
        measured = None if self.measured is None else self.measured.to(x.device)
        return cell_losses(self.likelihood, output, x[:, : self.n_features], measured)


def batch_of(name: str) -> int | None:
    """The batch a ``state_dict`` entry of a site-aware network belongs to (its decoder shift or its
    normalisation statistics), else None."""
    stem, _, last = name.rpartition(".")
    if stem.endswith("batch_shifts"):
        return int(last)
    if last.startswith(("running_mean_", "running_var_")):
        return int(last.rpartition("_")[2])
    return None


class BatchMatrix:
    """A site's input matrix with each cell's batch one-hot appended to its rows (``[features | one-hot]``).

    ``codes`` holds each cell's batch index, or -1 for a batch the model does not know (an all-zero
    one-hot). ``n_features`` and ``measured`` describe the features, as the wrapped matrix does.
    """

    def __init__(self, matrix, codes: np.ndarray, n_batches: int) -> None:
        if len(codes) != matrix.n_obs:
            raise ValueError(f"{len(codes)} batch codes for {matrix.n_obs} cells.")
        self.matrix = matrix
        self.codes = np.asarray(codes, dtype=np.int64)
        self.n_batches = n_batches

    n_obs = property(lambda self: self.matrix.n_obs)
    n_features = property(lambda self: self.matrix.n_features)
    n_present = property(lambda self: self.matrix.n_present)
    measured = property(lambda self: self.matrix.measured)

    @property
    def batches(self) -> np.ndarray:
        """The batch indices present among the cells (-1, unknown, excluded)."""
        present = np.unique(self.codes)
        return present[present >= 0]

    def rows(self, index: np.ndarray) -> np.ndarray:
        values = self.matrix.rows(index)
        out = np.zeros((len(values), values.shape[1] + self.n_batches), dtype=np.float32)
        out[:, : values.shape[1]] = values
        codes = self.codes[index]
        known = codes >= 0
        out[np.flatnonzero(known), values.shape[1] + codes[known]] = 1.0
        return out


@register
@dataclass(frozen=True, kw_only=True)
class Embedding(Task):
    """A keyed autoencoder (:class:`~scinfl.nn.Autoencoder`) whose latent is the cell embedding.

    Writes ``.obsm[f"X_{key_added}"]``: the latent.

    Parameters
    ----------
    n_latent
        Width of the latent.
    likelihood
        The reconstruction loss that suits the input: ``"gaussian"`` (mean squared error) for
        log-normalised values, ``"poisson"`` or ``"nb"`` (negative binomial, a learned dispersion per
        gene, as scVI's default) for raw counts, ``"clr"`` for counts compared as their centred
        log-ratio (:mod:`scinfl.nn.likelihoods`). DP-SGD trains every likelihood but ``"nb"``, whose
        per-gene dispersion Opacus has no per-cell gradient rule for. With ``join="outer"``, each site's loss covers
        only the features it measures.
    spatial_key
        Spatial data: ``.obsm`` key of each spot's coordinates. Each site builds its own graph of every
        spot's ``spatial_neighbors`` nearest spots (it never leaves the site), and the network reads each
        spot as the mean of its profile and its neighbours' mean profile, a parameter-free light graph
        convolution, so that embeddings group spots into spatial domains. Prediction applies the same.
    spatial_neighbors
        Neighbours per spot of the spatial graph.
    site_effects
        Integrate the sites: the network knows each cell's site (:class:`~scinfl.nn.Autoencoder`,
        ``n_batches``). The encoder's first layer reads the features only, but each site's cells are
        normalised by that site's own statistics (:class:`~scinfl.nn.BatchwiseNorm`, as FedBN), and the
        decoder is conditioned on the site, as scVI's on its batch, so that the latent need not carry what
        differs between sites. Each site trains its own shift and statistics and is the only one to send
        them: the server, also under secure aggregation, receives them as they are, and every site with
        the global weights. A key holder reads from them each site's mean profile, within the first
        layer's row space; a server without the hardened key does not (``docs/privacy.md``). A site that
        was not in the federation is embedded with the mean of the sites' statistics
        (:meth:`scinfl.FederatedModel.predict`), or maps itself in (:func:`scinfl.tl.map_site`).
    batch_key
        An ``.obs`` column of batches within the sites (donors, lanes, protocols), taken into account as
        ``site_effects`` takes the sites: its categories (agreed over the sites) are the batches; with
        ``site_effects`` too, each (site, category) pair is one.
    label_key
        Optional ``.obs`` column of labels; they only stratify each site's validation cells.
    """

    n_latent: int = 16
    likelihood: Literal["gaussian", "poisson", "nb", "clr"] = "gaussian"
    spatial_key: str | None = None
    spatial_neighbors: int = 6
    site_effects: bool = False
    batch_key: str | None = None
    label_key: str | None = None

    name: ClassVar[str] = "embedding"
    output: ClassVar[str] = "embedding"

    @property
    def supports_dp(self) -> bool:
        # Opacus has no per-cell gradient rule for a bare parameter (the dispersion, the batch shifts)
        return self.likelihood != "nb" and not self.conditioned

    @property
    def conditioned(self) -> bool:
        """Is the network aware of batches (``site_effects`` or ``batch_key``)?"""
        return self.site_effects or self.batch_key is not None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(
                f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {self.likelihood!r}."
            )
        if self.n_latent < 1:
            raise ValueError(f"n_latent must be positive, got {self.n_latent}.")
        if self.spatial_neighbors < 1:
            raise ValueError(f"spatial_neighbors must be at least 1, got {self.spatial_neighbors}.")
        if self.batch_key is not None and self.batch_key == self.label_key:
            raise ValueError(
                f"batch_key and label_key are both {self.batch_key!r}: the decoder would be told the "
                "labels the latent should keep."
            )

    def obsm_keys(self) -> tuple[str, ...]:
        return () if self.spatial_key is None else (self.spatial_key,)

    def agreed_columns(self) -> tuple[str, ...]:
        return () if self.batch_key is None else (self.batch_key,)

    def _batch_name(self, site: str, category: str | None) -> str:
        if category is None:
            return site
        return f"{site}/{category}" if self.site_effects else category

    def agree(self, descriptions: Mapping[str, Mapping[str, Any]], *, join: str) -> FederationSchema:
        """The federation schema; a batch-aware network's batches are recorded in it (:data:`BATCHES`),
        sorted: the sites, the ``batch_key`` categories or their (site, category) pairs."""
        schema = super().agree(descriptions, join=join)
        if not self.conditioned:
            return schema
        names: set[str] = set()
        for site, description in descriptions.items():
            if self.batch_key is None:
                names.add(self._batch_name(site, None))
            else:
                names |= {self._batch_name(site, c) for c in description["covariates"][self.batch_key]}
        covariates = (*(c for c in schema.covariates if c[0] != BATCHES), (BATCHES, tuple(sorted(names))))
        return dataclasses.replace(schema, covariates=covariates)

    @staticmethod
    def batches(schema: FederationSchema) -> tuple[str, ...]:
        """The batches a model with ``schema`` knows (none: it is not batch-aware)."""
        return dict(schema.covariates).get(BATCHES, ())

    def _batch_values(self, data, site: str):
        """The ``batch_key`` column of ``site``'s cells; raises naming the site if it is missing or a cell
        has no value."""
        if self.batch_key not in data.obs:
            raise ValueError(f"Site {site!r}: batch column {self.batch_key!r} is missing from .obs.")
        values = data.obs[self.batch_key]
        if values.isna().any():
            raise ValueError(
                f"Site {site!r}: {int(values.isna().sum())} cells have no value in batch column "
                f"{self.batch_key!r}."
            )
        return values

    def site_batches(self, data, site: str) -> tuple[str, ...]:
        """The names of the batches of ``site``'s cells (sorted)."""
        if self.batch_key is None:
            return (self._batch_name(site, None),)
        values = self._batch_values(data, site).astype(str).unique()
        return tuple(sorted(self._batch_name(site, value) for value in values))

    @staticmethod
    def with_batches(schema: FederationSchema, names: tuple[str, ...]) -> FederationSchema:
        """``schema`` with the batches ``names`` after its own (their one-hot columns come last, so that the
        known batches keep theirs)."""
        known = Embedding.batches(schema)
        added = tuple(name for name in names if name not in known)
        covariates = (*(c for c in schema.covariates if c[0] != BATCHES), (BATCHES, known + added))
        return dataclasses.replace(schema, covariates=covariates)

    def batch_codes(self, data, site: str, schema: FederationSchema) -> np.ndarray:
        """Each cell's index among the schema's batches; -1 where the model does not know the batch (a
        site that was not in the federation)."""
        known = {name: i for i, name in enumerate(self.batches(schema))}
        if self.batch_key is None:
            return np.full(data.n_obs, known.get(self._batch_name(site, None), -1), dtype=np.int64)
        values = self._batch_values(data, site)
        lookup = {c: known.get(self._batch_name(site, str(c)), -1) for c in values.unique()}
        return values.map(lookup).to_numpy(dtype=np.int64)

    def inputs(
        self, data, site: str, schema: FederationSchema, *, min_overlap: float | None = None, **fields
    ):
        """Each cell's profile, or with ``spatial_key`` each spot averaged with its neighbours' mean. A
        count likelihood checks that the values are counts."""
        matrix = self.aligned(data, site, schema, min_overlap=min_overlap, **fields)
        if self.likelihood in COUNT_LIKELIHOODS:
            rows = np.random.default_rng(0).choice(matrix.n_obs, size=min(matrix.n_obs, 500), replace=False)
            check_counts(matrix.rows(np.sort(rows)), self.likelihood, site)
        if self.spatial_key is not None:
            matrix = NeighbourhoodMatrix(
                matrix, spatial_graph(data, self.spatial_key, self.spatial_neighbors, site)
            )
        if not self.conditioned:
            return matrix
        return BatchMatrix(matrix, self.batch_codes(data, site, schema), len(self.batches(schema)))

    def build_network(self, config: ModelConfig) -> nn.Module:
        return Autoencoder(
            config.n_features,
            n_latent=self.n_latent,
            hidden=self.hidden,
            dropout=self.dropout,
            norm=config.norm,
            likelihood=self.likelihood,
            n_batches=len(self.batches(config.schema)),
        )

    def trained_parameters(self, network: nn.Module, inputs) -> frozenset[str] | None:
        """Batch-aware: everything but the shifts and statistics of the batches the site does not hold."""
        if not isinstance(inputs, BatchMatrix):
            return None
        own = {int(i) for i in inputs.batches}
        return frozenset(
            name for name in network.state_dict() if batch_of(name) is None or batch_of(name) in own
        )

    def objective(self, config: ModelConfig, measured: np.ndarray | None = None) -> Reconstruction:
        return Reconstruction(self.likelihood, measured, config.n_features)

    def audit_view(self, config: ModelConfig) -> AuditView:
        # The cell's own values are its features; the batch flags after them are not profile.
        return AuditView(
            output=self.output, objective=self.objective(config), profile=slice(0, config.n_features)
        )
