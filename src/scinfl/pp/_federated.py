"""Federated preprocessing: scanpy's ``highly_variable_genes``, ``scale`` and ``pca`` on the pooled cells,
computed from sums of per-site statistics, written into every site.

The recipes (:mod:`scinfl.federation.preprocessing`) run where the aggregator is (this process, or Flower's
ServerApp) and see only sums over the sites; each site then writes the consortium's result (gene flags,
the pooled mean and standard deviation, the principal axes) into its own AnnData
(:func:`apply_preprocessing`, which a deployment's sites call on the result file).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._warnings import warn
from ..data import as_site_dict
from ..data.statistics import chunks, matrix_of
from ..federation import SecureAggregation, get_engine
from ..federation.preprocessing import PreprocessingResult
from ..federation.statistics import MIN_STATISTIC_CELLS, StatisticsSpec

__all__ = ["apply_preprocessing", "highly_variable_genes", "pca", "scale"]

Join = Literal["inner", "outer"]
Engine = str  # a name of scinfl.federation.engine_names(): "local" (default) or "flower"
SITES = "site"  # batch_key that means "each site is a batch" when no site has such a column
_DEFAULT = object()


def _preprocess(
    sites: Mapping[str, Any],
    targets: Mapping[str, AnnData],
    step: str,
    options: Mapping[str, Any],
    *,
    layer: str | None,
    secure_aggregation: bool | SecureAggregation | Mapping[str, int],
    min_cells: int,
    engine: Engine,
    batch_key: str | None = None,
    key_added: str | None = None,
) -> None:
    """Run the recipe of ``step`` with ``options`` over ``sites`` on the chosen engine, and write its result
    into each of ``targets`` (the sites, or their copies)."""
    batches_are_sites = batch_key == SITES and not any(SITES in data.obs for data in sites.values())
    secure = SecureAggregation.from_option(secure_aggregation)
    spec = StatisticsSpec(
        sites=tuple(sites),
        layer=layer,
        batch_key=None if batches_are_sites else batch_key,
        batches_are_sites=batches_are_sites,
        secure_aggregation=secure is not None,
        min_cohort=(secure or SecureAggregation()).min_cohort,
        min_cells=min_cells,
    )
    result = get_engine(engine).statistics(sites, spec, step, options)
    for name, data in targets.items():
        apply_preprocessing(data, result, site=name, layer=layer, key_added=key_added)


def _sites_for_writing(sites, opened: set[str], copy: bool) -> dict[str, AnnData]:
    """The AnnData objects the results go into: the sites themselves, or copies (``copy=True``)."""
    if opened and not copy:
        raise ValueError(
            f"Site(s) {', '.join(sorted(opened))} were given as paths: pass copy=True to receive their AnnData "
            "with the results (a file opened here is not yours to change in place)."
        )
    for name, data in sites.items():
        if not isinstance(data, AnnData):
            raise TypeError(
                f"Site {name!r} is a {type(data).__name__}; federated preprocessing reads AnnData."
            )
    if not copy:
        return dict(sites)
    return {name: data.to_memory() if data.isbacked else data.copy() for name, data in sites.items()}


def _log1p_base(sites: Mapping[str, AnnData], flavor: str) -> float | None:
    """The logarithm base the sites' ``.uns['log1p']`` record (seurat un-logs with it); they must agree."""
    if flavor != "seurat":
        return None
    bases = {name: (data.uns.get("log1p") or {}).get("base") for name, data in sites.items()}
    if len({repr(b) for b in bases.values()}) > 1:
        raise ValueError(
            "The sites logarithmised with different bases (.uns['log1p']['base']: "
            + ", ".join(f"{s}: {b}" for s, b in bases.items())
            + "); normalise them the same way first."
        )
    base = next(iter(bases.values()))
    return None if base is None else float(base)


def highly_variable_genes(
    sites: Mapping[str, AnnData | str] | list,
    *,
    layer: str | None = None,
    n_top_genes: int | None = None,
    min_disp: float = 0.5,
    max_disp: float = np.inf,
    min_mean: float = 0.0125,
    max_mean: float = 3,
    span: float = 0.3,
    n_bins: int = 20,
    flavor: Literal["seurat", "cell_ranger", "seurat_v3"] = "seurat",
    batch_key: str | None = None,
    join: Join = "inner",
    secure_aggregation: bool | SecureAggregation | Mapping[str, int] = True,
    min_cells: int = MIN_STATISTIC_CELLS,
    engine: Engine = "local",
    copy: bool = False,
) -> dict[str, AnnData] | None:
    """Highly variable genes of the pooled cells, chosen without pooling them.

    Computes what :func:`scanpy.pp.highly_variable_genes` computes on the sites' cells concatenated
    (``anndata.concat(sites, join=join, label="site")``), from per-gene sums and sums of squares summed
    over the sites (for ``seurat_v3``, a second round of sums clipped at each gene's regularised maximum),
    and writes the result into every site. Under secure aggregation the aggregator learns only those sums.

    Parameters
    ----------
    sites
        Site name -> AnnData (in memory or backed) or h5ad path (opened backed; needs ``copy=True``).
    layer
        Where the values are (None: ``.X``): log-normalised for ``seurat`` and ``cell_ranger``, raw
        counts for ``seurat_v3``, as scanpy expects.
    n_top_genes, min_disp, max_disp, min_mean, max_mean, span, n_bins, flavor
        As in :func:`scanpy.pp.highly_variable_genes`.
    batch_key
        A column of every site's ``.obs``: genes are selected per batch and combined as scanpy does. The
        value ``"site"`` (when no site has such a column) makes each site a batch. Each batch's per-gene
        statistics are released to the aggregator (that is what scanpy's batch mode is computed from), so
        a batch that is one site reveals that site's per-gene means and variances, never its cells; every
        batch needs ``min_cells`` cells.
    join
        ``"inner"``: the genes every site has. ``"outer"``: every site's genes; a site that lacks a gene
        counts as zero in each of its cells, which is what ``anndata.concat(join="outer")`` of sparse
        matrices pools (a panel that did not measure a gene is not the same as no expression: prefer
        ``"inner"`` unless the panels differ by unexpressed genes only).
    secure_aggregation
        Sum the statistics under pairwise masks (:mod:`scinfl.federation.secure`) over at least 3 sites,
        or ``{"min_cohort": 2}`` (:class:`~scinfl.federation.secure.SecureAggregation`); ``False`` sends each
        site's sums in the clear.
    min_cells
        Refuse a site (or a batch) with fewer cells: its statistics would be close to the cells.
    engine
        ``"local"`` (in-process) or ``"flower"`` (Flower's simulation: the ServerApp runs this recipe and
        each ClientApp answers for its site, through the same protocol as a deployment).
    copy
        Return the sites as new AnnData objects with the results instead of writing into them.

    Returns
    -------
    None, or with ``copy=True`` the sites with the results. Sets in every site, for the genes it has:
    ``.var['highly_variable']``, ``['means']``, and for ``seurat``/``cell_ranger`` ``['dispersions']``,
    ``['dispersions_norm']``, for ``seurat_v3`` ``['variances']``, ``['variances_norm']``,
    ``['highly_variable_rank']``; with batches ``['highly_variable_nbatches']`` (and
    ``['highly_variable_intersection']``). ``.uns['hvg'] = {'flavor': flavor}``. A gene outside the
    pooled set (``join="inner"``: one some site lacks) is not highly variable and has NaN statistics.
    Exact ties with the last selected gene are all selected (seurat, cell_ranger) or broken by the pooled
    gene order (seurat_v3), as scanpy breaks them on the concatenated data.
    """
    site_data, opened = as_site_dict(sites, "highly_variable_genes")
    targets = _sites_for_writing(site_data, opened, copy)
    options = {
        "flavor": flavor,
        "n_top_genes": n_top_genes,
        "min_disp": min_disp,
        "max_disp": max_disp,
        "min_mean": min_mean,
        "max_mean": max_mean,
        "span": span,
        "n_bins": n_bins,
        "join": join,
        "log_base": _log1p_base(site_data, flavor),
    }
    _preprocess(
        site_data,
        targets,
        "highly_variable_genes",
        options,
        layer=layer,
        secure_aggregation=secure_aggregation,
        min_cells=min_cells,
        engine=engine,
        batch_key=batch_key,
    )
    return targets if copy else None


def scale(
    sites: Mapping[str, AnnData] | list,
    *,
    zero_center: bool = True,
    max_value: float | None = None,
    layer: str | None = None,
    join: Join = "inner",
    secure_aggregation: bool | SecureAggregation | Mapping[str, int] = True,
    min_cells: int = MIN_STATISTIC_CELLS,
    engine: Engine = "local",
    copy: bool = False,
) -> dict[str, AnnData] | None:
    """Scale every site to unit variance and zero mean with the pooled cells' mean and standard deviation.

    What :func:`scanpy.pp.scale` does on the concatenated sites, from per-gene sums and sums of squares
    summed over the sites; each site then scales its own values.

    Parameters
    ----------
    sites
        Site name -> AnnData (in memory: scaling rewrites its values).
    zero_center, max_value, layer
        As in :func:`scanpy.pp.scale` (a sparse matrix becomes dense when zero-centred, as there).
    join, secure_aggregation, min_cells, engine, copy
        As in :func:`highly_variable_genes`. Genes outside the pooled set (``join="inner"``: one some
        site lacks) are left as they are, with NaN ``mean`` and ``std``.

    Returns
    -------
    None, or with ``copy=True`` the scaled sites. Sets ``.X`` (or the layer), ``.var['mean']`` and
    ``.var['std']`` (the pooled values before scaling) in every site.
    """
    site_data, opened = as_site_dict(sites, "scale")
    for name, data in site_data.items():
        if getattr(data, "isbacked", False) and not copy:
            raise ValueError(f"Site {name!r} is backed: scaling rewrites its values; pass copy=True.")
    targets = _sites_for_writing(site_data, opened, copy)
    _preprocess(
        site_data,
        targets,
        "scale",
        {"join": join, "zero_center": zero_center, "max_value": max_value},
        layer=layer,
        secure_aggregation=secure_aggregation,
        min_cells=min_cells,
        engine=engine,
    )
    return targets if copy else None


def pca(
    sites: Mapping[str, AnnData] | list,
    n_comps: int | None = None,
    *,
    layer: str | None = None,
    mask_var: str | None = _DEFAULT,  # type: ignore[assignment]
    method: Literal["auto", "covariance", "randomized"] = "auto",
    n_iter: int = 12,
    random_state: int = 0,
    key_added: str | None = None,
    join: Join = "inner",
    secure_aggregation: bool | SecureAggregation | Mapping[str, int] = True,
    min_cells: int = MIN_STATISTIC_CELLS,
    engine: Engine = "local",
    copy: bool = False,
) -> dict[str, AnnData] | None:
    """Principal components of the pooled cells, and every site's cells in that one space.

    What :func:`scanpy.pp.pca` computes (zero-centred) on the concatenated sites, from the pooled mean and
    covariance: ``method="covariance"`` sums each site's ``X^T X`` (genes x genes) once;
    ``"randomized"`` builds a block Krylov space from ``n_iter`` sums of ``X^T (X Q)`` (genes x
    ``2 * n_comps``) and one more over its span, for many genes (on scaled Datlinger data, where the 30th
    and 31st eigenvalues differ by 0.4%, 12 iterations reach 4.6e-6 rad of the exact top 30; 8 reach
    9.5e-3). ``"auto"``: covariance up to 4,000 genes. Each site projects its own cells.

    Parameters
    ----------
    sites
        Site name -> AnnData (in memory or backed) or h5ad path (needs ``copy=True``).
    n_comps
        Components; default as scanpy (50, or one less than the smaller of genes and cells).
    layer, mask_var, key_added
        As in :func:`scanpy.pp.pca`; ``mask_var`` defaults to ``"highly_variable"`` when every site has it.
    method, n_iter, random_state
        How the axes are found (above); ``random_state`` seeds the randomized start.
    join, secure_aggregation, min_cells, engine, copy
        As in :func:`highly_variable_genes`.

    Returns
    -------
    None, or with ``copy=True`` the sites with the results. Sets in every site ``.obsm['X_pca']``,
    ``.varm['PCs']`` (zero for genes outside the PCA) and ``.uns['pca']`` (``variance``,
    ``variance_ratio``, ``params``), under ``key_added`` if given. Axes are signed so that each one's
    largest loading is positive, as scanpy's.
    """
    site_data, opened = as_site_dict(sites, "pca")
    targets = _sites_for_writing(site_data, opened, copy)
    genes, mask_name = _mask_genes(site_data, mask_var)
    options = {
        "n_comps": n_comps,
        "genes": genes,
        "mask_var": mask_name,
        "method": method,
        "n_iter": n_iter,
        "random_state": random_state,
        "join": join,
    }
    _preprocess(
        site_data,
        targets,
        "pca",
        options,
        layer=layer,
        secure_aggregation=secure_aggregation,
        min_cells=min_cells,
        engine=engine,
        key_added=key_added,
    )
    return targets if copy else None


def apply_preprocessing(
    adata: AnnData,
    result: PreprocessingResult | str | Path,
    *,
    site: str | None = None,
    layer: str | None = None,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Write a federated preprocessing result into one site's AnnData, as scanpy writes its own.

    :func:`highly_variable_genes`, :func:`scale` and :func:`pca` call it for every site they hold. On a
    deployment, the consortium's ServerApp writes the result to a file (``preprocess=`` in its run
    config, ``docs/across_sites.md``), and each site applies that file to its own data.

    Parameters
    ----------
    adata
        The site's AnnData (in memory, except for gene selection).
    result
        A :class:`~scinfl.federation.preprocessing.PreprocessingResult` or the path of one saved.
    site
        The site's name, for messages.
    layer
        Where the values are (None: ``.X``): what is scaled, or projected on the axes.
    key_added
        For a PCA: ``.obsm``/``.varm``/``.uns`` key instead of ``X_pca``/``PCs``/``pca``.
    copy
        Return a copy with the result instead of writing into ``adata``.

    Returns
    -------
    None, or with ``copy=True`` the AnnData with the result.
    """
    if not isinstance(result, PreprocessingResult):
        result = PreprocessingResult.load(result)
    data = adata.copy() if copy else adata
    name = site or "this site"
    if result.step == "highly_variable_genes":
        _write_var(data, result.table)
        data.uns["hvg"] = {"flavor": result.options["flavor"]}
    elif result.step == "scale":
        _scale_site(data, name, result, layer=layer)
    elif result.step == "pca":
        _project_site(data, name, result, layer=layer, key_added=key_added)
    else:
        raise ValueError(f"Unknown preprocessing step {result.step!r}.")
    return data if copy else None


def _write_var(data: AnnData, table: pd.DataFrame) -> None:
    """The pooled gene table into a site's ``.var``, aligned by name (NaN/False for genes outside it)."""
    aligned = table.reindex(pd.Index(data.var_names).astype(str))
    for column in table.columns:
        values = aligned[column]
        if column in ("highly_variable", "highly_variable_intersection"):
            values = values.eq(True)  # False outside the pooled set
        elif column == "highly_variable_nbatches":
            values = values.fillna(0).astype(int)
        elif column == "dispersions_norm":
            values = values.astype(np.float32)
        else:
            values = values.astype(np.float64)
        data.var[column] = values.to_numpy()


def _scale_site(data: AnnData, site: str, result: PreprocessingResult, *, layer) -> None:
    zero_center, max_value = result.options["zero_center"], result.options["max_value"]
    if getattr(data, "isbacked", False):
        raise ValueError(f"Site {site!r} is backed: scaling rewrites its values; load it into memory first.")
    matrix, var_names = matrix_of(data, layer, site)
    aligned = result.table.reindex(var_names)
    inside = aligned["mean"].notna().to_numpy()
    mean = aligned["mean"].to_numpy()
    std = aligned["std"].to_numpy().copy()
    std[std == 0] = 1
    if sparse.issparse(matrix) and zero_center:
        warn(f"Site {site!r}: zero-centering a sparse matrix densifies it (as scanpy.pp.scale does).")
    x = matrix.toarray() if sparse.issparse(matrix) and zero_center else matrix.copy()
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float64)
    columns = np.flatnonzero(inside)
    if sparse.issparse(x):  # not zero-centred: divide the stored values, keep the zeros
        x = sparse.csr_matrix(x)
        divisor = np.ones(x.shape[1])
        divisor[columns] = std[columns]
        x.data /= divisor[x.indices].astype(x.dtype)
        if max_value is not None:
            limit = np.full(x.shape[1], np.inf)
            limit[columns] = max_value
            x.data = np.minimum(x.data, limit[x.indices])
    else:
        x = np.asarray(x)
        part = x[:, columns]
        if zero_center:
            part -= mean[columns]
        part /= std[columns]
        if max_value is not None:
            part = np.clip(part, -max_value, max_value) if zero_center else np.minimum(part, max_value)
        x[:, columns] = part
    if layer is None:
        data.X = x
    else:
        data.layers[layer] = x
    data.var["mean"] = aligned["mean"].to_numpy(dtype=np.float64)
    data.var["std"] = np.where(inside, aligned["std"].to_numpy(dtype=np.float64), np.nan)
    if not inside.all():
        warn(
            f"Site {site!r}: {int((~inside).sum())} genes outside the pooled set (join='inner') were left unscaled."
        )


def _mask_genes(sites: Mapping[str, AnnData], mask_var) -> tuple[list[str] | None, str | None]:
    """The genes the PCA uses (None: every agreed gene) and the mask's name for ``.uns['pca']['params']``.
    Every site must flag the same genes among those it has."""
    if mask_var is _DEFAULT:
        mask_var = "highly_variable" if all("highly_variable" in d.var for d in sites.values()) else None
    if mask_var is None:
        return None, None
    if not isinstance(mask_var, str):
        raise TypeError("mask_var must be the name of a boolean .var column of every site, or None.")
    chosen: dict[str, None] = {}
    for name, data in sites.items():
        if mask_var not in data.var:
            raise ValueError(f"Site {name!r}: .var has no column {mask_var!r} to select the PCA's genes.")
        flags = data.var[mask_var].to_numpy()
        if flags.dtype != bool:
            raise TypeError(f"Site {name!r}: .var[{mask_var!r}] is {flags.dtype}, not boolean.")
        chosen.update(dict.fromkeys(pd.Index(data.var_names).astype(str)[flags]))
    for name, data in sites.items():
        names = pd.Index(data.var_names).astype(str)
        disagree = (set(chosen) & set(names)) - set(names[data.var[mask_var].to_numpy()])
        if disagree:
            raise ValueError(
                f"Site {name!r}: .var[{mask_var!r}] leaves out {len(disagree)} gene(s) other sites select "
                f"(e.g. {sorted(disagree)[:3]}); select the genes together (scinfl.pp.highly_variable_genes)."
            )
    return list(chosen), mask_var


def _project_site(data: AnnData, site: str, result: PreprocessingResult, *, layer, key_added) -> None:
    key_obsm, key_varm, key_uns = ("X_pca", "PCs", "pca") if key_added is None else (key_added,) * 3
    matrix, var_names = matrix_of(data, layer, site)
    table = result.table
    position = table.index.get_indexer(var_names)
    source, target = np.flatnonzero(position >= 0), position[position >= 0]
    components = table[[f"PC{i + 1}" for i in range(result.options["n_comps"])]].to_numpy().T  # comps x genes
    dtype = matrix.dtype if np.issubdtype(matrix.dtype, np.floating) else np.float64
    coordinates = np.zeros((matrix.shape[0], len(components)), dtype=np.float64)
    # X_c @ V^T, with the genes a site lacks (outer join) zero before centring, as pooling has them
    offset = -(table["mean"].to_numpy() @ components.T)
    for start, block in chunks(matrix):
        block = block[:, source].astype(np.float64)
        coordinates[start : start + block.shape[0]] = np.asarray(block @ components[:, target].T) + offset
    loadings = np.zeros((data.n_vars, len(components)))
    loadings[source] = components[:, target].T
    data.obsm[key_obsm] = coordinates.astype(dtype)
    data.varm[key_varm] = loadings
    mask_var = result.options.get("mask_var")
    params = {"zero_center": True, "use_highly_variable": mask_var == "highly_variable"}
    if mask_var is not None:
        params["mask_var"] = mask_var
    if layer is not None:
        params["layer"] = layer
    data.uns[key_uns] = {
        "params": params,
        "variance": np.asarray(result.arrays["variance"]),
        "variance_ratio": np.asarray(result.arrays["variance_ratio"]),
    }
