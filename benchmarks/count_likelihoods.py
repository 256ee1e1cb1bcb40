"""Poisson against negative binomial for the embedding of raw counts, federated with the hardened key.

The RNA of ``../shared/data/pbmc_citeseq_10k5k_subset.h5mu`` (400 PBMCs, two donors of 200: the sites),
2,000 HVGs (scanpy's seurat_v3 on the pooled counts), raw counts; ``si.tasks.Embedding(likelihood=...)``
trained 60 rounds (min_cohort=2), 3 seeds. Scored on the ADT-gated cell types: kNN label transfer from
each donor's embedded cells to the other's (15 neighbours, the mean of both directions), and the ARI of
Leiden (resolution 1) on both donors' embeddings. Also the learned log inverse dispersions' spread.
Run::

    python benchmarks/count_likelihoods.py
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import scanpy as sc
import torch
from sklearn.metrics import adjusted_rand_score

import scinfl as si
from scinfl.nn.networks import DISPERSION_STEP
from scinfl.privacy.utility import knn_labels

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc_citeseq_10k5k_subset.h5mu"
LABEL = "celltype_adt_gate"


def scores(sites: dict[str, ad.AnnData]) -> tuple[float, float]:
    a, b = sites["pbmc10k"], sites["pbmc5k"]
    labels = sorted(set(a.obs[LABEL].astype(str)) | set(b.obs[LABEL].astype(str)))
    codes = {name: np.array([labels.index(v) for v in s.obs[LABEL].astype(str)]) for name, s in sites.items()}
    transfer = np.mean(
        [
            np.mean(knn_labels(a.obsm["X_scinfl"], codes["pbmc10k"], b.obsm["X_scinfl"]) == codes["pbmc5k"]),
            np.mean(knn_labels(b.obsm["X_scinfl"], codes["pbmc5k"], a.obsm["X_scinfl"]) == codes["pbmc10k"]),
        ]
    )
    joint = ad.concat([a, b])
    sc.pp.neighbors(joint, use_rep="X_scinfl", random_state=0)
    sc.tl.leiden(joint, flavor="igraph", n_iterations=2, random_state=0)
    return float(transfer), float(adjusted_rand_score(joint.obs[LABEL].astype(str), joint.obs["leiden"]))


def main() -> None:
    if not DATA.is_file():
        raise SystemExit(f"{DATA} is missing (it lives in ../shared/data).")
    torch.set_num_threads(1)
    si.settings.progress = False
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    rna = md.read_h5mu(DATA)["rna"].copy()
    sc.pp.highly_variable_genes(rna, flavor="seurat_v3", n_top_genes=2000)
    rna = rna[:, rna.var["highly_variable"]].copy()
    sites = {batch: rna[rna.obs["batch"] == batch].copy() for batch in ("pbmc10k", "pbmc5k")}
    print("likelihood   kNN transfer   Leiden ARI   best round   seconds   log(theta) spread")
    for likelihood in ("poisson", "nb"):
        rows = []
        for seed in range(3):
            key = si.FederationKey(hashlib.sha256(f"count likelihoods {seed}".encode()).digest())
            started = time.perf_counter()
            model = si.tl.train_federated(
                sites,
                key=key,
                task=si.tasks.Embedding(likelihood=likelihood),
                rounds=60,
                secure_aggregation={"min_cohort": 2},
                seed=seed,
                copy=True,
            )
            elapsed = time.perf_counter() - started
            dispersion = [v for k, v in model.network.state_dict().items() if k.endswith("dispersion")]
            spread = float(dispersion[0].std() * DISPERSION_STEP) if dispersion else float("nan")
            rows.append((*scores(model.sites), model.params["best_round"], elapsed, spread))
        mean, low, high = np.mean(rows, axis=0), np.min(rows, axis=0), np.max(rows, axis=0)
        print(
            f"{likelihood:10s}   {mean[0]:.3f} ({low[0]:.3f}-{high[0]:.3f})   {mean[1]:.3f} ({low[1]:.3f}-"
            f"{high[1]:.3f})   {mean[2]:.0f}   {mean[3]:.1f}   {mean[4]:.2f}"
        )


if __name__ == "__main__":
    main()
