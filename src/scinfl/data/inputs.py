"""What a task network reads from one site's aligned matrix: its spatial and perturbation wrappers."""

from __future__ import annotations

from anndata import AnnData

from .perturbation import PerturbationDesign, perturbation_matrix
from .schema import FederationSchema
from .spatial import NeighbourhoodMatrix, spatial_graph

__all__ = ["site_inputs"]


def site_inputs(
    aligned,
    adata: AnnData,
    schema: FederationSchema,
    site: str,
    *,
    spatial_key: str | None = None,
    spatial_neighbors: int = 6,
    design: PerturbationDesign | None = None,
):
    """``aligned`` (a site's :class:`~scinfl.data.AlignedMatrix`) as its model reads it: each spot with its
    neighbours (``spatial_key``, :class:`~scinfl.data.NeighbourhoodMatrix`), then each cell with its
    control profile, perturbation and covariates (``design``, :class:`~scinfl.data.PerturbationMatrix`).
    Training, prediction and the privacy audit all build a site's inputs here."""
    matrix = aligned
    if spatial_key is not None:
        matrix = NeighbourhoodMatrix(matrix, spatial_graph(adata, spatial_key, spatial_neighbors, site))
    if design is not None:
        matrix = perturbation_matrix(matrix, adata, design, schema, site)
    return matrix
