"""Federated keyed perturbation model vs the same network trained centrally vs two baselines.

Datlinger et al. 2021 (CRISPR knockouts of TCR-pathway genes in Jurkat cells, scifi-RNA-seq), the subset
in ``../shared/data``: 7,500 cells, 40 guides + control, stimulated or not, a median of 59 UMIs per cell.
Counts are normalised to 10^4 per cell and log1p-transformed, and the 500 most expressed genes are kept:
at this depth the rest is mostly zeros. Per seed, 30% of each perturbed group (guide x condition) is held
out; every control cell stays in training (the controls are the model's input, not its target). The
training cells are split into 2 sites (Dirichlet over perturbations, ``--alpha``), and the model is
scored on the held-out cells by :func:`scinfl.tl.score_perturbation`, from the control profile of all
training cells, against the baselines "no change" and "mean change of the other perturbations".
Reported per condition, since the knockouts act through TCR signalling, which only stimulation engages.
Run::

    python benchmarks/perturbation.py                          # 3 seeds, guides, 80 rounds
    python benchmarks/perturbation.py --perturbation-key target_gene
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch

import scinfl as si

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "datlinger2021_scperturb_subset.h5ad"
METRICS = ["mse", "mse_top_de", "pearson_delta", "pearson_delta_top_de"]


def load(n_genes: int) -> ad.AnnData:
    adata = ad.read_h5ad(DATA)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    mean = np.asarray(adata.X.mean(axis=0)).ravel()
    return adata[:, np.sort(np.argsort(-mean, kind="stable")[:n_genes])].copy()


def held_out(adata: ad.AnnData, key: str, fraction: float, seed: int) -> np.ndarray:
    """30% of every perturbed (perturbation, condition) group; no control cell."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(adata.n_obs, dtype=bool)
    groups = adata.obs.groupby([key, "condition"], observed=True).indices
    for (perturbation, _), cells in groups.items():
        if perturbation != "control":
            mask[rng.permutation(cells)[: int(fraction * len(cells))]] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=100.0, help="site skew; 1.0: strong")
    parser.add_argument("--perturbation-key", default="perturbation")
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA} is missing (it lives in ../shared/data).")
    torch.set_num_threads(1)
    si.settings.progress = False
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    pkey = args.perturbation_key
    adata = load(args.genes)
    options = {
        "task": si.tasks.Perturbation(perturbation_key=pkey, covariate_keys=("condition",), hidden=128),
        "rounds": args.rounds,
        "secure_aggregation": {
            "min_cohort": 2
        },  # two sites: secure aggregation hides each from the server, not from each other
    }
    tables = []
    for seed in range(args.seeds):
        test = held_out(adata, pkey, 0.3, seed)
        train, held = adata[~test].copy(), adata[test].copy()
        sites = si.pp.split_sites(train, n_sites=2, label_key=pkey, alpha=args.alpha, seed=seed)
        key, wrong = si.FederationKey.generate(), si.FederationKey.generate()
        runs = {}
        start = time.perf_counter()
        runs["federated, hardened"] = si.tl.train_federated(sites, key=key, seed=seed, copy=True, **options)
        runs["centralised, hardened"] = si.tl.train_federated(
            {"all": train}, key=key, seed=seed, copy=True, **(options | {"secure_aggregation": False})
        )
        infl_key = si.FederationKey.generate(scheme="infl")
        runs["federated, infl"] = si.tl.train_federated(sites, key=infl_key, seed=seed, copy=True, **options)
        elapsed = time.perf_counter() - start
        keys = {"federated, hardened": key, "centralised, hardened": key, "federated, infl": infl_key}
        for name, model in runs.items():
            pseudobulk = si.tl.predict_perturbation(train, model, key=keys[name], observed=held)
            scores = si.tl.score_perturbation(pseudobulk)
            scores["run"] = np.where(scores["predictor"] == "model", name, scores["predictor"].astype(str))
            tables.append(scores.assign(seed=seed))
        pseudobulk = si.tl.predict_perturbation(
            train, runs["federated, hardened"], key=wrong, observed=held, check_key=False
        )
        scores = si.tl.score_perturbation(pseudobulk)
        tables.append(
            scores[scores["predictor"] == "model"].assign(run="federated, hardened, wrong key", seed=seed)
        )
        print(f"seed {seed}: 3 trainings in {elapsed:.0f} s", flush=True)
    table = pd.concat(tables, ignore_index=True)
    table = table.drop_duplicates(subset=["run", "perturbation", "condition", "seed"])  # baselines: once
    per_seed = table.groupby(["condition", "run", "seed"], observed=True)[METRICS].mean()
    summary = per_seed.groupby(["condition", "run"], observed=True).agg(["mean", "std"])
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    print(f"\n{pkey}, {args.genes} genes, {args.seeds} seeds, {args.rounds} rounds, alpha {args.alpha}")
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
