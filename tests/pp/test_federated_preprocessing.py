"""Federated preprocessing against scanpy on the pooled cells: highly variable genes (every flavor, pooled
and per batch), scaling and PCA, computed from sums of per-site statistics, under secure aggregation.

The sites are pbmc68k_reduced's 700 real PBMCs split by cell type (so per-site statistics differ from the
pooled ones), with its log-normalised values in ``.X`` and its raw UMI counts recovered in
``.layers["counts"]``: ``.raw`` holds ``log1p(counts / n_counts * 1e4)``, so
``rint(expm1(raw) * n_counts / 1e4)`` are the counts (the largest rounding residual is 0.08).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import linalg, sparse

import scinfl as si
from scinfl.data.statistics import StatisticRequest, site_statistic
from scinfl.federation import InProcess
from scinfl.federation.secure import decode_wide, encode_wide
from scinfl.federation.statistics import StatisticsExchange, StatisticsSpec

pytest.importorskip("skmisc")  # seurat_v3's loess (scikit-misc, a test dependency)


@pytest.fixture(scope="module")
def _count_sites() -> dict[str, ad.AnnData]:
    pbmc = sc.datasets.pbmc68k_reduced()
    adata = pbmc.raw.to_adata()
    counts = np.expm1(adata.X.toarray()) * pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4
    assert np.abs(counts - np.rint(counts)).max() < 0.1  # they are counts
    adata.layers["counts"] = sparse.csr_matrix(np.rint(counts).astype(np.float32))
    adata.X = sparse.csr_matrix(adata.X)
    labels = adata.obs["bulk_labels"].cat.categories
    groups = {"A": labels[:4], "B": labels[4:7], "C": labels[7:]}
    return {name: adata[adata.obs["bulk_labels"].isin(g)].copy() for name, g in groups.items()}


@pytest.fixture
def count_sites(_count_sites) -> dict[str, ad.AnnData]:
    """Three sites of real PBMCs split by cell type (149, 267, 284 cells): log-normalised ``.X`` (sparse),
    raw counts in ``.layers['counts']``."""
    return {name: site.copy() for name, site in _count_sites.items()}


def _pooled(sites, join="inner") -> ad.AnnData:
    return ad.concat(sites, join=join, label="site")


def _scanpy_hvg(pooled: ad.AnnData, **options) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = sc.pp.highly_variable_genes(pooled, inplace=False, **options)
    return table.loc[pooled.var_names]  # batched cutoffs come back sorted by gene name


def _assert_same_genes_and_statistics(site: ad.AnnData, expected: pd.DataFrame) -> None:
    got = site.var.loc[expected.index]
    chosen, reference = (
        set(got.index[got["highly_variable"]]),
        set(expected.index[expected["highly_variable"]]),
    )
    assert chosen == reference, f"Jaccard {len(chosen & reference) / len(chosen | reference):.4f}"
    for column in expected.columns:
        if column in ("highly_variable", "highly_variable_intersection", "mean_bin", "gene_name"):
            continue
        # relative 1e-5; dispersions_norm is stored as float32, as scanpy stores it
        np.testing.assert_allclose(
            got[column].to_numpy(float),
            expected[column].to_numpy(float),
            rtol=1e-5,
            atol=1e-6,
            err_msg=column,
        )


@pytest.mark.parametrize(
    ("flavor", "options"),
    [
        ("seurat", {}),
        ("seurat", {"n_top_genes": 150}),
        ("cell_ranger", {"n_top_genes": 150}),
        ("seurat_v3", {"n_top_genes": 150, "layer": "counts"}),
        ("seurat", {"n_top_genes": 150, "batch_key": "site"}),
        ("cell_ranger", {"batch_key": "site"}),
        ("seurat_v3", {"n_top_genes": 150, "layer": "counts", "batch_key": "site"}),
    ],
)
def test_highly_variable_genes_are_scanpys_on_the_pooled_cells(count_sites, flavor, options):
    expected = _scanpy_hvg(_pooled(count_sites), flavor=flavor, **options)
    si.pp.highly_variable_genes(count_sites, flavor=flavor, **options)
    for name, site in count_sites.items():
        _assert_same_genes_and_statistics(site, expected)
        assert site.uns["hvg"] == {"flavor": flavor}, name
    # the sites hold different cell types: choosing at one site alone would choose differently
    alone = _scanpy_hvg(
        count_sites["A"], flavor=flavor, **{k: v for k, v in options.items() if k != "batch_key"}
    )
    assert set(alone.index[alone["highly_variable"]]) != set(expected.index[expected["highly_variable"]])


def test_a_batch_column_within_the_sites_is_pooled_across_them(count_sites):
    """Batches that span sites (the phase of the cell cycle) are summed over the sites holding them. G2M
    holds 17 cells, fewer than the default min_cells (refused in the last test)."""
    expected = _scanpy_hvg(
        _pooled(count_sites), flavor="seurat_v3", layer="counts", n_top_genes=100, batch_key="phase"
    )
    si.pp.highly_variable_genes(
        count_sites, flavor="seurat_v3", layer="counts", n_top_genes=100, batch_key="phase", min_cells=15
    )
    _assert_same_genes_and_statistics(count_sites["B"], expected)
    assert (count_sites["B"].var["highly_variable_nbatches"] == expected["highly_variable_nbatches"]).all()


def test_outer_join_pools_a_missing_gene_as_zeros_and_inner_join_leaves_it_out(count_sites):
    # site B lacks 40 genes and stores the others in its own order: genes are matched by name
    order = np.random.default_rng(0).permutation(np.arange(40, count_sites["B"].n_vars))
    count_sites["B"] = count_sites["B"][:, order].copy()
    missing = count_sites["A"].var_names[:40]
    outer = _scanpy_hvg(_pooled(count_sites, "outer"), flavor="seurat", n_top_genes=150)
    result = si.pp.highly_variable_genes(
        count_sites, flavor="seurat", n_top_genes=150, join="outer", copy=True
    )
    _assert_same_genes_and_statistics(result["A"], outer)
    inner = _scanpy_hvg(_pooled(count_sites, "inner"), flavor="seurat", n_top_genes=150)
    si.pp.highly_variable_genes(count_sites, flavor="seurat", n_top_genes=150)
    _assert_same_genes_and_statistics(count_sites["C"], inner)
    # a gene outside the pooled set is not highly variable, and has no statistics
    assert not count_sites["A"].var.loc[missing, "highly_variable"].any()
    assert count_sites["A"].var.loc[missing, "means"].isna().all()
    assert "means" not in count_sites["B"].var or not count_sites["B"].var["means"].isna().any()


def test_scale_is_scanpys_on_the_pooled_cells(count_sites):
    for site in count_sites.values():
        site.X = site.X.toarray()
    expected = sc.pp.scale(_pooled(count_sites), max_value=10, copy=True)
    scaled = si.pp.scale(count_sites, max_value=10, copy=True)
    for name, site in scaled.items():
        np.testing.assert_allclose(site.X, expected[expected.obs["site"] == name].X, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(site.var["mean"], expected.var["mean"], rtol=1e-5)
        np.testing.assert_allclose(site.var["std"], expected.var["std"], rtol=1e-5)
        assert np.abs(site.X).max() <= 10
    # copy=True left the sites as they were
    assert not np.allclose(count_sites["A"].X.mean(axis=0), 0, atol=1e-3)


def test_scale_densifies_a_sparse_matrix_as_scanpy_and_keeps_it_sparse_without_centring(count_sites):
    with pytest.warns(UserWarning, match="Site 'A': zero-centering a sparse matrix densifies it"):
        scaled = si.pp.scale(count_sites, copy=True)
    assert isinstance(scaled["A"].X, np.ndarray)
    expected = sc.pp.scale(_pooled(count_sites), zero_center=False, copy=True)
    uncentred = si.pp.scale(count_sites, zero_center=False, copy=True)
    assert sparse.issparse(uncentred["B"].X)
    reference = expected[expected.obs["site"] == "B"].X
    np.testing.assert_allclose(uncentred["B"].X.toarray(), reference.toarray(), rtol=1e-5, atol=1e-6)


def _principal_angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(linalg.subspace_angles(a, b).max())


@pytest.mark.parametrize("method", ["covariance", "randomized"])
def test_pca_is_scanpys_on_the_pooled_cells_in_one_shared_space(count_sites, method):
    """The top 30 axes span scanpy's subspace, the variance ratios are scanpy's, and each site's cells
    land where scanpy puts them in the pooled PCA (axes signed as scanpy signs them)."""
    for site in count_sites.values():
        site.X = site.X.toarray()
    pooled = _pooled(count_sites)
    sc.pp.pca(pooled, n_comps=30, mask_var=None)
    result = si.pp.pca(count_sites, n_comps=30, method=method, copy=True)
    for name, site in result.items():
        assert _principal_angle(site.varm["PCs"], pooled.varm["PCs"]) < 1e-3
        np.testing.assert_allclose(
            site.uns["pca"]["variance_ratio"], pooled.uns["pca"]["variance_ratio"], atol=1e-4
        )
        np.testing.assert_allclose(site.uns["pca"]["variance"], pooled.uns["pca"]["variance"], rtol=1e-3)
        reference = pooled[pooled.obs["site"] == name].obsm["X_pca"]
        # the leading axes are well separated: their coordinates agree closely, signs included
        np.testing.assert_allclose(
            site.obsm["X_pca"][:, :10], reference[:, :10], atol=5e-3 * np.abs(reference).max()
        )
        assert site.obsm["X_pca"].dtype == reference.dtype


def test_pca_uses_the_federated_highly_variable_genes_and_writes_under_key_added(count_sites):
    si.pp.highly_variable_genes(count_sites, flavor="seurat", n_top_genes=200)
    pooled = _pooled(count_sites)
    pooled.var["highly_variable"] = count_sites["A"].var["highly_variable"]
    sc.pp.pca(pooled, n_comps=20)
    si.pp.pca(count_sites, n_comps=20, key_added="fed")
    site = count_sites["C"]
    assert site.uns["fed"]["params"]["use_highly_variable"]
    assert (np.abs(site.varm["fed"]).sum(axis=1) > 0).sum() == 200  # loadings only on the chosen genes
    assert _principal_angle(site.varm["fed"], pooled.varm["PCs"]) < 1e-3
    assert np.array_equal(site.obsm["X_pca"], sc.datasets.pbmc68k_reduced()[site.obs_names].obsm["X_pca"])
    # sites that chose their genes apart are refused
    count_sites["B"].var.loc[
        count_sites["B"].var_names[count_sites["B"].var["highly_variable"]][:5], "highly_variable"
    ] = False
    with pytest.raises(ValueError, match="Site 'B': .var\\['highly_variable'\\] leaves out 5 gene"):
        si.pp.pca(count_sites, n_comps=20)


def test_secure_sums_equal_clear_sums_and_no_message_holds_a_sites_statistic(count_sites):
    class Recording(InProcess):
        def statistics(self, spec, request, secure):
            replies = super().statistics(spec, request, secure)
            self.sent.append((request, replies))
            return replies

    request = StatisticRequest("moments", tuple(count_sites["A"].var_names), layer="counts")
    sums = {}
    for secure in (True, False):
        transport = Recording(count_sites, {})
        transport.sent = []
        sums[secure] = StatisticsExchange(
            transport, StatisticsSpec(tuple(count_sites), secure_aggregation=secure)
        ).sum(request)
    for part in ("n", "sum", "sum_squares"):
        np.testing.assert_allclose(sums[True][part], sums[False][part], rtol=1e-12)
    # what the aggregator received under secure aggregation: one uint64 vector per site, none of which
    # holds that site's statistic (encoded or not), and whose sum decodes to the pooled statistic
    transport = Recording(count_sites, {})
    transport.sent = []
    StatisticsExchange(transport, StatisticsSpec(tuple(count_sites))).sum(request)
    ((_, replies),) = transport.sent
    for name, site in count_sites.items():
        true = site_statistic(site, name, request)
        received = replies[name]
        assert received.dtype == np.uint64
        encoded = encode_wide(true)
        assert np.mean(received == encoded) < 0.01
        assert abs(np.corrcoef(received[: len(true)].astype(float), true)[0, 1]) < 0.1
    total = np.zeros(len(replies["A"]), dtype=np.uint64)
    for vector in replies.values():
        total += vector
    np.testing.assert_allclose(
        decode_wide(total), sum(site_statistic(s, n, request) for n, s in count_sites.items()), rtol=1e-12
    )


def test_the_wide_fixed_point_keeps_tiny_and_huge_statistics():
    values = np.array([1e-3, 3.3e-4, 1.0, 123456.789, 2.5e14, -7.25e9, 0.0])
    parts = [values * w for w in (0.2, 0.3, 0.5)]
    total = np.zeros(2 * len(values), dtype=np.uint64)
    for part in parts:
        total += encode_wide(part)
    np.testing.assert_allclose(decode_wide(total), values, rtol=1e-9, atol=3 * 2.0**-40)
    with pytest.raises(OverflowError, match="range"):
        encode_wide(np.array([1e30]))


def test_backed_sites_are_streamed_and_give_the_in_memory_result(count_sites, tmp_path, monkeypatch):
    import scinfl.data.statistics as statistics

    monkeypatch.setattr(statistics, "_CHUNK_ELEMENTS", 765 * 32)  # many chunks of rows
    monkeypatch.setattr(statistics, "_MIN_SPARSE_ROWS", 32)
    paths = {}
    for name, site in count_sites.items():
        paths[name] = tmp_path / f"{name}.h5ad"
        site.write_h5ad(paths[name])
    from_files = si.pp.highly_variable_genes(
        paths, flavor="seurat_v3", layer="counts", n_top_genes=100, copy=True
    )
    si.pp.highly_variable_genes(count_sites, flavor="seurat_v3", layer="counts", n_top_genes=100)
    pd.testing.assert_frame_equal(from_files["B"].var, count_sites["B"].var)
    with pytest.raises(ValueError, match="given as paths: pass copy=True"):
        si.pp.highly_variable_genes(paths)
    backed = {name: ad.read_h5ad(path, backed="r") for name, path in paths.items()}
    with pytest.raises(ValueError, match="Site 'A' is backed: scaling rewrites its values"):
        si.pp.scale(backed)


def _snapshot(sites):
    return {
        name: (site.X.copy(), site.var.copy(), dict(site.uns), dict(site.obsm), dict(site.varm))
        for name, site in sites.items()
    }


def _assert_unchanged(sites, snapshot):
    for name, site in sites.items():
        x, var, uns, obsm, varm = snapshot[name]
        if sparse.issparse(x):
            assert np.array_equal(x.indices, site.X.indices)
            x, now = x.data, site.X.data
        else:
            now = site.X
        assert np.array_equal(x, now, equal_nan=True), name
        pd.testing.assert_frame_equal(site.var, var)
        assert (set(site.uns), set(site.obsm), set(site.varm)) == (set(uns), set(obsm), set(varm))


def test_bad_input_is_refused_naming_the_site_and_nothing_changes(count_sites):
    before = _snapshot(count_sites)
    with pytest.raises(ValueError, match="Site 'A': .X holds values that are not non-negative integers"):
        si.pp.highly_variable_genes(count_sites, flavor="seurat_v3")  # .X is log-normalised
    with pytest.raises(ValueError, match="Site 'A': its statistics reach .* are the values what"):
        si.pp.highly_variable_genes(count_sites, layer="counts")  # counts given to seurat, which un-logs
    with pytest.raises(
        ValueError, match="Batch\\(es\\) 'G2M' \\(17 cells\\) of phase hold fewer than min_cells=20"
    ):
        si.pp.highly_variable_genes(count_sites, batch_key="phase")
    small = dict(count_sites, C=count_sites["C"][:12].copy())
    with pytest.raises(ValueError, match="Site 'C' has 12 cells, fewer than min_cells=20"):
        si.pp.scale(small)
    renamed = dict(count_sites, C=count_sites["C"].copy())
    renamed["C"].var_names = [f"ENSG{i:011d}" for i in range(renamed["C"].n_vars)]
    with pytest.raises(ValueError, match="The sites share no genes"):
        si.pp.pca(renamed)
    with pytest.raises(ValueError, match="min_cohort=3"):
        si.pp.scale({"A": count_sites["A"], "B": count_sites["C"]})
    with pytest.raises(ValueError, match="Site 'A': batch column 'donor' is missing"):
        si.pp.highly_variable_genes(count_sites, batch_key="donor")
    _assert_unchanged(count_sites, before)
    count_sites["B"].X = count_sites["B"].X.copy()
    count_sites["B"].X.data[3] = np.nan
    before = _snapshot(count_sites)
    with pytest.raises(ValueError, match="Site 'B': .X holds NaN"):
        si.pp.scale(count_sites)
    _assert_unchanged(count_sites, before)
    # two sites can agree to a cohort of two (each then learns the other's sums)
    pair = {"A": count_sites["A"], "C": count_sites["C"]}
    si.pp.highly_variable_genes(pair, n_top_genes=50, secure_aggregation={"min_cohort": 2})
    assert count_sites["A"].var["highly_variable"].sum() == 50


def test_a_deployment_step_is_a_run_config_and_a_result_file_that_each_site_applies(count_sites, tmp_path):
    """What a deployment's ServerApp does with its run config (``run_preprocessing``, minus the Grid): the
    recipe from the JSON options, the result saved without pickles; each site applies the file and gets
    what ``si.pp.pca`` writes."""
    import json

    from scinfl.deployment import preprocessing_run_config
    from scinfl.federation.preprocessing import PreprocessingResult, run_recipe

    for site in count_sites.values():
        site.X = site.X.toarray()
    config = preprocessing_run_config("pca", list(count_sites), tmp_path, n_comps=10, method="covariance")
    spec = StatisticsSpec.from_dict(json.loads(config["preprocess-spec"]))
    exchange = StatisticsExchange(InProcess(count_sites, {}), spec)
    result = run_recipe(exchange, config["preprocess"], json.loads(config["preprocess-options"]))
    path = result.save(tmp_path / "pca.npz")
    loaded = PreprocessingResult.load(path)
    pd.testing.assert_frame_equal(loaded.table, result.table)
    np.testing.assert_array_equal(loaded.arrays["variance_ratio"], result.arrays["variance_ratio"])
    expected = si.pp.pca(count_sites, n_comps=10, method="covariance", mask_var=None, copy=True)
    for name, site in count_sites.items():
        si.pp.apply_preprocessing(site, path, site=name)
        np.testing.assert_allclose(site.obsm["X_pca"], expected[name].obsm["X_pca"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(site.uns["pca"]["variance"], expected[name].uns["pca"]["variance"])
    with pytest.raises(ValueError, match="Unknown preprocessing step 'normalize'"):
        run_recipe(exchange, "normalize", {})


@pytest.mark.slow
def test_on_flower_a_deployments_serverapp_runs_the_step_and_equals_the_in_process_engine(count_sites):
    """``engine="flower"`` runs the step as a deployment does: the ServerApp's ``run_preprocessing`` with the
    run config a consortium gives ``flwr run``, ClientApps answering from their sites' files, masked; the
    sites apply the result file it saved. The genes and statistics are the in-process engine's."""
    options = {
        "flavor": "seurat_v3",
        "layer": "counts",
        "n_top_genes": 100,
        "batch_key": "site",
        "copy": True,
    }
    local = si.pp.highly_variable_genes(count_sites, **options)
    flower = si.pp.highly_variable_genes(count_sites, engine="flower", **options)
    for name in count_sites:
        pd.testing.assert_frame_equal(flower[name].var, local[name].var, check_exact=False, rtol=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SCINFL_LONG_TESTS") != "1",
    reason="about 1 minute (a SuperLink and three SuperNodes on 127.0.0.1); SCINFL_LONG_TESTS=1 runs it",
)
def test_a_local_deployment_runs_a_preprocessing_step_that_each_site_applies(count_sites, tmp_path):
    """A SuperLink and three SuperNodes as processes (TLS, SuperNode authentication): ``flwr run`` with a
    preprocessing run config; the deployed ServerApp saves the result, and each site's file applied gives
    the in-process result."""
    from scinfl.deployment import LocalDeployment, preprocessing_run_config, site_nodes

    options = {"flavor": "seurat_v3", "n_top_genes": 100}
    local = si.pp.highly_variable_genes(count_sites, layer="counts", batch_key="site", copy=True, **options)
    output_dir = tmp_path / "out"
    config = preprocessing_run_config(
        "highly_variable_genes", list(count_sites), output_dir, layer="counts", batch_key="site", **options
    )
    deployment = LocalDeployment(tmp_path / "flower", site_nodes(count_sites, tmp_path))
    try:
        deployment.start()
        completed = deployment.run(config, timeout=600)
    finally:
        deployment.close()
    assert completed.returncode == 0, completed.stdout[-3000:]
    for name, site in count_sites.items():
        si.pp.apply_preprocessing(site, output_dir / "highly_variable_genes.npz", site=name)
        pd.testing.assert_frame_equal(site.var, local[name].var, check_exact=False, rtol=1e-12)


DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the checkout


def _shared(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{name} is absent from {DATA}")
    return path


def _normalise_each_site(sites) -> None:
    """What each site does alone, cell by cell: depth-normalise and log-transform."""
    for site in sites.values():
        site.layers["counts"] = site.X.copy()
        sc.pp.normalize_total(site, target_sum=1e4)
        sc.pp.log1p(site)


def test_from_raw_counts_at_three_labs_to_one_pca_on_the_datlinger_screen():
    """7,500 Jurkat cells in three labs (plate rows A-E, F-J, K-P), raw UMI counts: federated seurat_v3
    genes per lab, then scaling and PCA of the log-normalised values, each equal to scanpy on the pooled
    cells."""
    adata = ad.read_h5ad(_shared("datlinger2021_scperturb_subset.h5ad"))
    labs = {"AE": "ABCDE", "FJ": "FGHIJ", "KP": "KLMNOP"}
    sites = {name: adata[adata.obs["plate_row"].isin(list(rows))].copy() for name, rows in labs.items()}
    _normalise_each_site(sites)
    pooled = _pooled(sites)
    options = {"flavor": "seurat_v3", "layer": "counts", "n_top_genes": 500, "batch_key": "site"}
    expected = _scanpy_hvg(pooled, **options)
    si.pp.highly_variable_genes(sites, **options)
    _assert_same_genes_and_statistics(sites["FJ"], expected)
    pooled.var["highly_variable"] = expected["highly_variable"]
    sc.pp.scale(pooled, max_value=10)
    sc.pp.pca(pooled, n_comps=30)
    si.pp.scale(sites, max_value=10)
    si.pp.pca(sites, n_comps=30)
    for name, site in sites.items():
        np.testing.assert_allclose(site.X, pooled[pooled.obs["site"] == name].X, rtol=1e-5, atol=1e-5)
        assert _principal_angle(site.varm["PCs"], pooled.varm["PCs"]) < 1e-3
        np.testing.assert_allclose(
            site.uns["pca"]["variance_ratio"], pooled.uns["pca"]["variance_ratio"], atol=1e-4
        )


def test_citeseq_donors_select_genes_and_run_a_randomized_pca_over_every_gene():
    """Two donors' raw RNA counts over 15,792 genes (a cohort of two: min_cohort=2): seurat_v3 genes equal
    to scanpy's on the pooled cells, and a PCA over every gene by block Krylov (a Gram matrix of 15,792^2
    would be 2 GB per site) in scanpy's subspace."""
    import mudata

    rna = mudata.read_h5mu(_shared("pbmc_citeseq_10k5k_subset.h5mu")).mod["rna"]
    sites = {donor: rna[rna.obs["batch"] == donor].copy() for donor in ("pbmc10k", "pbmc5k")}
    _normalise_each_site(sites)
    pooled = _pooled(sites)
    options = {"flavor": "seurat_v3", "layer": "counts", "n_top_genes": 2000}
    expected = _scanpy_hvg(pooled, **options)
    si.pp.highly_variable_genes(sites, secure_aggregation={"min_cohort": 2}, **options)
    _assert_same_genes_and_statistics(sites["pbmc5k"], expected)
    sc.pp.pca(pooled, n_comps=30, mask_var=None)
    si.pp.pca(
        sites, n_comps=30, mask_var=None, secure_aggregation={"min_cohort": 2}
    )  # 15,792 genes: method="auto" is randomized
    assert _principal_angle(sites["pbmc10k"].varm["PCs"], pooled.varm["PCs"]) < 1e-3


def test_a_clientapp_answers_statistics_masked_and_names_itself_when_it_cannot(
    count_sites, tmp_path, monkeypatch
):
    """Flower's ClientApp, called as a SuperNode calls it (no Ray): each site's profile, then its masked
    statistic; the masked replies sum to the clear sum. A site whose file lacks the layer asked for answers
    with its name and the cause, which the aggregator reports."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from scinfl.federation.flower import protocol
    from scinfl.federation.flower.client import make_client_app
    from scinfl.federation.identity import write_consortium
    from scinfl.federation.secure import MaskingKey, SecureRound

    for name in ("_run_id", "_node_id", "_task_id"):  # what a ClientApp process is given by Flower
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)
    paths = {}
    for name, site in count_sites.items():
        paths[name] = tmp_path / f"{name}.h5ad"
        site.write_h5ad(paths[name])
    spec = StatisticsSpec(tuple(count_sites), layer="counts")
    consortium = write_consortium(tmp_path / "identities", list(paths))  # each site's identity, the roster
    apps = {
        name: make_client_app(
            lambda context, n=name: {"site": n, "data-path": str(paths[n]), **consortium[n]}
        )
        for name in paths
    }
    contexts = {
        name: Context(run_id=1, node_id=i, node_config={}, state=RecordDict(), run_config={})
        for i, name in enumerate(paths)
    }

    def ask(name, request, secure):
        message = Message(
            protocol.encode_statistics_request(spec, request, secure),
            dst_node_id=1,
            message_type=protocol.STATISTICS,
        )
        reply = apps[name](message, contexts[name])
        assert not reply.has_error()
        return reply.content

    profiles = {name: protocol.decode_profile(ask(name, None, None))[1] for name in paths}
    assert profiles["B"].description["n_obs"] == count_sites["B"].n_obs
    request = StatisticRequest("moments", tuple(count_sites["A"].var_names), layer="counts")
    keys = {n: p.masking_key for n, p in profiles.items()}
    signatures = {n: p.masking_signature for n, p in profiles.items()}
    secure = SecureRound(1, 0, tuple(paths), keys, "exchange", signatures)
    # a server that swaps in a masking key of its own, or invents a site, is refused by every site, by name
    forged = SecureRound(
        1, 0, tuple(paths), {**keys, "A": MaskingKey.generate().public}, "exchange", signatures
    )
    refusal = protocol.decode_statistic(ask("B", request, forged))
    assert refusal.startswith(
        "SiteRefusal: Site 'B' refuses to mask: the masking key given for 'A' does not carry"
    )
    invented = SecureRound(
        1, 0, (*paths, "Z"), {**keys, "Z": keys["A"]}, "exchange", {**signatures, "Z": signatures["A"]}
    )
    assert "'Z', not on its roster" in protocol.decode_statistic(ask("C", request, invented))
    masked = [protocol.decode_statistic(ask(name, request, secure)) for name in paths]
    assert all(vector.dtype == np.uint64 for vector in masked)
    total = np.zeros(len(masked[0]), dtype=np.uint64)
    for vector in masked:
        total += vector
    clear = sum(site_statistic(site, name, request) for name, site in count_sites.items())
    np.testing.assert_allclose(decode_wide(total), clear, rtol=1e-12)
    # the round's masks served one request: the SuperNode remembers it across messages, and refuses another
    other = StatisticRequest("moments", request.genes[:5], layer="counts")
    assert "was used for another request" in protocol.decode_statistic(ask("B", other, secure))
    # a site without the layer names itself and the cause
    missing = StatisticRequest("moments", request.genes, layer="spliced")
    failure = protocol.decode_statistic(ask("C", missing, None))
    assert failure == "ValueError: Site 'C': layer 'spliced' not found; its layers are ['counts']."
