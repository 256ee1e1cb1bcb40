"""How the hardened scheme's audit figures vary from key to key.

``benchmarks/privacy_audit.py`` audits one key. The hardened key draws its mixing, permutations and signs
at random, so what the analytic attacks recover can differ between keys. This script trains the audit's
hardened configuration (pbmc68k_reduced, 20% held out, 3 label-skewed sites, 20 rounds) under ``--keys``
fresh keys and runs the analytic attack family of ``scinfl.tl.privacy_audit`` on the largest site for each,
then prints the spread over keys. Run::

    python benchmarks/hardened_keys.py                  # 20 keys, 3 seeds x 32 victims each, ~10 min
"""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

ROWS = {
    "first layer (dW / db)": ("pearson_minus_mean", "reidentified"),
    "first layer + gain/offset calibration (32 leaked)": ("pearson_minus_mean", "reidentified"),
    "first layer + principal-axes calibration (32 leaked)": ("pearson_minus_mean", "reidentified"),
    "first layer + 8 known plaintext cells": ("pearson_minus_mean", "reidentified"),
}


def audit_key(index: int, rounds: int, seeds: int, victims: int) -> pd.DataFrame:
    import scanpy as sc
    import torch

    import scinfl as si

    torch.set_num_threads(1)
    si.settings.progress = False
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)  # log-normalised values in .raw; the splits inherit it
    train, public = si.pp.split_holdout(adata, label_key="bulk_labels", fraction=0.2, seed=0)
    sites = si.pp.split_sites(train, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=0)
    key = si.FederationKey.generate(scheme="hardened")
    model = si.tl.train_federated(sites, key=key, label_key="bulk_labels", rounds=rounds, seed=0)
    audited = max(sites, key=lambda s: sites[s].n_obs)
    table = si.tl.privacy_audit(
        model,
        sites[audited],
        key=key,
        public=public,
        attacks=["analytic"],
        settings={"n_victims": victims, "seeds": range(seeds)},
    )
    return table.assign(key=index)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--victims", type=int, default=32, help="victims per seed")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(audit_key, i, args.rounds, args.seeds, args.victims) for i in range(args.keys)]
        tables = pd.concat([future.result() for future in futures])
    print(
        f"{args.keys} hardened keys; per key: {args.seeds} seeds x {args.victims} victims, {args.rounds} rounds"
    )
    print(f"{'attack':54s} {'metric':20s} {'min':>7s} {'median':>7s} {'max':>7s} {'max upper CI':>12s}")
    for attack, metrics in ROWS.items():
        for metric in metrics:
            rows = tables[
                (tables["attack"] == attack) & (tables["view"] == "server") & (tables["metric"] == metric)
            ]
            if rows.empty:
                continue
            means = rows["mean"].to_numpy()
            print(
                f"{attack:54s} {metric:20s} {means.min():7.3f} {np.median(means):7.3f} {means.max():7.3f} "
                f"{rows['ci_high'].max():12.3f}"
            )
            if metric == "reidentified":
                print(f"{'':54s} {'keys with any':20s} {np.count_nonzero(means > 0)} of {len(means)}")


if __name__ == "__main__":
    main()
