"""Schema, alignment and sparse-aware batch loading. Knows AnnData; knows nothing of federation."""

from .loader import AlignedMatrix, SiteDataset, batch_loader, check_finite
from .schema import (
    FederationSchema,
    SiteFields,
    build_schema,
    feature_source,
    label_codes,
    site_fields,
    validate_fields,
)
from .spatial import NeighbourhoodMatrix, neighbourhood_coherence, spatial_graph
from .splits import dirichlet_partition, stratified_split

__all__ = [
    "AlignedMatrix",
    "FederationSchema",
    "NeighbourhoodMatrix",
    "SiteDataset",
    "SiteFields",
    "batch_loader",
    "build_schema",
    "check_finite",
    "dirichlet_partition",
    "feature_source",
    "label_codes",
    "neighbourhood_coherence",
    "site_fields",
    "spatial_graph",
    "stratified_split",
    "validate_fields",
]
