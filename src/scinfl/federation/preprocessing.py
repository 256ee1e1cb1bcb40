"""Federated preprocessing's recipes: what to ask the sites for, and what scanpy computes from the sums.

Each recipe runs where the aggregator is, over a :class:`~scinfl.federation.statistics.StatisticsExchange`
on any transport (in-process, Flower's simulation, a deployment's ServerApp), and sees only sums over the
sites. It returns a :class:`PreprocessingResult`: the consortium's gene table, pooled mean and standard
deviation, or principal axes, which every site then writes into its own AnnData (:mod:`scinfl.pp`). A
result saves to one ``.npz`` file (no pickles), so a deployment's ServerApp can hand it to the sites.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..data.statistics import StatisticRequest
from .statistics import StatisticsExchange

__all__ = [
    "RECIPES",
    "PreprocessingResult",
    "agreed_genes",
    "gene_selection",
    "principal_axes",
    "run_recipe",
    "scaling",
]

Join = Literal["inner", "outer"]

# The 75th percentile of the standard normal: a median absolute deviation / this estimates a standard
# deviation (statsmodels' ``mad``, which scanpy's cell_ranger flavor uses).
_MAD_SCALE = 0.6744897501960817


@dataclass
class PreprocessingResult:
    """What a recipe computed for the consortium: the step, its options, a per-gene table (index: gene
    names) and arrays (principal axes and variances). Saved and loaded without pickles."""

    step: str
    options: dict[str, Any]
    table: pd.DataFrame
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        columns = {f"table/{c}": self.table[c].to_numpy() for c in self.table.columns}
        meta = {"step": self.step, "options": self.options, "columns": list(self.table.columns)}
        with open(path, "wb") as handle:  # np.savez would append ".npz" to another suffix
            np.savez(
                handle,
                meta=np.array(json.dumps(meta)),
                genes=self.table.index.to_numpy(dtype=str),
                **columns,
                **{f"arrays/{k}": v for k, v in self.arrays.items()},
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> PreprocessingResult:
        with np.load(Path(path), allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            table = pd.DataFrame(
                {c: stored[f"table/{c}"] for c in meta["columns"]},
                index=pd.Index(stored["genes"].astype(str)),
            )
            arrays = {k.split("/", 1)[1]: stored[k] for k in stored.files if k.startswith("arrays/")}
        return cls(meta["step"], meta["options"], table, arrays)


def agreed_genes(exchange: StatisticsExchange, join: Join) -> list[str]:
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


def _mean_var(n: np.ndarray | float, total: np.ndarray, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance from a count, sums and sums of squares, as scanpy's ``_get_mean_var``."""
    mean = total / n
    var = squares / n - mean**2
    if n != 1:
        var = var * (n / (n - 1))
    return mean, var


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
    exchange, genes, flavor, layer, *, n_top_genes, n_bins, cutoffs, log_base
) -> pd.DataFrame:
    batches = exchange.batches
    request = StatisticRequest(
        "moments",
        tuple(genes),
        layer=layer,
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


def _seurat_v3_hvg(exchange, genes, layer, *, n_top_genes, span) -> pd.DataFrame:
    """scanpy's ``_highly_variable_genes_seurat_v3`` from two statistics rounds: moments of the counts,
    then sums of the counts clipped at each gene's regularised maximum (per batch)."""
    batches = exchange.batches
    request = StatisticRequest(
        "moments",
        tuple(genes),
        layer=layer,
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
            layer=layer,
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


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """Each axis signed so that its largest loading (in absolute value) is positive (scikit-learn's
    ``svd_flip(u_based_decision=False)``, which scanpy's PCA gives)."""
    largest = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(len(components)), largest])
    signs[signs == 0] = 1
    return components * signs[:, None]


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


def gene_selection(
    exchange: StatisticsExchange,
    *,
    flavor: Literal["seurat", "cell_ranger", "seurat_v3"] = "seurat",
    n_top_genes: int | None = None,
    min_disp: float = 0.5,
    max_disp: float = np.inf,
    min_mean: float = 0.0125,
    max_mean: float = 3,
    span: float = 0.3,
    n_bins: int = 20,
    join: Join = "inner",
    log_base: float | None = None,
) -> PreprocessingResult:
    """scanpy's ``highly_variable_genes`` on the pooled cells (see :func:`scinfl.pp.highly_variable_genes`)."""
    if flavor not in ("seurat", "cell_ranger", "seurat_v3"):
        raise ValueError(f"flavor must be 'seurat', 'cell_ranger' or 'seurat_v3', got {flavor!r}.")
    if flavor == "seurat_v3" and n_top_genes is None:
        n_top_genes = 2000
    genes = agreed_genes(exchange, join)
    layer = exchange.spec.layer
    if flavor == "seurat_v3":
        table = _seurat_v3_hvg(exchange, genes, layer, n_top_genes=n_top_genes, span=span)
    else:
        table = _dispersion_hvg(
            exchange,
            genes,
            flavor,
            layer,
            n_top_genes=n_top_genes,
            n_bins=n_bins,
            cutoffs=(min_disp, max_disp, min_mean, max_mean),
            log_base=log_base,
        )
    return PreprocessingResult("highly_variable_genes", {"flavor": flavor}, table)


def scaling(
    exchange: StatisticsExchange,
    *,
    join: Join = "inner",
    zero_center: bool = True,
    max_value: float | None = None,
) -> PreprocessingResult:
    """The pooled per-gene mean and standard deviation (see :func:`scinfl.pp.scale`); ``zero_center`` and
    ``max_value`` are recorded for the sites to apply."""
    genes = agreed_genes(exchange, join)
    moments = exchange.sum(StatisticRequest("moments", tuple(genes), layer=exchange.spec.layer))
    mean, var = _mean_var(moments["n"][0], moments["sum"][0], moments["sum_squares"][0])
    table = pd.DataFrame({"mean": mean, "std": np.sqrt(var)}, index=pd.Index(genes))
    return PreprocessingResult("scale", {"zero_center": zero_center, "max_value": max_value}, table)


def principal_axes(
    exchange: StatisticsExchange,
    *,
    n_comps: int | None = None,
    genes: Sequence[str] | None = None,
    mask_var: str | None = None,
    method: Literal["auto", "covariance", "randomized"] = "auto",
    n_iter: int = 12,
    random_state: int = 0,
    join: Join = "inner",
) -> PreprocessingResult:
    """The pooled cells' principal axes over ``genes`` (None: every agreed gene), zero-centred (see
    :func:`scinfl.pp.pca`; ``mask_var`` names the column that chose ``genes``, for the sites' records).
    The table holds each gene's pooled mean and its loadings; the arrays the variances and variance
    ratios."""
    if method not in ("auto", "covariance", "randomized"):
        raise ValueError(f"method must be 'auto', 'covariance' or 'randomized', got {method!r}.")
    agreed = agreed_genes(exchange, join)
    if genes is not None:
        chosen = set(genes)
        agreed = [g for g in agreed if g in chosen]
        if not agreed:
            raise ValueError("No gene of the pooled set is among the genes chosen for the PCA.")
    layer = exchange.spec.layer
    n_obs = sum(int(p.description["n_obs"]) for p in exchange.profiles.values())
    smallest = min(len(agreed), n_obs)
    n_components = n_comps if n_comps is not None else (smallest - 1 if smallest <= 50 else 50)
    if not 0 < n_components < smallest:
        raise ValueError(
            f"n_comps={n_components} must be between 1 and {smallest - 1} ({len(agreed)} genes, {n_obs} cells)."
        )
    use = method if method != "auto" else ("covariance" if len(agreed) <= 4000 else "randomized")
    if use == "covariance":
        gram = exchange.sum(StatisticRequest("gram", tuple(agreed), layer=layer))
        n, mean = gram["n"][0], gram["sum"] / gram["n"][0]
        covariance = (gram["gram"] - n * np.outer(mean, mean)) / (n - 1)
        values, vectors = np.linalg.eigh(covariance)
        order = np.argsort(values)[::-1][:n_components]
        variance, components = values[order], vectors[:, order].T
        total = float(np.trace(covariance))
    else:
        variance, components, mean, total = _randomized(
            exchange, agreed, layer, n_components, n_iter, random_state
        )
    components = _flip_signs(components)
    table = pd.DataFrame({"mean": mean}, index=pd.Index(agreed))
    for index, axis in enumerate(components):
        table[f"PC{index + 1}"] = axis
    return PreprocessingResult(
        "pca",
        {"n_comps": int(n_components), "method": use, "mask_var": mask_var},
        table,
        {"variance": np.asarray(variance), "variance_ratio": np.asarray(variance) / total},
    )


RECIPES: dict[str, Callable[..., PreprocessingResult]] = {
    "highly_variable_genes": gene_selection,
    "scale": scaling,
    "pca": principal_axes,
}


def run_recipe(exchange: StatisticsExchange, step: str, options: Mapping[str, Any]) -> PreprocessingResult:
    """The recipe named ``step`` with JSON ``options`` (a deployment's run config carries both)."""
    if step not in RECIPES:
        raise ValueError(f"Unknown preprocessing step {step!r}; available: {', '.join(RECIPES)}.")
    return RECIPES[step](exchange, **dict(options))
