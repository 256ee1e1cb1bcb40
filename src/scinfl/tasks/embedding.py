"""A cell embedding without labels: a keyed autoencoder whose latent is the embedding (optionally spatial)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .._warnings import warn
from ..data import FederationSchema, NeighbourhoodMatrix, spatial_graph
from ..nn import LIKELIHOODS, Autoencoder, cell_losses
from ._base import ModelConfig, PerCellObjective, Task, register

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


__all__ = ["Embedding", "Reconstruction"]


class Reconstruction(PerCellObjective):
    """The autoencoder's objective: a per-cell reconstruction loss (:func:`scinfl.nn.cell_losses`) of the
    input, over the features the site measures (``measured``), averaged over cells."""

    def __init__(self, likelihood: str, measured: np.ndarray | None = None) -> None:
        self.likelihood = likelihood
        self.measured = None if measured is None or measured.all() else torch.from_numpy(measured)

    def cell_losses(self, output: Tensor, x: Tensor) -> Tensor:
        measured = None if self.measured is None else self.measured.to(x.device)
        return cell_losses(self.likelihood, output, x, measured)


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
    label_key
        Optional ``.obs`` column of labels; they only stratify each site's validation cells.
    """

    n_latent: int = 16
    likelihood: Literal["gaussian", "poisson", "nb", "clr"] = "gaussian"
    spatial_key: str | None = None
    spatial_neighbors: int = 6
    label_key: str | None = None

    name: ClassVar[str] = "embedding"
    output: ClassVar[str] = "embedding"

    @property
    def supports_dp(self) -> bool:  # Opacus has no per-cell gradient rule for the dispersion parameter
        return self.likelihood != "nb"

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

    def obsm_keys(self) -> tuple[str, ...]:
        return () if self.spatial_key is None else (self.spatial_key,)

    def inputs(
        self, data, site: str, schema: FederationSchema, *, min_overlap: float | None = None, **fields
    ):
        """Each cell's profile, or with ``spatial_key`` each spot averaged with its neighbours' mean. A
        count likelihood checks that the values are counts."""
        matrix = self.aligned(data, site, schema, min_overlap=min_overlap, **fields)
        if self.likelihood in COUNT_LIKELIHOODS:
            rows = np.random.default_rng(0).choice(matrix.n_obs, size=min(matrix.n_obs, 500), replace=False)
            check_counts(matrix.rows(np.sort(rows)), self.likelihood, site)
        if self.spatial_key is None:
            return matrix
        return NeighbourhoodMatrix(
            matrix, spatial_graph(data, self.spatial_key, self.spatial_neighbors, site)
        )

    def build_network(self, config: ModelConfig) -> nn.Module:
        return Autoencoder(
            config.n_features,
            n_latent=self.n_latent,
            hidden=self.hidden,
            dropout=self.dropout,
            norm=config.norm,
            likelihood=self.likelihood,
        )

    def objective(self, config: ModelConfig, measured: np.ndarray | None = None) -> Reconstruction:
        return Reconstruction(self.likelihood, measured)
