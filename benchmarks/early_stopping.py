"""Early stopping's defaults: when does the validation loss say a federation has converged?

Every data set here is trained for a long fixed run (``--rounds``, hardened key, secure aggregation,
3 seeds), and the per-round validation loss that selects the round (each site's, weighted by its
validation cells) is recorded. Stopping is a deterministic rule on that curve (the rounds before a stop
are those of the long run), so every ``(patience, min_delta)`` is scored on the same curves:

- ``stop``: the last round trained; ``stop / best``: against the best round of the long run, in
  hindsight (target <= 1.5);
- ``loss vs 20``: the selected round's validation loss minus that of the fixed 20-round default
  (target <= 0: never worse);
- ``loss vs best``: minus that of the best round in hindsight.

Data sets:

- ``pbmc classification``: pbmc68k_reduced (log-normalised ``.raw``), 3 label-skewed sites;
- ``pbmc embedding``: the same cells and sites, the autoencoder (Gaussian);
- ``CITE-seq embedding``: the RNA of ``../shared/data/pbmc_citeseq_10k5k_subset.h5mu``, its two donors as
  sites, 2,000 HVGs (seurat_v3), the autoencoder with a Poisson likelihood on counts;
- ``Datlinger perturbation``: ``../shared/data/datlinger2021_scperturb_subset.h5ad`` as
  benchmarks/perturbation.py prepares it (500 genes), 2 sites.

The last two are skipped when ``../shared/data`` lacks them. Run::

    python benchmarks/early_stopping.py              # 60 rounds x 3 seeds per data set, ~10 minutes
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PATIENCES = (2, 3, 5, 8, 10)
MIN_DELTAS = (0.0, 0.001, 0.01)
DEFAULT_ROUNDS = 20


def _sites(name: str, seed: int):
    import anndata as ad
    import mudata as md
    import scanpy as sc

    import scinfl as si

    if name.startswith("pbmc"):
        adata = sc.datasets.pbmc68k_reduced()
        si.pp.register_site(adata, use_raw=True)
        sites = si.pp.split_sites(adata, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=seed)
        task = (
            si.tasks.Classification(label_key="bulk_labels")
            if name == "pbmc classification"
            else si.tasks.Embedding()
        )
        return sites, {"task": task}
    if name == "CITE-seq embedding":
        rna = md.read_h5mu(DATA / "pbmc_citeseq_10k5k_subset.h5mu")["rna"].copy()
        sc.pp.highly_variable_genes(rna, flavor="seurat_v3", n_top_genes=2000)
        rna = rna[:, rna.var["highly_variable"]].copy()
        sites = {batch: rna[rna.obs["batch"] == batch].copy() for batch in ("pbmc10k", "pbmc5k")}
        return sites, {
            "task": si.tasks.Embedding(likelihood="poisson"),
            "secure_aggregation": {"min_cohort": 2},
        }
    adata = ad.read_h5ad(DATA / "datlinger2021_scperturb_subset.h5ad")
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    mean = np.asarray(adata.X.mean(axis=0)).ravel()
    adata = adata[:, np.sort(np.argsort(-mean, kind="stable")[:500])].copy()
    sites = si.pp.split_sites(adata, n_sites=2, label_key="perturbation", alpha=100.0, seed=seed)
    task = si.tasks.Perturbation(perturbation_key="perturbation", covariate_keys=("condition",), hidden=128)
    return sites, {"task": task, "secure_aggregation": {"min_cohort": 2}}


def curve(job: tuple[str, int, int]) -> tuple[str, int, list[float], float]:
    """The selection loss of every round of one long run, and its wall time."""
    name, seed, rounds = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    import scinfl as si

    torch.set_num_threads(1)
    si.settings.progress = False
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    sites, options = _sites(name, seed)
    key = si.FederationKey(
        hashlib.sha256(f"early stopping {name} {seed}".encode()).digest(), scheme="hardened"
    )
    started = time.perf_counter()
    model = si.tl.train_federated(sites, key=key, rounds=rounds, seed=seed, copy=True, **options)
    elapsed = time.perf_counter() - started
    history = model.history
    losses = [
        float(np.average(rows["val_loss"], weights=rows["n_val"]))
        for _, rows in history.groupby("round", sort=True)
    ]
    return name, seed, losses, elapsed


def stopped_round(losses: list[float], patience: int, min_delta: float) -> int:
    """The last round trained under early stopping (the rule of scinfl.federation.rounds.federate)."""
    improved, reference = 0, np.inf
    for evaluated, loss in enumerate(losses, start=1):
        threshold = reference - min_delta * abs(reference) if np.isfinite(reference) else np.inf
        if loss < threshold:
            improved, reference = evaluated, loss
        # round evaluated + 1 trains while round `evaluated` is evaluated; it is the last one
        if evaluated + 1 <= len(losses) and evaluated - improved >= patience:
            return evaluated + 1
    return len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    names = ["pbmc classification", "pbmc embedding"]
    if (DATA / "pbmc_citeseq_10k5k_subset.h5mu").is_file():
        names.append("CITE-seq embedding")
    if (DATA / "datlinger2021_scperturb_subset.h5ad").is_file():
        names.append("Datlinger perturbation")
    jobs = [(name, seed, args.rounds) for name in names for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        curves = list(pool.map(curve, jobs))
    rows = []
    for name, seed, losses, elapsed in curves:
        best = int(np.argmin(losses)) + 1
        fixed = min(losses[:DEFAULT_ROUNDS])
        print(
            f"{name}, seed {seed}: {args.rounds} rounds in {elapsed:.0f} s; best round {best} "
            f"(loss {losses[best - 1]:.4f}); fixed {DEFAULT_ROUNDS} rounds selects loss {fixed:.4f}"
        )
        for patience in PATIENCES:
            for min_delta in MIN_DELTAS:
                stop = stopped_round(losses, patience, min_delta)
                selected = min(losses[:stop])
                rows.append(
                    {
                        "data": name,
                        "seed": seed,
                        "patience": patience,
                        "min_delta": min_delta,
                        "stop": stop,
                        "stop / best": stop / best,
                        "loss vs 20": (selected - fixed) / abs(fixed),
                        "loss vs best": (selected - losses[best - 1]) / abs(losses[best - 1]),
                    }
                )
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 200)
    pd.set_option("display.max_columns", 20)
    print("\nPer rule: the worst case over data sets and seeds (relative loss differences)")
    worst = table.groupby(["patience", "min_delta"]).agg(
        stop_mean=("stop", "mean"),
        stop_over_best_max=("stop / best", "max"),
        loss_vs_20_max=("loss vs 20", "max"),
        loss_vs_best_max=("loss vs best", "max"),
    )
    print(worst.round(3).to_string())
    print("\nPer data set, patience and min_delta of scinfl's defaults")
    from scinfl.federation.spec import MIN_DELTA, PATIENCE

    chosen = table[(table.patience == PATIENCE) & (table.min_delta == MIN_DELTA)]
    print(
        chosen.groupby("data")[["stop", "stop / best", "loss vs 20", "loss vs best"]]
        .agg(["mean", "max"])
        .round(3)
    )


if __name__ == "__main__":
    main()
