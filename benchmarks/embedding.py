"""Federated keyed autoencoder vs the same autoencoder trained centrally vs PCA, by Leiden ARI and NMI.

pbmc68k_reduced (700 real PBMCs, log-normalised ``.raw``), 3 label-skewed sites (Dirichlet 0.5). Every
embedding goes through the same ``sc.pp.neighbors`` + ``sc.tl.leiden`` (resolution 1), and the clusters
are scored against ``bulk_labels``. Per seed: a new split and a new hardened key; the hardened model is
also scored under 3 wrong keys and without a key, and the paper's scheme (``"infl"``) under
its right key and 3 wrong keys. Run::

    python benchmarks/embedding.py                 # 3 seeds, 60 rounds
"""

from __future__ import annotations

import argparse
import logging

import anndata as ad
import numpy as np
import scanpy as sc
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import scinfl as si


def leiden_scores(embedding: np.ndarray, labels) -> tuple[float, float]:
    cells = ad.AnnData(obs={"label": np.asarray(labels)}, obsm={"rep": embedding})
    sc.pp.neighbors(cells, use_rep="rep", random_state=0)
    sc.tl.leiden(cells, random_state=0, flavor="igraph", n_iterations=2, directed=False)
    truth, found = cells.obs["label"], cells.obs["leiden"]
    return adjusted_rand_score(truth, found), normalized_mutual_info_score(truth, found)


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
    pbmc = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(pbmc, use_raw=True)  # its log-normalised values; the sites split from it inherit it
    labels = pbmc.obs["bulk_labels"]
    options = {"task": si.tasks.Embedding(hidden=128, n_latent=16), "rounds": args.rounds}
    rows: dict[str, list[tuple[float, float]]] = {}
    for seed in range(args.seeds):
        key = si.FederationKey.generate()
        sites = si.pp.split_sites(pbmc, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=seed)
        federated = si.tl.train_federated(sites, key=key, seed=seed, **options)
        central = si.tl.train_federated(
            {"all": pbmc.copy()}, key=key, seed=seed, secure_aggregation=False, **options
        )
        plain = si.tl.train_federated(sites, key=None, seed=seed, copy=True, **options)
        infl_key = si.FederationKey.generate(scheme="infl")
        infl = si.tl.train_federated(sites, key=infl_key, seed=seed, copy=True, **options)
        scores = {
            "PCA (scanpy, pooled data)": leiden_scores(pbmc.obsm["X_pca"], labels),
            "autoencoder, centralised": leiden_scores(central.predict(pbmc, key=key).embedding, labels),
            "autoencoder, plain FedAvg": leiden_scores(plain.predict(pbmc, key=None).embedding, labels),
            "hardened federated, right key": leiden_scores(
                federated.predict(pbmc, key=key).embedding, labels
            ),
            "hardened federated, wrong keys (3)": tuple(
                np.mean(
                    [
                        leiden_scores(
                            federated.predict(
                                pbmc, key=si.FederationKey.generate(), check_key=False
                            ).embedding,
                            labels,
                        )
                        for _ in range(3)
                    ],
                    axis=0,
                )
            ),
            "hardened federated, no key": leiden_scores(
                federated.predict(pbmc, key=None, check_key=False).embedding, labels
            ),
            "INFL federated, right key": leiden_scores(infl.predict(pbmc, key=infl_key).embedding, labels),
            "INFL federated, wrong keys (3)": tuple(
                np.mean(
                    [
                        leiden_scores(
                            infl.predict(
                                pbmc, key=si.FederationKey.generate(scheme="infl"), check_key=False
                            ).embedding,
                            labels,
                        )
                        for _ in range(3)
                    ],
                    axis=0,
                )
            ),
        }
        for name, value in scores.items():
            rows.setdefault(name, []).append(value)
        print(
            f"seed {seed}: " + ", ".join(f"{n.split(',')[-1].strip()} {v[0]:.3f}" for n, v in scores.items())
        )
    print(f"\nLeiden vs bulk_labels, {args.seeds} seeds (mean ± sd), {args.rounds} rounds")
    print(f"{'embedding':38s} {'ARI':>14s} {'NMI':>14s}")
    for name, values in rows.items():
        values = np.asarray(values)
        ari, nmi = values[:, 0], values[:, 1]
        print(f"{name:38s} {ari.mean():7.3f} ± {ari.std():.3f} {nmi.mean():7.3f} ± {nmi.std():.3f}")
    right = np.asarray(rows["hardened federated, right key"])[:, 0]
    gap = np.mean(right - np.asarray(rows["autoencoder, centralised"])[:, 0])
    over_pca = np.mean(right - np.asarray(rows["PCA (scanpy, pooled data)"])[:, 0])
    print(
        f"\nfederated - centralised ARI: {gap:+.3f} (target >= -0.05); federated - PCA: {over_pca:+.3f} (>= -0.05)"
    )


if __name__ == "__main__":
    main()
