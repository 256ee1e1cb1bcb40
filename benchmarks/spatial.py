"""Spatial domains: the keyed autoencoder with and without ``spatial_key`` (light graph convolution).

Each section is split into two sites, its left and right halves (each site builds its own spot graph).
Leiden runs on the pooled embedding at the first resolution that gives as many clusters as the labels
have; scores: neighbourhood coherence (mean fraction of a spot's 6 nearest spots in its cluster) and ARI
against the labels. Needs ``../shared/data``. Run::

    python benchmarks/spatial.py            # 3 seeds, sepal_mob_st and stlearn_hbc_annotated
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import scinfl as si
from scinfl.data import neighbourhood_coherence, spatial_graph

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"sepal_mob_st": "leiden_derived", "stlearn_hbc_annotated": "annot_type"}


def scores(embedding: np.ndarray, adata: ad.AnnData, label: str) -> tuple[float, float]:
    cells = ad.AnnData(obs=adata.obs[[label]].copy(), obsm={"rep": embedding})
    sc.pp.neighbors(cells, use_rep="rep", random_state=0)
    n_clusters = adata.obs[label].nunique()
    for resolution in np.linspace(0.1, 2.0, 40):
        sc.tl.leiden(
            cells, resolution=resolution, random_state=0, flavor="igraph", n_iterations=2, directed=False
        )
        if cells.obs["leiden"].nunique() >= n_clusters:
            break
    clusters = cells.obs["leiden"].to_numpy()
    labelled = adata.obs[label].notna().to_numpy()
    coherence = neighbourhood_coherence(clusters, spatial_graph(adata))
    return coherence, adjusted_rand_score(adata.obs[label][labelled].astype(str), clusters[labelled])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    si.settings.progress = False
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    task = si.tasks.Embedding(hidden=128, n_latent=16)
    print(f"{'data':24s} {'labels':16s} {'spatial_key':12s} {'coherence':>16s} {'ARI':>16s}")
    for name, label in SETS.items():
        adata = ad.read_h5ad(DATA / f"{name}.h5ad")
        if name == "sepal_mob_st":  # raw counts
            sc.pp.normalize_total(adata, target_sum=1e4)
            sc.pp.log1p(adata)
            sc.pp.highly_variable_genes(adata, n_top_genes=2000, subset=True)
        x = adata.obsm["spatial"][:, 0]
        sites = {"left": adata[x <= np.median(x)].copy(), "right": adata[x > np.median(x)].copy()}
        for spatial_key in (None, "spatial"):
            results = []
            for seed in range(args.seeds):
                key = si.FederationKey.generate()
                model = si.tl.train_federated(
                    sites,
                    key=key,
                    task=task.replace(spatial_key=spatial_key),
                    rounds=args.rounds,
                    seed=seed,
                    copy=True,
                    secure_aggregation={"min_cohort": 2},  # two halves of a section
                )
                results.append(scores(model.predict(adata, key=key).embedding, adata, label))
            values = np.asarray(results)
            print(
                f"{name:24s} {label:16s} {spatial_key!s:12s} "
                f"{values[:, 0].mean():8.3f} ± {values[:, 0].std():.3f} {values[:, 1].mean():8.3f} ± {values[:, 1].std():.3f}"
            )
        labelled = adata.obs[label].notna().to_numpy()
        coherence = neighbourhood_coherence(
            adata.obs[label].astype(str).to_numpy()[labelled],
            spatial_graph(adata[labelled]),
        )
        print(f"{name:24s} {label:16s} {'(the labels)':12s} {coherence:8.3f}")
        # A control with no expression at all: k-means on the coordinates, as many clusters as labels.
        # Coherence rewards any smoothing; this is how far position alone gets.
        n_clusters = adata.obs[label].nunique()
        by_position = (
            KMeans(n_clusters, n_init=10, random_state=0).fit_predict(adata.obsm["spatial"]).astype(str)
        )
        coherence = neighbourhood_coherence(by_position, spatial_graph(adata))
        ari = adjusted_rand_score(adata.obs[label][labelled].astype(str), by_position[labelled])
        print(f"{name:24s} {label:16s} {'(position)':12s} {coherence:8.3f}         {ari:8.3f}")


if __name__ == "__main__":
    main()
