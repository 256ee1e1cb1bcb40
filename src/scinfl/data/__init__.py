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
from .splits import dirichlet_partition, stratified_split

__all__ = [
    "AlignedMatrix",
    "FederationSchema",
    "SiteDataset",
    "SiteFields",
    "batch_loader",
    "build_schema",
    "check_finite",
    "dirichlet_partition",
    "feature_source",
    "label_codes",
    "site_fields",
    "stratified_split",
    "validate_fields",
]
