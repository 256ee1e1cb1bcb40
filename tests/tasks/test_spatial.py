"""spatial_key=: each site's own neighbour graph and a light graph convolution make spatial domains."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

import scinfl as si
from scinfl.data import (
    AlignedMatrix,
    NeighbourhoodMatrix,
    build_schema,
    describe_site,
    neighbourhood_coherence,
    site_fields,
    spatial_graph,
)

pytest.importorskip("igraph")  # scanpy's Leiden

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # /work/shared/data beside the checkout
PLAIN_TASK = si.tasks.Embedding(hidden=128, n_latent=16)
SPATIAL_TASK = PLAIN_TASK.replace(spatial_key="spatial")
SPATIAL = {"task": SPATIAL_TASK, "rounds": 60, "seed": 0, "secure_aggregation": {"min_cohort": 2}}


def test_graph_and_convolution_read_each_spot_with_its_neighbours(pbmc):
    # The UMAP coordinates of real cells stand in for a tissue's spot coordinates.
    graph = spatial_graph(pbmc, "X_umap", 4, "site_0")
    assert graph.shape == (pbmc.n_obs, pbmc.n_obs)
    np.testing.assert_allclose(np.asarray(graph.sum(axis=1)).ravel(), 1.0)
    assert graph.diagonal().sum() == 0  # no self loops
    umap = pbmc.obsm["X_umap"]
    nearest = np.argsort(((umap[:, None] - umap[None]) ** 2).sum(-1), axis=1)[:, 1:5]
    np.testing.assert_array_equal(np.sort(graph[7].indices), np.sort(nearest[7]))
    spots = pbmc.copy()
    spots.obsm["spatial"] = spots.obsm["X_umap"]
    assert (spatial_graph(spots) != spatial_graph(spots, "X_umap", 6, "s")).nnz == 0  # defaults: "spatial", 6
    with pytest.raises(ValueError, match="This AnnData: .obsm has no 'xy'"):
        spatial_graph(spots, "xy")

    schema = build_schema({"s": describe_site(pbmc, "s", site_fields(pbmc, "s", use_raw=True))})
    aligned = AlignedMatrix.from_adata(pbmc, schema)
    convolved = NeighbourhoodMatrix(aligned, graph)
    rows = np.array([3, 7, 100])
    dense = aligned.rows(np.arange(pbmc.n_obs))
    expected = 0.5 * (dense[rows] + graph[rows] @ dense)
    np.testing.assert_allclose(convolved.rows(rows), expected, rtol=1e-5, atol=1e-6)


def test_neighbourhood_coherence_counts_agreeing_neighbours():
    graph = sparse.csr_matrix(np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0]], dtype=np.float32))
    assert neighbourhood_coherence(np.array(["a", "a", "b"]), graph) == pytest.approx((0.5 + 1 + 0) / 3)


def test_missing_or_bad_coordinates_name_the_site(pbmc_sites):
    for name in ("site_0", "site_2"):
        pbmc_sites[name].obsm["spatial"] = pbmc_sites[name].obsm["X_umap"]
    options = {**SPATIAL, "rounds": 1}
    with pytest.raises(ValueError, match=r"Site 'site_1'.*no 'spatial'"):
        si.tl.train_federated(pbmc_sites, key=None, **options)
    pbmc_sites["site_1"].obsm["spatial"] = np.full((pbmc_sites["site_1"].n_obs, 2), np.nan)
    with pytest.raises(ValueError, match=r"Site 'site_1'.*finite coordinates"):
        si.tl.train_federated(pbmc_sites, key=None, **options)
    assert not any("X_scinfl" in adata.obsm for adata in pbmc_sites.values())  # nothing was written


def _two_halves(adata: ad.AnnData) -> dict[str, ad.AnnData]:
    x = adata.obsm["spatial"][:, 0]
    return {"left": adata[x <= np.median(x)].copy(), "right": adata[x > np.median(x)].copy()}


def _coherence_of_leiden(model, adata, key, n_clusters: int) -> float:
    cells = ad.AnnData(obs=adata.obs[[]].copy(), obsm={"rep": model.predict(adata, key=key).embedding})
    sc.pp.neighbors(cells, use_rep="rep", random_state=0)
    for resolution in np.linspace(0.1, 2.0, 40):  # the first resolution giving the labels' cluster count
        sc.tl.leiden(
            cells, resolution=resolution, random_state=0, flavor="igraph", n_iterations=2, directed=False
        )
        if cells.obs["leiden"].nunique() >= n_clusters:
            break
    return neighbourhood_coherence(cells.obs["leiden"].to_numpy(), spatial_graph(adata))


@pytest.mark.parametrize(
    ("name", "label"), [("sepal_mob_st", "leiden_derived"), ("stlearn_hbc_annotated", "annot_type")]
)
def test_spatial_option_gives_more_coherent_domains(name, label):
    path = DATA / f"{name}.h5ad"
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data)")
    adata = ad.read_h5ad(path)
    if name == "sepal_mob_st":  # raw counts: normalise and keep the informative genes
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(adata, n_top_genes=2000, subset=True)
    sites = _two_halves(adata)
    key = si.FederationKey(bytes(range(32)))
    plain = si.tl.train_federated(sites, key=key, copy=True, **{**SPATIAL, "task": PLAIN_TASK})
    spatial = si.tl.train_federated(sites, key=key, copy=True, **SPATIAL)
    written = spatial.sites
    n_clusters = adata.obs[label].nunique()
    assert _coherence_of_leiden(spatial, adata, key, n_clusters) > _coherence_of_leiden(
        plain, adata, key, n_clusters
    )
    # prediction reads each spot with its own site's neighbours, as training did
    left = written["left"]
    np.testing.assert_allclose(
        left.obsm["X_scinfl"], spatial.predict(sites["left"], key=key).embedding, rtol=1e-5, atol=1e-6
    )
    assert spatial.task.spatial_key == "spatial"
    assert plain.task.spatial_key is None
    assert written["left"].uns["scinfl"]["params"]["task"]["spatial_key"] == "spatial"


def test_audit_reads_the_spots_as_the_model_does(pbmc):
    # The privacy audit must attack what the network reads: each spot with its neighbours.
    from scinfl.tl._privacy import _cells, _inputs

    sites = {"left": pbmc[:350].copy(), "right": pbmc[350:].copy()}
    options = {**SPATIAL, "rounds": 1, "task": PLAIN_TASK.replace(spatial_key="X_umap", spatial_neighbors=4)}
    model = si.tl.train_federated(sites, key=si.FederationKey.generate(), **options)
    site = sites["left"]
    aligned = AlignedMatrix.from_adata(site, model.schema)
    inputs = model.inputs(site, site="left")
    assert isinstance(inputs, NeighbourhoodMatrix)
    labels = np.zeros(site.n_obs, dtype=np.int64)
    audited = _inputs(model, site, "trained-on")
    x, _ = _cells(audited, labels, np.arange(site.n_obs), "trained-on", np.random.default_rng(0))
    np.testing.assert_array_equal(x.numpy(), inputs.rows(np.arange(site.n_obs)))
    assert not np.array_equal(x.numpy(), aligned.rows(np.arange(site.n_obs)))
