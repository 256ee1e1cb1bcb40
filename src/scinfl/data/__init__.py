"""Schema, alignment and sparse-aware batch loading. Knows AnnData; knows nothing of federation."""

from .loader import AlignedMatrix, SiteDataset, SparseRows, batch_loader, check_finite
from .mosaic import (
    MosaicMatrix,
    build_mosaic_schema,
    describe_mosaic_site,
    is_mudata,
    modality_var_names,
    site_modalities,
)
from .perturbation import (
    PerturbationDesign,
    PerturbationMatrix,
    control_profiles,
    group_moments,
    perturbation_matrix,
)
from .schema import (
    FederationSchema,
    SiteFields,
    build_schema,
    column_categories,
    describe_site,
    feature_source,
    label_codes,
    scinfl_entry,
    site_fields,
    validate_fields,
)
from .sites import as_site_dict
from .spatial import NeighbourhoodMatrix, neighbourhood_coherence, spatial_graph
from .splits import dirichlet_partition, stratified_split

__all__ = [
    "AlignedMatrix",
    "FederationSchema",
    "MosaicMatrix",
    "NeighbourhoodMatrix",
    "PerturbationDesign",
    "PerturbationMatrix",
    "SiteDataset",
    "SiteFields",
    "SparseRows",
    "as_site_dict",
    "batch_loader",
    "build_mosaic_schema",
    "build_schema",
    "check_finite",
    "column_categories",
    "control_profiles",
    "describe_mosaic_site",
    "describe_site",
    "dirichlet_partition",
    "feature_source",
    "group_moments",
    "is_mudata",
    "label_codes",
    "modality_var_names",
    "neighbourhood_coherence",
    "perturbation_matrix",
    "scinfl_entry",
    "site_fields",
    "site_modalities",
    "spatial_graph",
    "stratified_split",
    "validate_fields",
]
