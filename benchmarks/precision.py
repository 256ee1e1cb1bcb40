"""Accuracy of bf16 mixed precision against float32 (issue 16): ``scinfl.settings.precision``.

The quick start's federation on real PBMCs (scanpy's ``pbmc68k_reduced``: a stratified 20% held out, three
label-skewed sites, Dirichlet 0.5), trained once per precision and seed with a hardened key:

``classifier``
    held-out accuracy and balanced accuracy of ``scinfl.tl.predict``'s labels;
``embedding``
    the embedding autoencoder's label transfer: each held-out cell takes the majority label of its 15
    nearest training cells in the embedding (accuracy and balanced accuracy).

Prints each seed's figures for ``"32"`` and ``"bf16-mixed"`` side by side, their mean difference, and wall
time per run. Throughput at each precision: ``benchmarks/gpu.py --precision``.

Run::

    python benchmarks/precision.py                      # seeds 0-2, 20 rounds
    python benchmarks/precision.py --seeds 0 --rounds 5  # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time

import numpy as np
import scanpy as sc
import torch

import scinfl as si
from scinfl.privacy.utility import balanced_accuracy, knn_labels

PRECISIONS = ("32", "bf16-mixed")
LABEL = "bulk_labels"


def _data():
    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)  # log-normalised values in .raw
    train, held_out = si.pp.split_holdout(adata, label_key=LABEL, fraction=0.2, seed=0)
    sites = si.pp.split_sites(train, n_sites=3, label_key=LABEL, alpha=0.5, seed=0)
    return sites, held_out


def _classifier(sites, held_out, key, rounds: int, seed: int) -> dict[str, float]:
    model = si.tl.train_federated(sites, key=key, label_key=LABEL, rounds=rounds, seed=seed, copy=True)
    query = held_out.copy()
    si.tl.predict(query, model, key=key)
    truth = query.obs[LABEL].astype(str).to_numpy()
    guess = query.obs["scinfl_prediction"].astype(str).to_numpy()
    return {"accuracy": float((truth == guess).mean()), "balanced accuracy": balanced_accuracy(truth, guess)}


def _embedding(sites, held_out, key, rounds: int, seed: int) -> dict[str, float]:
    task = si.tasks.Embedding()
    model = si.tl.train_federated(sites, key=key, task=task, rounds=rounds, seed=seed, copy=True)
    reference, labels = [], []
    for adata in model.sites.values():  # every site's cells, embedded, are the labelled reference
        reference.append(adata.obsm["X_scinfl"])
        labels.append(adata.obs[LABEL].astype(str).to_numpy())
    query = held_out.copy()
    si.tl.predict(query, model, key=key)
    truth = query.obs[LABEL].astype(str).to_numpy()
    guess = knn_labels(np.concatenate(reference), np.concatenate(labels), query.obsm["X_scinfl"])
    return {"accuracy": float((truth == guess).mean()), "balanced accuracy": balanced_accuracy(truth, guess)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tasks", nargs="+", default=["classifier", "embedding"])
    args = parser.parse_args()
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    si.settings.progress = False
    torch.set_num_threads(1)
    sites, held_out = _data()
    device = si.train.resolve_device()
    print(f"device: {device}; torch {torch.__version__}; {args.rounds} rounds, seeds {args.seeds}")
    runs = {"classifier": _classifier, "embedding": _embedding}
    for task in args.tasks:  # warm-up (imports, first optimiser) outside the timings
        runs[task](sites, held_out, None, 1, 0)
    for task in args.tasks:
        print(f"\n{task}: {'seed':>4} {'metric':<18} {'32':>7} {'bf16-mixed':>10} {'diff':>7}")
        results: dict[str, list[dict[str, float]]] = {p: [] for p in PRECISIONS}
        seconds: dict[str, float] = dict.fromkeys(PRECISIONS, 0.0)
        for seed in args.seeds:
            key = si.FederationKey(hashlib.sha256(f"precision {seed}".encode()).digest())
            for precision in PRECISIONS:
                si.settings.precision = precision
                started = time.perf_counter()
                results[precision].append(runs[task](sites, held_out, key, args.rounds, seed))
                seconds[precision] += time.perf_counter() - started
            si.settings.precision = "32"
            for metric in results["32"][-1]:
                full, half = results["32"][-1][metric], results["bf16-mixed"][-1][metric]
                print(f"{'':<11} {seed:>4} {metric:<18} {full:>7.3f} {half:>10.3f} {half - full:>+7.3f}")
        for metric in results["32"][0]:
            full = np.mean([r[metric] for r in results["32"]])
            half = np.mean([r[metric] for r in results["bf16-mixed"]])
            print(f"{'':<11} {'mean':>4} {metric:<18} {full:>7.3f} {half:>10.3f} {half - full:>+7.3f}")
        per_run = {p: seconds[p] / len(args.seeds) for p in PRECISIONS}
        print(
            f"{'':<11} wall time per run: 32 {per_run['32']:.1f} s, bf16-mixed {per_run['bf16-mixed']:.1f} s"
        )


if __name__ == "__main__":
    main()
