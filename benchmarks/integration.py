"""Integration across sites: scinfl's site-aware embedding against SCVI and PCA, scored with scib-metrics.

Data sets (raw counts; cells are never moved between sites, a site is a batch):

- ``citeseq``: the RNA of ``../shared/data/pbmc_citeseq_10k5k_subset.h5mu``, two donors of 200 PBMCs
  (the sites), 2,000 HVGs (scanpy's seurat_v3 on the pooled counts), ADT-gated cell types.
- ``pbmc-sim``: scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs x 765 genes), raw counts recovered from
  ``.raw`` and ``n_counts``, split at random into 3 sites of about 233 cells, each given a simulated site
  effect on its real cells: every gene's counts multiplied by ``exp(N(0, 0.5^2))`` drawn per site and
  gene, and the site's library sizes by ``exp(N(0, 0.3^2))`` drawn per site, then rounded. Labels:
  ``bulk_labels``.
- ``datlinger``: ``../shared/data/datlinger2021_scperturb_subset.h5ad`` (7,500 Jurkat cells x 2,000
  genes, a CRISPR screen) in two sites, the plate's rows A-H (3,305 cells) and I-P (4,195); labels: the
  condition (stimulated or not).

Methods (3 seeds each; every scinfl model 1 local epoch per round, so rounds are epochs):

- ``scinfl fed, hardened``: ``si.tasks.Embedding(likelihood=..., site_effects=True)``, federated, the
  default hardened key;
- ``scinfl fed, plain``: the same without a key (plain FedAvg);
- ``scinfl fed, no site effects``: the same model without ``site_effects`` (hardened): what integration adds;
- ``scinfl central``: the pooled cells at one site, the decoder conditioned on ``batch_key="site"``;
- ``SCVI central``: scvi-tools' SCVI on the pooled cells with ``batch_key="site"`` (skipped when
  scvi-tools is not installed), the same epochs;
- ``PCA``: 16 components of the pooled log-normalised counts.

Scores, for each method's latent of all cells:

- ``mixing``: per cell, the share of its 15 nearest neighbours from another site over that share's
  expectation under random neighbours (1: sites fully mixed);
- ``kNN``: label transfer from each site's cells to every other site's (15 neighbours), averaged;
- ``ARI``: Leiden (resolution 1) of all cells against the labels;
- scib-metrics' ``Benchmarker`` (when installed): its bio conservation and batch correction aggregates
  (isolated labels, KMeans NMI/ARI, silhouette, cLISI; BRAS (batch removal adapted silhouette),
  iLISI, kBET, graph connectivity, PCR comparison) and their total;
- ``CPU s``: the training's CPU time (process time of this process and its children).

Run::

    python benchmarks/integration.py                       # citeseq and pbmc-sim, 400 epochs, 3 seeds
    python benchmarks/integration.py --early-stopping      # scinfl stops on its validation loss
    python benchmarks/integration.py --datasets citeseq --epochs 200 --scvi-epochs 400
    python benchmarks/integration.py --datasets datlinger --epochs 100 --seeds 1
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import resource
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch
from scipy import sparse
from sklearn.metrics import adjusted_rand_score

import scinfl as si
from scinfl.privacy.utility import knn_labels

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CITESEQ = SHARED / "pbmc_citeseq_10k5k_subset.h5mu"
DATLINGER = SHARED / "datlinger2021_scperturb_subset.h5ad"


# ---- data ----------------------------------------------------------------------------------------
def citeseq() -> tuple[dict[str, ad.AnnData], str]:
    import mudata as md

    rna = md.read_h5mu(CITESEQ)["rna"].copy()
    sc.pp.highly_variable_genes(rna, flavor="seurat_v3", n_top_genes=2000)
    rna = rna[:, rna.var["highly_variable"]].copy()
    return {
        batch: rna[rna.obs["batch"] == batch].copy() for batch in ("pbmc10k", "pbmc5k")
    }, "celltype_adt_gate"


def pbmc_simulated(seed: int = 0) -> tuple[dict[str, ad.AnnData], str]:
    pbmc = sc.datasets.pbmc68k_reduced()
    raw = pbmc.raw.to_adata()
    counts = np.rint(np.expm1(raw.X.toarray()) * pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4)
    rng = np.random.default_rng(seed)
    site_of = rng.permutation(np.arange(pbmc.n_obs) % 3)
    sites = {}
    for s in range(3):
        gene_effect = np.exp(rng.normal(0.0, 0.5, size=counts.shape[1]))
        library_effect = np.exp(rng.normal(0.0, 0.3))
        cells = site_of == s
        values = np.rint(counts[cells] * gene_effect * library_effect).astype(np.float32)
        site = ad.AnnData(sparse.csr_matrix(values), obs=pbmc.obs.loc[cells, ["bulk_labels"]].copy())
        site.var_names = raw.var_names
        sites[f"site_{s}"] = site
    return sites, "bulk_labels"


def datlinger() -> tuple[dict[str, ad.AnnData], str]:
    data = ad.read_h5ad(DATLINGER)
    top = data.obs["plate_row"].astype(str).isin(list("ABCDEFGH")).to_numpy()
    return {"rows A-H": data[top].copy(), "rows I-P": data[~top].copy()}, "condition"


DATASETS = {"citeseq": citeseq, "pbmc-sim": pbmc_simulated, "datlinger": datlinger}


# ---- scores --------------------------------------------------------------------------------------
def mixing(latent: np.ndarray, batch: np.ndarray) -> float:
    cells = ad.AnnData(np.zeros((len(batch), 1), np.float32), obsm={"latent": latent})
    cells.obs["site"] = batch
    return si.tl.site_mixing(cells, batch_key="site", use_rep="latent")


def transfer(latent: np.ndarray, batch: np.ndarray, labels: np.ndarray) -> float:
    scores = []
    for a in np.unique(batch):
        for b in np.unique(batch):
            if a != b:
                predicted = knn_labels(latent[batch == a], labels[batch == a], latent[batch == b])
                scores.append(np.mean(predicted == labels[batch == b]))
    return float(np.mean(scores))


def leiden_ari(latent: np.ndarray, labels: np.ndarray) -> float:
    joint = ad.AnnData(np.zeros((len(latent), 1), np.float32), obsm={"latent": latent})
    sc.pp.neighbors(joint, use_rep="latent", random_state=0)
    sc.tl.leiden(joint, flavor="igraph", n_iterations=2, random_state=0)
    return float(adjusted_rand_score(labels, joint.obs["leiden"]))


def scib_scores(latents: dict[str, np.ndarray], batch: np.ndarray, labels: np.ndarray) -> pd.DataFrame | None:
    try:
        from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation
    except ImportError:
        return None
    pooled = ad.AnnData(np.zeros((len(batch), 1), np.float32))
    pooled.obs["site"] = pd.Categorical(batch)
    pooled.obs["label"] = pd.Categorical(labels)
    for name, latent in latents.items():
        pooled.obsm[name] = latent
    # PCR comparison needs the pre-integration PCA, which the benchmarker computes from .X: give it one.
    pooled.obsm["X_pca"] = latents["PCA"]
    bench = Benchmarker(
        pooled,
        batch_key="site",
        label_key="label",
        embedding_obsm_keys=list(latents),
        pre_integrated_embedding_obsm_key="X_pca",
        bio_conservation_metrics=BioConservation(),
        batch_correction_metrics=BatchCorrection(),
        n_jobs=1,
    )
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    return table.drop(index="Metric Type", errors="ignore").astype(float)


# ---- methods -------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


ROUNDS: list[tuple[int, int]] = []  # each scinfl run's selected and last round


def scinfl_latent(sites, *, task, key, rounds, seed, central: bool, early_stopping: bool) -> np.ndarray:
    if central:
        pooled = ad.concat(sites, label="site", index_unique="-")
        sites = {"pooled": pooled}
    # Two donors: a secure cohort of both; one pooled site: no secure sum to make.
    cohort = (
        {"secure_aggregation": {"min_cohort": 2}}
        if len(sites) == 2
        else {"secure_aggregation": False}
        if central
        else {}
    )
    model = si.tl.train_federated(
        sites,
        key=key,
        task=task,
        rounds=rounds,
        seed=seed,
        copy=True,
        early_stopping=early_stopping,
        **cohort,
    )
    ROUNDS.append((model.params["best_round"], model.params.get("stopped_round", rounds)))
    return np.concatenate([s.obsm["X_scinfl"] for s in model.sites.values()])


def scvi_latent(sites, *, epochs: int, seed: int) -> np.ndarray | None:
    """SCVI's latent after ``epochs`` epochs (its default for fewer than 20,000 cells: 400)."""
    try:
        import scvi
    except ImportError:
        return None
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    pooled = ad.concat(sites, label="site", index_unique="-")
    scvi.model.SCVI.setup_anndata(pooled, batch_key="site")
    model = scvi.model.SCVI(pooled)
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    return model.get_latent_representation()


def pca_latent(sites) -> np.ndarray:
    pooled = ad.concat(sites, label="site", index_unique="-")
    sc.pp.normalize_total(pooled, target_sum=1e4)
    sc.pp.log1p(pooled)
    sc.pp.pca(pooled, n_comps=16, random_state=0)
    return pooled.obsm["X_pca"]


def run(
    dataset: str, *, epochs: int, scvi_epochs: int, seeds: int, likelihood: str, early_stopping: bool
) -> None:
    sites, label_key = DATASETS[dataset]()
    batch = np.concatenate([[name] * s.n_obs for name, s in sites.items()])
    labels = np.concatenate([s.obs[label_key].astype(str).to_numpy() for s in sites.values()])
    integrated = si.tasks.Embedding(likelihood=likelihood, site_effects=True)
    # name: (task, keyed, central)
    scinfl_runs = {
        "scinfl fed, hardened": (integrated, True, False),
        "scinfl fed, plain": (integrated, False, False),
        "scinfl fed, no site effects": (si.tasks.Embedding(likelihood=likelihood), True, False),
        "scinfl central": (si.tasks.Embedding(likelihood=likelihood, batch_key="site"), True, True),
    }

    def scinfl_method(task, keyed: bool, central: bool):
        return lambda seed, key: scinfl_latent(
            sites,
            task=task,
            key=key if keyed else None,
            rounds=epochs,
            seed=seed,
            central=central,
            early_stopping=early_stopping,
        )

    methods = {name: scinfl_method(*options) for name, options in scinfl_runs.items()}
    methods["SCVI central"] = lambda seed, key: scvi_latent(sites, epochs=scvi_epochs, seed=seed)
    rows = []
    for seed in range(seeds):
        key = si.FederationKey(hashlib.sha256(f"integration {seed}".encode()).digest())
        latents = {}
        for name, method in methods.items():
            started, wall = cpu_seconds(), time.perf_counter()
            ROUNDS.clear()
            latent = method(seed, key)
            if latent is None:
                continue
            latents[name] = latent
            selected, last = ROUNDS[0] if ROUNDS else (scvi_epochs, scvi_epochs)
            rows.append(
                {
                    "method": name,
                    "seed": seed,
                    "mixing": mixing(latent, batch),
                    "kNN": transfer(latent, batch, labels),
                    "ARI": leiden_ari(latent, labels),
                    "selected round": selected,
                    "last round": last,
                    "CPU s": cpu_seconds() - started,
                    "wall s": time.perf_counter() - wall,
                }
            )
            print(dataset, rows[-1], flush=True)
        latents["PCA"] = pca_latent(sites)
        rows.append(
            {
                "method": "PCA",
                "seed": seed,
                "mixing": mixing(latents["PCA"], batch),
                "kNN": transfer(latents["PCA"], batch, labels),
                "ARI": leiden_ari(latents["PCA"], labels),
            }
        )
        table = scib_scores(latents, batch, labels)
        if table is not None:
            for name in latents:
                row = next(r for r in rows if r["method"] == name and r["seed"] == seed)
                row |= {
                    "scib bio": table.loc[name, "Bio conservation"],
                    "scib batch": table.loc[name, "Batch correction"],
                    "scib total": table.loc[name, "Total"],
                    "iLISI": table.loc[name, "iLISI"],
                    "kBET": table.loc[name, "KBET"],
                    "BRAS": table.loc[name, "BRAS"],
                    "graph conn.": table.loc[name, "Graph connectivity"],
                    "PCR comparison": table.loc[name, "PCR comparison"],
                }
    frame = pd.DataFrame(rows)
    summary = frame.drop(columns="seed").groupby("method", sort=False).agg(["mean", "min", "max"])
    print(
        f"\n{dataset}: {sum(s.n_obs for s in sites.values())} cells in {len(sites)} sites, {epochs} epochs, "
        f"{seeds} seeds, likelihood={likelihood!r}, early stopping {early_stopping}, SCVI {scvi_epochs} epochs"
    )
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.precision", 3):
        print(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["citeseq", "pbmc-sim"], choices=list(DATASETS))
    parser.add_argument("--epochs", type=int, default=400, help="scinfl's rounds (1 local epoch each)")
    parser.add_argument("--scvi-epochs", type=int, default=None, help="SCVI's epochs (default: --epochs)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--likelihood", default="nb", choices=["poisson", "nb"])
    parser.add_argument(
        "--early-stopping",
        action="store_true",
        help="scinfl's runs stop on the validation loss (patience 5) instead of running every epoch",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    si.settings.progress = False
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    for dataset in args.datasets:
        run(
            dataset,
            epochs=args.epochs,
            scvi_epochs=args.scvi_epochs or args.epochs,
            seeds=args.seeds,
            likelihood=args.likelihood,
            early_stopping=args.early_stopping,
        )


if __name__ == "__main__":
    main()
