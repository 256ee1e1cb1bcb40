"""Federated preprocessing: scanpy's ``highly_variable_genes``, ``scale`` and ``pca`` on the pooled cells,
computed from sums of per-site statistics (:mod:`scinfl.federation.statistics`), written into every site.

Each function is one recipe of statistics rounds: what to ask the sites for, and what scanpy computes from
the pooled sums. The recipe runs where the aggregator is (this process, or Flower's ServerApp), and sees
only sums over the sites; each site then writes the consortium's result (gene flags, the global mean and
standard deviation, the principal axes) into its own AnnData.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._warnings import warn
from ..data import as_site_dict
from ..data.statistics import StatisticRequest, chunks, matrix_of
from ..federation import InProcess
from ..federation.statistics import MIN_STATISTIC_CELLS, StatisticsExchange, StatisticsSpec

__all__ = ["highly_variable_genes", "pca", "scale"]

T = TypeVar("T")
Join = Literal["inner", "outer"]
Engine = Literal["local", "flower"]
SITES = "site"  # batch_key that means "each site is a batch" when no site has such a column

# The 75th percentile of the standard normal: a median absolute deviation / this estimates a standard
# deviation (statsmodels' ``mad``, which scanpy's cell_ranger flavor uses).
_MAD_SCALE = 0.6744897501960817


@dataclass(frozen=True)
class _Options:
    """What every federated preprocessing function shares."""

    layer: str | None
    join: Join
    secure_aggregation: bool
    min_cohort: int
    min_cells: int
    engine: Engine


def _run(
    sites: Mapping[str, Any],
    options: _Options,
    recipe: Callable[[StatisticsExchange], T],
    *,
    batch_key: str | None = None,
) -> T:
    """Run ``recipe`` against an exchange over ``sites`` on the chosen engine."""
    batches_are_sites = batch_key == SITES and not any(SITES in data.obs for data in sites.values())
    spec = StatisticsSpec(
        sites=tuple(sites),
        layer=options.layer,
        batch_key=None if batches_are_sites else batch_key,
        batches_are_sites=batches_are_sites,
        secure_aggregation=options.secure_aggregation,
        min_cohort=options.min_cohort,
        min_cells=options.min_cells,
    )
    if options.engine == "local":
        return recipe(StatisticsExchange(InProcess(sites, {}), spec))
    if options.engine == "flower":
        from ..federation.flower import simulate_statistics

        return simulate_statistics(sites, spec, recipe)
    raise ValueError(f"Unknown engine {options.engine!r}; available: 'local', 'flower'.")


def _agreed_genes(exchange: StatisticsExchange, join: Join) -> list[str]:
    """The pooled gene order: the first site's genes, then (``outer``) each further site's new ones;
    ``inner`` keeps those every site has."""
    names = exchange.var_names
    if join == "inner":
        shared = set.intersection(*(set(v) for v in names.values()))
        genes = [g for g in next(iter(names.values())) if g in shared]
        if not genes:
            counts = ", ".join(f"{s}: {len(v)}" for s, v in names.items())
            raise ValueError(
                f"The sites share no genes ({counts} genes); check that they name genes the same way "
                "(symbols or Ensembl IDs), or pass join='outer'."
            )
        return genes
    if join != "outer":
        raise ValueError(f"join must be 'inner' or 'outer', got {join!r}.")
    seen: dict[str, None] = {}
    for var_names in names.values():
        seen.update(dict.fromkeys(var_names))
    return list(seen)


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


def _mean_var(n: np.ndarray | float, total: np.ndarray, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance from a count, sums and sums of squares, as scanpy's ``_get_mean_var``."""
    mean = total / n
    var = squares / n - mean**2
    if n != 1:
        var = var * (n / (n - 1))
    return mean, var


# ---- highly variable genes -----------------------------------------------------------------------------


def _dispersion_table(mean: np.ndarray, var: np.ndarray, flavor: str, n_bins: int) -> pd.DataFrame:
    """Means, dispersions and normalised dispersions from per-gene means and variances: scanpy's
    ``_highly_variable_genes_single_batch`` after its ``_get_mean_var``."""
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        if flavor == "seurat":  # logarithmised, as in Seurat
            dispersion[dispersion == 0] = np.nan
            dispersion = np.log(dispersion)
            mean = np.log1p(mean)
    table = pd.DataFrame({"means": mean, "dispersions": dispersion})
    if flavor == "seurat":
        bins: Any = n_bins
    else:
        bins = np.r_[-np.inf, np.percentile(mean, np.arange(10, 105, 5)), np.inf]
    table["mean_bin"] = pd.cut(table["means"], bins=bins)
    grouped = table.groupby("mean_bin", observed=True)["dispersions"]
    if flavor == "seurat":
        stats = grouped.agg(avg="mean", dev="std")
        alone = stats["dev"].isnull()  # a gene alone in its bin: normalised dispersion 1 (scanpy's rule)
        stats.loc[alone, "dev"] = stats.loc[alone, "avg"]
        stats.loc[alone, "avg"] = 0
    else:
        stats = grouped.agg(
            avg="median",
            dev=lambda d: np.median(np.abs(np.asarray(d) - np.median(np.asarray(d)))) / _MAD_SCALE,
        )
    stats = stats.loc[table["mean_bin"]].set_index(table.index)
    table["dispersions_norm"] = (table["dispersions"] - stats["avg"]) / stats["dev"]
    return table.drop(columns="mean_bin")


def _select(
    table: pd.DataFrame, n_top_genes: int | None, cutoffs: tuple[float, float, float, float]
) -> np.ndarray:
    """scanpy's ``_subset_genes``: the top ``n_top_genes`` normalised dispersions (every gene tied with the
    last one included), else the mean and dispersion cutoffs."""
    norm = table["dispersions_norm"].to_numpy()
    if n_top_genes is None:
        min_disp, max_disp, min_mean, max_mean = cutoffs
        norm = np.nan_to_num(norm)
        mean = table["means"].to_numpy()
        return (mean > min_mean) & (mean < max_mean) & (norm > min_disp) & (norm < max_disp)
    finite = np.sort(norm[~np.isnan(norm)])[::-1]
    if len(finite) == 0:
        return np.zeros(len(norm), dtype=bool)
    cut = finite[min(n_top_genes, len(finite)) - 1]
    return np.nan_to_num(norm, nan=-np.inf) >= cut


def _dispersion_hvg(
    exchange, genes, flavor, options, *, n_top_genes, n_bins, cutoffs, log_base
) -> pd.DataFrame:
    batches = exchange.batches
    request = StatisticRequest(
        "moments",
        tuple(genes),
        layer=options.layer,
        transform="expm1" if flavor == "seurat" else None,
        log_base=log_base,
        batch_key=exchange.spec.batch_key,
        batches=tuple(batches),
    )
    moments = exchange.sum(request)
    if not batches:
        mean, var = _mean_var(moments["n"][0], moments["sum"][0], moments["sum_squares"][0])
        table = _dispersion_table(mean, var, flavor, n_bins)
        table.index = pd.Index(genes)
        table["highly_variable"] = _select(table, n_top_genes, cutoffs)
        return table
    # scanpy's batched selection: each batch on its expressed genes, then averaged over the batches
    per_batch = []
    for index in range(len(batches)):
        n = moments["n"][index]
        expressed = moments["sum_squares"][index] > 0
        mean, var = _mean_var(n, moments["sum"][index][expressed], moments["sum_squares"][index][expressed])
        table = _dispersion_table(mean, var, flavor, n_bins)
        table["highly_variable"] = _select(table, n_top_genes, cutoffs).astype(int)
        full = pd.DataFrame(0.0, index=pd.Index(genes), columns=table.columns)
        full.loc[np.asarray(genes)[expressed], :] = table.to_numpy()
        per_batch.append(full)
    stacked = pd.concat(per_batch)
    table = stacked.groupby(level=0).agg(
        {"means": "mean", "dispersions": "mean", "dispersions_norm": "mean", "highly_variable": "sum"}
    )  # sorted by gene name, as scanpy's groupby: its tie order
    table["highly_variable_nbatches"] = table["highly_variable"].astype(int)
    table["highly_variable_intersection"] = table["highly_variable_nbatches"] == len(batches)
    if n_top_genes is not None:
        order = table.sort_values(
            ["highly_variable_nbatches", "dispersions_norm"], ascending=False, na_position="last"
        ).index
        table["highly_variable"] = table.index.isin(order[:n_top_genes])
    else:
        table["dispersions_norm"] = table["dispersions_norm"].fillna(0)
        min_disp, max_disp, min_mean, max_mean = cutoffs
        mean, norm = table["means"], table["dispersions_norm"]
        table["highly_variable"] = (
            (mean > min_mean) & (mean < max_mean) & (norm > min_disp) & (norm < max_disp)
        )
    return table.loc[list(genes)]


def _loess(mean: np.ndarray, var: np.ndarray, span: float) -> np.ndarray:
    try:
        from skmisc.loess import loess
    except ImportError as error:
        raise ImportError(
            "flavor='seurat_v3' fits a loess curve with scikit-misc: pip install scikit-misc"
        ) from error
    fitted = np.zeros(len(mean), dtype=np.float64)
    varying = var > 0
    model = loess(np.log10(mean[varying]), np.log10(var[varying]), span=span, degree=2)
    model.fit()
    fitted[varying] = model.outputs.fitted_values
    return fitted


def _seurat_v3_hvg(exchange, genes, options, *, n_top_genes, span) -> pd.DataFrame:
    """scanpy's ``_highly_variable_genes_seurat_v3`` from two statistics rounds: moments of the counts,
    then sums of the counts clipped at each gene's regularised maximum (per batch)."""
    batches = exchange.batches
    request = StatisticRequest(
        "moments",
        tuple(genes),
        layer=options.layer,
        batch_key=exchange.spec.batch_key,
        batches=tuple(batches),
        counts=True,
    )
    moments = exchange.sum(request)
    n_total = moments["n"].sum()
    means, variances = _mean_var(n_total, moments["sum"].sum(axis=0), moments["sum_squares"].sum(axis=0))
    groups = len(moments["n"])
    regularised = np.zeros((groups, len(genes)))
    clip = np.zeros((groups, len(genes)))
    group_means = []
    for index in range(groups):
        n = moments["n"][index]
        mean, var = _mean_var(n, moments["sum"][index], moments["sum_squares"][index])
        regularised[index] = np.sqrt(10 ** _loess(mean, var, span))
        clip[index] = regularised[index] * np.sqrt(n) + mean
        group_means.append(mean)
    clipped = exchange.sum(
        StatisticRequest(
            "clipped",
            tuple(genes),
            layer=options.layer,
            batch_key=exchange.spec.batch_key,
            batches=tuple(batches),
            arrays={"clip": clip},
        )
    )
    norm_gene_vars = np.empty((groups, len(genes)))
    for index in range(groups):
        n, mean, reg_std = moments["n"][index], group_means[index], regularised[index]
        norm_gene_vars[index] = (1 / ((n - 1) * np.square(reg_std))) * (
            n * np.square(mean) + clipped["sum_squares"][index] - 2 * clipped["sum"][index] * mean
        )
    ranked = np.argsort(np.argsort(-norm_gene_vars, axis=1), axis=1).astype(np.float32)
    nbatches = np.sum(ranked < n_top_genes, axis=0)
    ranked[ranked >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    table = pd.DataFrame(
        {
            "means": means,
            "variances": variances,
            "variances_norm": norm_gene_vars.mean(axis=0),
            "highly_variable_rank": median_rank,
            "highly_variable_nbatches": nbatches,
        },
        index=pd.Index(genes),
    )
    order = (
        table[["highly_variable_rank", "highly_variable_nbatches"]]
        .sort_values(
            ["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False], na_position="last"
        )
        .index
    )
    table["highly_variable"] = table.index.isin(order[: int(n_top_genes)])
    if not batches:
        table = table.drop(columns="highly_variable_nbatches")
    return table


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
    secure_aggregation: bool = True,
    min_cohort: int = 3,
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
    secure_aggregation, min_cohort
        Sum the statistics under pairwise masks (:mod:`scinfl.federation.secure`) over at least
        ``min_cohort`` sites; ``secure_aggregation=False`` sends each site's sums in the clear.
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
    if flavor not in ("seurat", "cell_ranger", "seurat_v3"):
        raise ValueError(f"flavor must be 'seurat', 'cell_ranger' or 'seurat_v3', got {flavor!r}.")
    if flavor == "seurat_v3" and n_top_genes is None:
        n_top_genes = 2000
    options = _Options(layer, join, secure_aggregation, min_cohort, min_cells, engine)
    site_data, opened = as_site_dict(sites, "highly_variable_genes")
    targets = _sites_for_writing(site_data, opened, copy)
    log_base = _log1p_base(site_data, flavor)
    cutoffs = (min_disp, max_disp, min_mean, max_mean)

    def recipe(exchange: StatisticsExchange) -> pd.DataFrame:
        genes = _agreed_genes(exchange, join)
        if flavor == "seurat_v3":
            return _seurat_v3_hvg(exchange, genes, options, n_top_genes=n_top_genes, span=span)
        return _dispersion_hvg(
            exchange,
            genes,
            flavor,
            options,
            n_top_genes=n_top_genes,
            n_bins=n_bins,
            cutoffs=cutoffs,
            log_base=log_base,
        )

    table = _run(site_data, options, recipe, batch_key=batch_key)
    for data in targets.values():
        _write_var(data, table)
        data.uns["hvg"] = {"flavor": flavor}
    return targets if copy else None


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


# ---- scale -------------------------------------------------------------------------------------------------


def scale(
    sites: Mapping[str, AnnData] | list,
    *,
    zero_center: bool = True,
    max_value: float | None = None,
    layer: str | None = None,
    join: Join = "inner",
    secure_aggregation: bool = True,
    min_cohort: int = 3,
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
    join, secure_aggregation, min_cohort, min_cells, engine, copy
        As in :func:`highly_variable_genes`. Genes outside the pooled set (``join="inner"``: one some
        site lacks) are left as they are, with NaN ``mean`` and ``std``.

    Returns
    -------
    None, or with ``copy=True`` the scaled sites. Sets ``.X`` (or the layer), ``.var['mean']`` and
    ``.var['std']`` (the pooled values before scaling) in every site.
    """
    options = _Options(layer, join, secure_aggregation, min_cohort, min_cells, engine)
    site_data, opened = as_site_dict(sites, "scale")
    for name, data in site_data.items():
        if getattr(data, "isbacked", False) and not copy:
            raise ValueError(f"Site {name!r} is backed: scaling rewrites its values; pass copy=True.")
    targets = _sites_for_writing(site_data, opened, copy)

    def recipe(exchange: StatisticsExchange) -> pd.DataFrame:
        genes = _agreed_genes(exchange, join)
        moments = exchange.sum(StatisticRequest("moments", tuple(genes), layer=layer))
        mean, var = _mean_var(moments["n"][0], moments["sum"][0], moments["sum_squares"][0])
        return pd.DataFrame({"mean": mean, "std": np.sqrt(var)}, index=pd.Index(genes))

    table = _run(site_data, options, recipe)
    for name, data in targets.items():
        _scale_site(data, name, table, zero_center=zero_center, max_value=max_value, layer=layer)
    return targets if copy else None


def _scale_site(data: AnnData, site: str, table: pd.DataFrame, *, zero_center, max_value, layer) -> None:
    matrix, var_names = matrix_of(data, layer, site)
    aligned = table.reindex(var_names)
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


# ---- PCA ---------------------------------------------------------------------------------------------------

_DEFAULT = object()


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """Each axis signed so that its largest loading (in absolute value) is positive (scikit-learn's
    ``svd_flip(u_based_decision=False)``, which scanpy's PCA gives)."""
    largest = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(len(components)), largest])
    signs[signs == 0] = 1
    return components * signs[:, None]


def _mask_genes(sites: Mapping[str, AnnData], mask_var, genes: list[str]) -> tuple[list[str], str | None]:
    """The genes the PCA uses and the mask's name for ``.uns['pca']['params']``."""
    if mask_var is _DEFAULT:
        mask_var = "highly_variable" if all("highly_variable" in d.var for d in sites.values()) else None
    if mask_var is None:
        return genes, None
    if not isinstance(mask_var, str):
        raise TypeError("mask_var must be the name of a boolean .var column of every site, or None.")
    chosen: set[str] = set()
    for name, data in sites.items():
        if mask_var not in data.var:
            raise ValueError(f"Site {name!r}: .var has no column {mask_var!r} to select the PCA's genes.")
        flags = data.var[mask_var].to_numpy()
        if flags.dtype != bool:
            raise TypeError(f"Site {name!r}: .var[{mask_var!r}] is {flags.dtype}, not boolean.")
        chosen.update(pd.Index(data.var_names).astype(str)[flags])
    agreed = set(genes)
    for name, data in sites.items():
        names = pd.Index(data.var_names).astype(str)
        flagged = set(names[data.var[mask_var].to_numpy()]) & agreed
        disagree = (chosen & agreed & set(names)) - flagged
        if disagree:
            raise ValueError(
                f"Site {name!r}: .var[{mask_var!r}] leaves out {len(disagree)} gene(s) other sites select "
                f"(e.g. {sorted(disagree)[:3]}); select the genes together (scinfl.pp.highly_variable_genes)."
            )
    selected = [g for g in genes if g in chosen]
    if not selected:
        raise ValueError(f"No gene of the pooled set is selected by .var[{mask_var!r}].")
    return selected, mask_var


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
    secure_aggregation: bool = True,
    min_cohort: int = 3,
    min_cells: int = MIN_STATISTIC_CELLS,
    engine: Engine = "local",
    copy: bool = False,
) -> dict[str, AnnData] | None:
    """Principal components of the pooled cells, and every site's cells in that one space.

    What :func:`scanpy.pp.pca` computes (zero-centred) on the concatenated sites, from the pooled mean and
    covariance: ``method="covariance"`` sums each site's ``X^T X`` (genes x genes) once;
    ``"randomized"`` builds a block Krylov space from ``n_iter`` sums of ``X^T (X Q)`` (genes x
    ``2 * n_comps``) and one more over its span, for many genes (on scaled Datlinger data, where the 30th
    and 31st eigenvalues differ by 0.4%, 12 iterations reach 5e-6 rad of the exact top 30; 8 reach 1e-2). ``"auto"``: covariance up to 4,000 genes. Each site projects its
    own cells.

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
    join, secure_aggregation, min_cohort, min_cells, engine, copy
        As in :func:`highly_variable_genes`.

    Returns
    -------
    None, or with ``copy=True`` the sites with the results. Sets in every site ``.obsm['X_pca']``,
    ``.varm['PCs']`` (zero for genes outside the PCA) and ``.uns['pca']`` (``variance``,
    ``variance_ratio``, ``params``), under ``key_added`` if given. Axes are signed so that each one's
    largest loading is positive, as scanpy's.
    """
    options = _Options(layer, join, secure_aggregation, min_cohort, min_cells, engine)
    site_data, opened = as_site_dict(sites, "pca")
    targets = _sites_for_writing(site_data, opened, copy)
    if method not in ("auto", "covariance", "randomized"):
        raise ValueError(f"method must be 'auto', 'covariance' or 'randomized', got {method!r}.")

    def recipe(exchange: StatisticsExchange) -> dict[str, Any]:
        genes, mask_name = _mask_genes(site_data, mask_var, _agreed_genes(exchange, join))
        n_obs = sum(int(p.description["n_obs"]) for p in exchange.profiles.values())
        n_components = n_comps
        if n_components is None:
            smallest = min(len(genes), n_obs)
            n_components = smallest - 1 if smallest <= 50 else 50
        if not 0 < n_components < min(len(genes), n_obs):
            raise ValueError(
                f"n_comps={n_components} must be between 1 and {min(len(genes), n_obs) - 1} "
                f"({len(genes)} genes, {n_obs} cells)."
            )
        use = method if method != "auto" else ("covariance" if len(genes) <= 4000 else "randomized")
        if use == "covariance":
            gram = exchange.sum(StatisticRequest("gram", tuple(genes), layer=layer))
            n, mean = gram["n"][0], gram["sum"] / gram["n"][0]
            covariance = (gram["gram"] - n * np.outer(mean, mean)) / (n - 1)
            values, vectors = np.linalg.eigh(covariance)
            order = np.argsort(values)[::-1][:n_components]
            variance, components = values[order], vectors[:, order].T
            total = float(np.trace(covariance))
        else:
            variance, components, mean, total = _randomized(
                exchange, genes, layer, n_components, n_iter, random_state
            )
        return {
            "genes": genes,
            "mask_var": mask_name,
            "mean": mean,
            "components": _flip_signs(components),
            "variance": variance,
            "variance_ratio": variance / total,
        }

    result = _run(site_data, options, recipe)
    key_obsm, key_varm, key_uns = ("X_pca", "PCs", "pca") if key_added is None else (key_added,) * 3
    for name, data in targets.items():
        _project_site(data, name, result, layer=layer, keys=(key_obsm, key_varm, key_uns))
    return targets if copy else None


def _randomized(exchange, genes, layer, n_components, n_iter, random_state):
    """Block Krylov (Musco & Musco, NeurIPS 2015) on the pooled covariance: ``n_iter`` sums of
    ``X^T (X Q)`` for blocks ``Q`` of ``2 * n_comps`` columns, then Rayleigh-Ritz on the span of every block,
    one more sum. Converges where plain subspace iteration stalls on a flat spectrum."""
    rng = np.random.default_rng(random_state)
    p = len(genes)
    width = min(p, max(2 * n_components, n_components + 10))

    def covariance_times(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = exchange.sum(StatisticRequest("products", tuple(genes), layer=layer, arrays={"basis": q}))
        n = parts["n"][0]
        mean = parts["sum"] / n
        return (parts["products"] - n * np.outer(mean, mean @ q)) / (n - 1), mean

    block = np.linalg.qr(rng.standard_normal((p, width)))[0]
    blocks = [block]
    for _ in range(n_iter):
        if sum(b.shape[1] for b in blocks) >= p:
            break
        block = np.linalg.qr(covariance_times(block)[0])[0]
        blocks.append(block)
    span = np.linalg.qr(np.hstack(blocks)[:, :p])[0]
    product, mean = covariance_times(span)
    small = span.T @ product
    values, vectors = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(values)[::-1][:n_components]
    moments = exchange.sum(StatisticRequest("moments", tuple(genes), layer=layer))
    _, var = _mean_var(moments["n"][0], moments["sum"][0], moments["sum_squares"][0])
    return values[order], (span @ vectors[:, order]).T, mean, float(var.sum())


def _project_site(data: AnnData, site: str, result: Mapping[str, Any], *, layer, keys) -> None:
    key_obsm, key_varm, key_uns = keys
    matrix, var_names = matrix_of(data, layer, site)
    genes = pd.Index(result["genes"])
    position = genes.get_indexer(var_names)
    source, target = np.flatnonzero(position >= 0), position[position >= 0]
    components = result["components"]  # n_comps x genes
    dtype = matrix.dtype if np.issubdtype(matrix.dtype, np.floating) else np.float64
    coordinates = np.zeros((matrix.shape[0], len(components)), dtype=np.float64)
    # X_c @ V^T, with the genes a site lacks (outer join) zero before centring, as pooling has them
    offset = -(result["mean"] @ components.T)
    for start, block in chunks(matrix):
        block = block[:, source].astype(np.float64)
        coordinates[start : start + block.shape[0]] = np.asarray(block @ components[:, target].T) + offset
    loadings = np.zeros((data.n_vars, len(components)))
    loadings[source] = components[:, target].T
    data.obsm[key_obsm] = coordinates.astype(dtype)
    data.varm[key_varm] = loadings
    params = {"zero_center": True, "use_highly_variable": result["mask_var"] == "highly_variable"}
    if result["mask_var"] is not None:
        params["mask_var"] = result["mask_var"]
    if layer is not None:
        params["layer"] = layer
    data.uns[key_uns] = {
        "params": params,
        "variance": np.asarray(result["variance"]),
        "variance_ratio": np.asarray(result["variance_ratio"]),
    }
