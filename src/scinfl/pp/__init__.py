"""Prepare sites: register each site's AnnData, split one AnnData into simulated sites or a held-out set,
and preprocess the sites together without pooling them (highly variable genes, scaling, PCA)."""

from ._federated import apply_preprocessing, highly_variable_genes, pca, scale
from ._sites import register_site, simulate_site_effects, split_holdout, split_sites

__all__ = [
    "apply_preprocessing",
    "highly_variable_genes",
    "pca",
    "register_site",
    "scale",
    "simulate_site_effects",
    "split_holdout",
    "split_sites",
]
