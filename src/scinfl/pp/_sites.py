"""Prepare sites: register each site's AnnData, split one AnnData into simulated sites or a held-out set, give
simulated sites simulated site effects."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
from anndata import AnnData
from scipy import sparse

from ..data import SiteFields, dirichlet_partition, stratified_split, validate_fields
from ..data.schema import scinfl_entry

__all__ = ["register_site", "simulate_site_effects", "split_holdout", "split_sites"]


def register_site(
    adata: AnnData | Mapping[str, AnnData],
    *,
    site: str | None = None,
    label_key: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    modality: str | None = None,
) -> None:
    """Record which fields of a site's AnnData scinfl uses, after checking that they exist.

    Where a site keeps its values is a fact of its data, as in scvi-tools' ``setup_anndata``:
    :func:`scinfl.tl.train_federated`, :func:`scinfl.tl.predict` and a Flower site read the registration.
    Only names are recorded; no data is copied. Sites split from a registered AnnData
    (:func:`split_sites`) inherit its registration.

    Parameters
    ----------
    adata
        The site's data, or several sites (name -> AnnData), each registered under its name.
    site
        The site's name, used in messages (default: its key in a mapping of sites).
    label_key
        Column of ``.obs`` with the labels (classification), unless the task names it.
    layer
        Layer holding the features; None uses ``.X``.
    use_raw
        Use ``.raw`` (its ``X`` and ``var_names``) instead of ``.X``.
    modality
        The modality this AnnData holds in a multi-omics mosaic (``task="mosaic"``), e.g. ``"rna"``,
        ``"prot"`` or ``"atac"``; unregistered AnnData sites of a mosaic hold ``"rna"``.

    Returns
    -------
    None; sets ``adata.uns["scinfl"]["registration"]`` (``use_raw``, and ``site``, ``label_key``,
    ``layer`` and ``modality`` where given), replacing any earlier registration. A view becomes an actual
    AnnData, as with any write into a view; the AnnData it was cut from is not changed.
    """
    if isinstance(adata, Mapping):
        if site is not None:
            raise ValueError("site= names one AnnData; a mapping of sites registers each under its name.")
        for name, one in adata.items():
            register_site(
                one, site=str(name), label_key=label_key, layer=layer, use_raw=use_raw, modality=modality
            )
        return
    name = "adata" if site is None else site
    if not isinstance(adata, AnnData):
        raise TypeError(f"Site {name!r} is a {type(adata).__name__}, not an AnnData.")
    fields = validate_fields(adata, name, SiteFields(label_key=label_key, layer=layer, use_raw=use_raw))
    if adata.n_obs == 0:
        raise ValueError(f"Site {name!r} has no cells.")
    if modality is not None and (not isinstance(modality, str) or not modality or ":" in modality):
        raise ValueError(f"Site {name!r}: a modality is a non-empty name without ':', got {modality!r}.")
    entry = scinfl_entry(adata, name, "scinfl")
    registration = {"use_raw": fields.use_raw}
    registration |= {
        k: v
        for k, v in (
            ("site", site),
            ("label_key", fields.label_key),
            ("layer", fields.layer),
            ("modality", modality),
        )
        if v is not None
    }
    # A new dict, assigned: writing into the existing one would reach through a view into its parent's .uns
    # (assigning makes a view an actual AnnData, as anndata does for any write into a view).
    adata.uns["scinfl"] = {**copy.deepcopy(dict(entry)), "registration": registration}


def split_sites(
    adata: AnnData,
    *,
    site_key: str | None = None,
    n_sites: int | None = None,
    label_key: str | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    min_cells: int = 2,
) -> dict[str, AnnData]:
    """Split one AnnData into simulated sites (new AnnData objects; ``adata`` is unchanged).

    Either by an existing ``.obs`` column (``site_key``, e.g. a batch or donor column), or into
    ``n_sites`` label-skewed sites: every class of ``label_key`` is spread over the sites with
    Dirichlet(``alpha``) proportions (smaller ``alpha``, stronger skew), as in federated benchmarks.

    Parameters
    ----------
    adata
        The data to split.
    site_key
        ``.obs`` column naming each cell's site.
    n_sites
        Number of label-skewed sites (with ``label_key``).
    label_key
        ``.obs`` column whose classes are skewed across sites.
    alpha
        Dirichlet concentration.
    seed
        Random seed of the split.
    min_cells
        Minimum cells per label-skewed site.

    Returns
    -------
    Site name -> AnnData (``site_0``, ``site_1``, ... for label-skewed splits).
    """
    if (site_key is None) == (n_sites is None):
        raise ValueError("Pass either site_key= (split by an .obs column) or n_sites= (label-skewed split).")
    if site_key is not None:
        if site_key not in adata.obs:
            raise ValueError(f"site_key {site_key!r} is not a column of .obs.")
        values = adata.obs[site_key].astype(str).to_numpy()
        return {name: adata[values == name].copy() for name in dict.fromkeys(sorted(set(values)))}
    if label_key is None or label_key not in adata.obs:
        raise ValueError(f"A label-skewed split needs label_key= naming an .obs column; got {label_key!r}.")
    labels = adata.obs[label_key].astype(str).to_numpy()
    parts = dirichlet_partition(labels, n_sites, alpha, np.random.default_rng(seed), min_size=min_cells)
    return {f"site_{i}": adata[idx].copy() for i, idx in enumerate(parts)}


def split_holdout(
    adata: AnnData, *, label_key: str, fraction: float = 0.2, seed: int = 0
) -> tuple[AnnData, AnnData]:
    """Split off a stratified held-out set: returns new ``(rest, held_out)`` AnnData objects.

    Every class with at least two cells contributes ``fraction`` of its cells to the held-out set.
    """
    if label_key not in adata.obs:
        raise ValueError(f"label_key {label_key!r} is not a column of .obs.")
    labels = adata.obs[label_key].astype(str).to_numpy()
    kept, held_out = stratified_split(labels, fraction, np.random.default_rng(seed))
    return adata[kept].copy(), adata[held_out].copy()


def simulate_site_effects(
    sites: Mapping[str, AnnData],
    *,
    layer: str | None = None,
    gene_sd: float = 0.5,
    library_sd: float = 0.3,
    seed: int = 0,
) -> dict[str, AnnData]:
    """Give each site a simulated site effect on its real counts (new AnnData objects; ``sites`` unchanged).

    Per site, every gene's counts are multiplied by ``exp(N(0, gene_sd^2))`` (a capture efficiency per
    gene, drawn per site) and all of them by ``exp(N(0, library_sd^2))`` (a sequencing depth, drawn per
    site), then rounded to whole counts. The cells stay themselves: what an integration should remove is
    known, and what it should keep (their types) is real. For checking an integration, e.g. sites split
    from one data set (:func:`split_sites`).

    Parameters
    ----------
    sites
        Site name -> AnnData of raw counts.
    layer
        Where each site keeps its counts (default ``.X``); the same place is changed in the copies.
    gene_sd, library_sd
        Standard deviations of the log effects per gene and per site.
    seed
        Random seed; each site's effects are drawn in the order of ``sites``.

    Returns
    -------
    Site name -> a copy with the site's effect applied.
    """
    if gene_sd < 0 or library_sd < 0:
        raise ValueError(f"gene_sd and library_sd must be non-negative, got {gene_sd} and {library_sd}.")
    rng = np.random.default_rng(seed)
    out = {}
    for name, adata in sites.items():
        values = adata.X if layer is None else adata.layers[layer]
        dense = values.toarray() if sparse.issparse(values) else np.asarray(values)
        if dense.size and (dense.min() < 0 or not np.array_equal(dense, np.round(dense))):
            raise ValueError(
                f"Site {name!r}: its {'X' if layer is None else f'layer {layer!r}'} does not hold raw counts "
                "(negative or fractional values); site effects are simulated on counts."
            )
        gene = np.exp(rng.normal(0.0, gene_sd, size=adata.n_vars))
        library = np.exp(rng.normal(0.0, library_sd))
        changed = np.rint(dense * gene * library).astype(np.float32)
        site = adata.copy()
        changed = sparse.csr_matrix(changed) if sparse.issparse(values) else changed
        if layer is None:
            site.X = changed
        else:
            site.layers[layer] = changed
        out[name] = site
    return out
