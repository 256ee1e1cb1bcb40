"""Schema, alignment and sparse-aware batch loading. Knows AnnData; knows nothing of federation."""

from .loader import AlignedMatrix, SiteDataset, batch_loader, check_finite
from .perturbation import (
    PerturbationDesign,
    PerturbationMatrix,
    build_design,
    control_profiles,
    group_moments,
    perturbation_matrix,
)
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
    "PerturbationDesign",
    "PerturbationMatrix",
    "SiteDataset",
    "SiteFields",
    "batch_loader",
    "build_design",
    "build_schema",
    "check_finite",
    "control_profiles",
    "dirichlet_partition",
    "feature_source",
    "group_moments",
    "label_codes",
    "neighbourhood_coherence",
    "perturbation_matrix",
    "site_fields",
    "spatial_graph",
    "stratified_split",
    "validate_fields",
]
