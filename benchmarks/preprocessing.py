"""What federated preprocessing costs, and how close it is to scanpy on the pooled cells.

Sites: the Datlinger CRISPR screen (7,500 Jurkat cells x 2,000 genes, raw UMI counts; ``../shared/data``) in
three labs by plate row (A-E, F-J, K-P), each depth-normalised and log-transformed on its own; without the
file, scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs x 765 genes, its raw counts recovered from ``.raw`` and
``n_counts``) in three sites by cell type.

``steps``
    Wall time of :func:`scinfl.pp.highly_variable_genes` (seurat_v3 per site, then seurat pooled),
    :func:`scinfl.pp.scale` and :func:`scinfl.pp.pca` (covariance; randomized), in-process, under secure
    aggregation and in the clear, beside scanpy's own function on the pooled cells; with how far the result
    is from scanpy's (Jaccard of the genes, largest relative statistic error, largest principal angle; for
    the PCA also to the exact eigenvectors of the pooled covariance, scanpy's included).
``bytes``
    What one site sends per statistic, masked (two 64-bit words per value) against in the clear (float64).
``memory``
    Peak memory (``tracemalloc``) of one site's moments over a backed h5ad of 10x, 50x and 250x the cells
    (the sites' cells repeated), read chunk by chunk: flat in cells.
``flower`` (``--flower``)
    The first step on Flower's simulation (Ray's start-up included).

Run::

    python benchmarks/preprocessing.py             # about a minute
    python benchmarks/preprocessing.py --flower    # plus one Flower simulation
    python benchmarks/preprocessing.py --n-iter 8  # fewer block Krylov iterations for the randomized PCA
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
from scipy import linalg, sparse

import scinfl as si
from scinfl.data.statistics import StatisticRequest, site_statistic

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "datlinger2021_scperturb_subset.h5ad"


def _sites() -> tuple[str, dict[str, ad.AnnData]]:
    if DATA.is_file():
        adata = ad.read_h5ad(DATA)
        labs = {"AE": "ABCDE", "FJ": "FGHIJ", "KP": "KLMNOP"}
        sites = {n: adata[adata.obs["plate_row"].isin(list(rows))].copy() for n, rows in labs.items()}
        label = "Datlinger screen, 7,500 cells x 2,000 genes, 3 labs"
    else:
        pbmc = sc.datasets.pbmc68k_reduced()
        adata = pbmc.raw.to_adata()
        counts = np.rint(np.expm1(adata.X.toarray()) * pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4)
        adata.X = sparse.csr_matrix(counts.astype(np.float32))
        labels = adata.obs["bulk_labels"].cat.categories
        groups = {"A": labels[:4], "B": labels[4:7], "C": labels[7:]}
        sites = {n: adata[adata.obs["bulk_labels"].isin(g)].copy() for n, g in groups.items()}
        label = "pbmc68k_reduced counts, 700 cells x 765 genes, 3 sites by cell type"
    for site in sites.values():
        site.layers["counts"] = site.X.copy()
        sc.pp.normalize_total(site, target_sum=1e4)
        sc.pp.log1p(site)
    return label, sites


def _timed(function, repeats: int = 3):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def _copy(sites):
    return {name: site.copy() for name, site in sites.items()}


def _hvg_error(sites, reference) -> tuple[float, float]:
    got = next(iter(sites.values())).var.loc[reference.index]
    a, b = set(got.index[got["highly_variable"]]), set(reference.index[reference["highly_variable"]])
    columns = [c for c in ("means", "variances", "variances_norm", "dispersions") if c in reference]
    error = max(
        float(np.nanmax(np.abs(got[c] - reference[c]) / np.maximum(np.abs(reference[c]), 1e-3)))
        for c in columns
    )
    return len(a & b) / len(a | b), error


def steps(sites, n_iter: int = 12) -> None:
    print(f"{'step':<36}{'secure s':>10}{'clear s':>10}{'scanpy s':>10}{'secure/scanpy':>15}  agreement")
    pooled = ad.concat(sites, label="site")
    warnings.simplefilter("ignore")
    rows = []

    for label, options in (
        ("hvg seurat_v3, per site", {"flavor": "seurat_v3", "layer": "counts", "batch_key": "site"}),
        ("hvg seurat, pooled", {"flavor": "seurat"}),  # its reference stays for the steps below
    ):
        options = {**options, "n_top_genes": 1000}
        scanpy_s, reference = _timed(
            lambda o=options: sc.pp.highly_variable_genes(pooled, inplace=False, **o)
        )
        secure_s, secure = _timed(lambda o=options: si.pp.highly_variable_genes(sites, copy=True, **o))
        clear_s, _ = _timed(
            lambda o=options: si.pp.highly_variable_genes(sites, copy=True, secure_aggregation=False, **o)
        )
        jaccard, error = _hvg_error(secure, reference.loc[pooled.var_names])
        rows.append((label, secure_s, clear_s, scanpy_s, f"Jaccard {jaccard:.3f}, stats {error:.1e}"))
    pooled.var["highly_variable"] = reference.loc[pooled.var_names, "highly_variable"].to_numpy()
    for site in sites.values():
        site.var["highly_variable"] = pooled.var["highly_variable"].to_numpy()

    dense = {name: site.copy() for name, site in sites.items()}
    for site in dense.values():
        site.X = site.X.toarray()
    pooled_dense = ad.concat(dense, label="site")
    scanpy_s, scaled_reference = _timed(lambda: sc.pp.scale(pooled_dense, max_value=10, copy=True))
    secure_s, scaled = _timed(lambda: si.pp.scale(_copy(dense), max_value=10, copy=True))
    clear_s, _ = _timed(lambda: si.pp.scale(_copy(dense), max_value=10, copy=True, secure_aggregation=False))
    error = max(
        float(np.abs(s.X - scaled_reference[scaled_reference.obs["site"] == n].X).max())
        for n, s in scaled.items()
    )
    rows.append(("scale", secure_s, clear_s, scanpy_s, f"largest |difference| {error:.1e}"))

    scaled_reference.var["highly_variable"] = pooled.var["highly_variable"].to_numpy()
    # the exact top 30 axes: eigenvectors of the pooled covariance of the chosen genes, in float64
    chosen = np.asarray(
        scaled_reference[:, scaled_reference.var["highly_variable"].to_numpy()].X, dtype=np.float64
    )
    chosen -= chosen.mean(axis=0)
    exact = np.linalg.eigh(chosen.T @ chosen)[1][:, ::-1][:, :30]
    for method in ("covariance", "randomized"):
        scanpy_s, _ = _timed(lambda: sc.pp.pca(scaled_reference, n_comps=30), repeats=1)
        secure_s, result = _timed(
            lambda m=method: si.pp.pca(scaled, n_comps=30, method=m, n_iter=n_iter, copy=True), repeats=1
        )
        clear_s, _ = _timed(
            lambda m=method: si.pp.pca(
                scaled, n_comps=30, method=m, n_iter=n_iter, copy=True, secure_aggregation=False
            ),
            repeats=1,
        )
        site = next(iter(result.values()))
        angle = float(linalg.subspace_angles(site.varm["PCs"], scaled_reference.varm["PCs"]).max())
        mask = scaled_reference.var["highly_variable"].to_numpy()
        to_exact = float(linalg.subspace_angles(site.varm["PCs"][mask], exact).max())
        to_exact_scanpy = float(linalg.subspace_angles(scaled_reference.varm["PCs"][mask], exact).max())
        ratio = float(
            np.abs(site.uns["pca"]["variance_ratio"] - scaled_reference.uns["pca"]["variance_ratio"]).max()
        )
        rows.append(
            (
                f"pca {method}, 30 of 1,000 genes",
                secure_s,
                clear_s,
                scanpy_s,
                f"angle {angle:.1e} rad (to the exact axes: {to_exact:.1e}, scanpy's {to_exact_scanpy:.1e}),"
                f" ratios {ratio:.1e}",
            )
        )
    for name, secure_s, clear_s, scanpy_s, agreement in rows:
        print(
            f"{name:<36}{secure_s:>10.3f}{clear_s:>10.3f}{scanpy_s:>10.3f}{secure_s / scanpy_s:>15.1f}  {agreement}"
        )


def bytes_per_site(sites) -> None:
    site_name, site = next(iter(sites.items()))
    genes = tuple(site.var_names)
    print(f"\n{'statistic (one site)':<36}{'values':>12}{'clear MB':>10}{'masked MB':>11}{'ratio':>7}")
    for label, request in (
        ("moments (n, sum, sum of squares)", StatisticRequest("moments", genes)),
        ("gram (1,000 genes)", StatisticRequest("gram", genes[:1000])),
        (
            "products (2,000 x 60 basis)",
            StatisticRequest("products", genes, arrays={"basis": np.ones((len(genes), 60))}),
        ),
    ):
        values = site_statistic(site, site_name, request)
        clear, masked = values.nbytes, 2 * values.nbytes  # float64 / two uint64 words per value
        print(f"{label:<36}{len(values):>12,}{clear / 1e6:>10.2f}{masked / 1e6:>11.2f}{masked / clear:>7.1f}")


def memory(sites) -> None:
    site = next(iter(sites.values()))
    counts = sparse.csr_matrix(site.layers["counts"])
    request = StatisticRequest("moments", tuple(site.var_names))
    print(f"\n{'backed site':<36}{'cells':>12}{'file MB':>10}{'peak MB':>11}")
    with tempfile.TemporaryDirectory() as directory:
        for repeat in (10, 50, 250):
            path = Path(directory) / f"site{repeat}.h5ad"
            ad.AnnData(X=sparse.vstack([counts] * repeat, format="csr")).write_h5ad(path)
            backed = ad.read_h5ad(path, backed="r")
            tracemalloc.start()
            site_statistic(backed, "site", request)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            backed.file.close()
            print(
                f"{'moments, chunk by chunk':<36}{backed.n_obs:>12,}{os.path.getsize(path) / 1e6:>10.1f}{peak / 1e6:>11.1f}"
            )


def flower(sites) -> None:
    options = {"flavor": "seurat_v3", "layer": "counts", "n_top_genes": 1000, "batch_key": "site"}
    started = time.perf_counter()
    on_flower = si.pp.highly_variable_genes(sites, copy=True, engine="flower", **options)
    seconds = time.perf_counter() - started
    local = si.pp.highly_variable_genes(sites, copy=True, **options)
    same = all(on_flower[n].var["highly_variable"].equals(local[n].var["highly_variable"]) for n in sites)
    print(
        f"\nflower simulation, hvg seurat_v3 per site: {seconds:.1f} s (Ray's start-up included); same genes: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flower", action="store_true", help="also time one step on Flower's simulation")
    parser.add_argument(
        "--n-iter", type=int, default=12, help="block Krylov iterations of the randomized PCA"
    )
    arguments = parser.parse_args()
    label, sites = _sites()
    print(f"sites: {label}\n")
    steps(sites, arguments.n_iter)
    bytes_per_site(sites)
    memory(sites)
    if arguments.flower:
        flower(sites)


if __name__ == "__main__":
    main()
