"""What a keyless server reads of single cells, with and without secure aggregation: the audit's geometry
family (``scinfl.tl.privacy_audit(attacks=["geometry"])``) over draws, sites and key schemes.

Setup: scanpy's ``pbmc68k_reduced`` (700 PBMCs, 765 log-normalised genes in ``.raw``); per draw, a
stratified 40% held out as public cells (half of them the attacker's cohort, half the stand-in sites of
the secure rounds), the rest split into 3 sites, label-skewed (``split_sites(alpha=0.5)``) or not
(``alpha=100``); a classifier (default network) trained 20 rounds with secure aggregation, under each key
scheme. Every site is audited (seeds 0 and 1 of the audit: 200 victims each).

Two server views of the same victims (see ``scinfl.privacy.audit.gradient_geometry``):

``per-site``  one site's single-cell gradients (``dW / db`` of each victim's first layer), coupled as a
              set with the attacker's cohort: the worst case of ``secure_aggregation=False``, and the
              positive control;
``secure sum``  what the server decodes with secure aggregation: 3 rounds' sums after a real local fit at
              the site and 2 stand-in sites.

Printed per configuration and view: the mean over draws and sites (min-max over them) of cell-type
accuracy (against the majority class of the attacker's cohort), mean-subtracted Pearson (against the
victim's cell-type mean profile), re-identification (against a random reference cell), linkage top-1 and
mean reciprocal rank as multiples of chance, and, for the sum, the oracle best-of-all reconstructions
(against the same oracle over the public cell-type means, and over the reconstructions of sums that
hold none of the site's cells: the stand-ins' rounds alone).

Run::

    python benchmarks/secure_view.py               # 3 draws x 2 splits x 3 schemes, about 8 minutes
    python benchmarks/secure_view.py --draws 1     # about 3 minutes
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor

import pandas as pd

PER_SITE, SECURE = "server, one site's single-cell gradients", "server, secure sum"
SCHEMES = {"hardened": "hardened", "INFL": "infl", "plain FedAvg": None}
SPLITS = {"label-skewed": 0.5, "even": 100.0}
# (label, attack, view, metric): the figures printed, attacks beside their baselines
FIGURES = [
    ("cell type", "cell type", "{view}", "accuracy"),
    ("majority class", "majority class", "free", "accuracy"),
    ("mean-subtracted Pearson", "reconstruction", "{view}", "pearson_minus_mean"),
    ("cell-type mean profile", "cell-type mean profile", "free", "pearson_minus_mean"),
    ("re-identified", "reconstruction", "{view}", "reidentified"),
    ("a random cell", "a random reference cell", "free", "reidentified"),
    ("linkage top-1 / chance", "linkage", "{view}", "top1_x_chance"),
    ("linkage MRR / chance", "linkage", "{view}", "mrr_x_chance"),
    ("oracle best reconstruction", "best of all reconstructions (oracle)", "{view}", "pearson_minus_mean"),
    (
        "oracle best cell-type mean",
        "best of the cell-type mean profiles (oracle)",
        "free",
        "pearson_minus_mean",
    ),
    (
        "oracle, sums without the site",
        "best of all reconstructions (oracle)",
        "server, secure sum without the site (control)",
        "pearson_minus_mean",
    ),
]


def run_draw(job: tuple[str, str, int]) -> list[dict]:
    """Train one configuration on one draw and audit each of its sites; one row per site and figure."""
    scheme_name, split_name, draw = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import scanpy as sc
    import torch

    import scinfl as si

    torch.set_num_threads(1)
    si.settings.progress = False
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)
    train, public = si.pp.split_holdout(adata, label_key="bulk_labels", fraction=0.4, seed=draw)
    sites = si.pp.split_sites(train, n_sites=3, label_key="bulk_labels", alpha=SPLITS[split_name], seed=draw)
    scheme = SCHEMES[scheme_name]
    key = (
        None
        if scheme is None
        else si.FederationKey(hashlib.sha256(f"secure view {draw}".encode()).digest(), scheme=scheme)
    )
    model = si.tl.train_federated(sites, label_key="bulk_labels", key=key, rounds=20, seed=draw, copy=True)
    rows = []
    for site, cells in model.sites.items():
        table = si.tl.privacy_audit(
            model, cells, key=key, public=public, attacks=["geometry"], settings={"seeds": (0, 1)}
        )
        for view in (PER_SITE, SECURE):
            for label, attack, figure_view, metric in FIGURES:
                if (
                    attack.startswith("best of all") and view == PER_SITE
                ):  # no oracle for one cell's leak  # no oracle for one cell's leak
                    continue
                chosen = table[
                    (table.attack == attack)
                    & (table.view == figure_view.format(view=view))
                    & (table.metric == metric)
                ]
                rows.append(
                    {
                        "scheme": scheme_name,
                        "split": split_name,
                        "draw": draw,
                        "site": site,
                        "n_cells": cells.n_obs,
                        "view": "per-site" if view == PER_SITE else "secure sum",
                        "figure": label,
                        "value": float(chosen["mean"].iloc[0]),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    jobs = [(s, p, d) for s in SCHEMES for p in SPLITS for d in range(args.draws)]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = [row for result in pool.map(run_draw, jobs) for row in result]
    results = pd.DataFrame(rows)
    order = [label for label, *_ in FIGURES]
    for (split, scheme), group in results.groupby(["split", "scheme"], sort=False):
        print(f"\n{scheme}, {split} sites ({args.draws} draws x 3 sites; mean, min-max over them)")
        summary = group.groupby(["figure", "view"])["value"].agg(["mean", "min", "max"])
        for figure in order:
            cells = []
            for view in ("per-site", "secure sum"):
                if (figure, view) in summary.index:
                    mean, low, high = summary.loc[(figure, view)]
                    cells.append(f"{view} {mean:7.3f} ({low:.3f}-{high:.3f})")
            print(f"  {figure:28s} " + "   ".join(cells))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
