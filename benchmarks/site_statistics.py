"""What a site-aware embedding's per-site statistics tell the server about each site's mean profile.

``si.tasks.Embedding(site_effects=True)`` normalises each site's cells by that site's own statistics of the
first layer's outputs (:class:`scinfl.nn.BatchwiseNorm`), and each site sends its own, which the server
receives as they are, also under secure aggregation. Their running mean is about ``W mean(u) + b``, so a
server holding the first layer's ``W, b`` solves for the site's mean input ``mean(u)``
(:func:`scinfl.privacy.analytic.site_mean_inputs`). Scored against the truth, each site's mean
``log1p`` profile, both as deviations from the mean over the sites (what tells one site from the others;
a guess without information scores 0):

- ``Pearson (row space)``: against the part of the true deviation the first layer can show (its
  projection on ``W``'s row space), the best this attack can do;
- ``Pearson (all genes)``: against the whole true deviation.

Data: scanpy's bundled ``pbmc68k_reduced`` (UMI counts recovered from ``.raw`` and ``n_counts``), split at
random into 3 sites with simulated site effects
(:func:`scinfl.pp.simulate_site_effects`); ``Embedding(likelihood="poisson", site_effects=True)``, 30
rounds, hidden 64 and 256; plain FedAvg (the attacker reads the cells' own basis) and the hardened key (the
server has no key). 3 seeds (split, effects, training). Run::

    python benchmarks/site_statistics.py
"""

from __future__ import annotations

import hashlib
import logging
import warnings

import anndata as ad
import numpy as np
import scanpy as sc
import torch

import scinfl as si
from scinfl.privacy.analytic import site_mean_inputs


def counts() -> ad.AnnData:
    pbmc = sc.datasets.pbmc68k_reduced()
    values = np.rint(np.expm1(pbmc.raw.X.toarray()) * pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4)
    out = ad.AnnData(values.astype(np.float32), obs=pbmc.obs[["bulk_labels"]].copy())
    out.var_names = pbmc.raw.var_names
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def attack(model: si.FederatedModel, sites: dict[str, ad.AnnData]) -> list[tuple[float, float]]:
    """Per site: Pearson of its estimated and true deviations from the sites' mean profile, in the
    first layer's row space and over all genes."""
    state = model.network.state_dict()
    weight = (
        next(tensor for name, tensor in state.items() if name.endswith("encoder.0.weight")).double().numpy()
    )
    row_space = np.linalg.pinv(weight) @ weight
    names = model.task.batches(model.schema)
    estimates = site_mean_inputs(state)
    truths = np.stack([np.log1p(np.asarray(sites[name].X)).mean(0) for name in names])
    estimates -= estimates.mean(0)  # deviations from the sites' mean (no public data needed)
    truths -= truths.mean(0)
    return [
        (pearson(estimate, row_space @ truth), pearson(estimate, truth))
        for estimate, truth in zip(estimates, truths, strict=True)
    ]


def main() -> None:
    torch.set_num_threads(1)
    si.settings.progress = False
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    data = counts()
    print(
        "scheme     hidden   Pearson (row space)        Pearson (all genes)        (mean, min-max over 9 sites)"
    )
    for hidden in (64, 256):
        for scheme in ("plain", "hardened"):
            scores = []
            for seed in range(3):
                even = si.pp.split_sites(data, n_sites=3, label_key="bulk_labels", alpha=100.0, seed=seed)
                sites = si.pp.simulate_site_effects(even, seed=seed)
                key = None if scheme == "plain" else si.FederationKey(hashlib.sha256(bytes([seed])).digest())
                task = si.tasks.Embedding(likelihood="poisson", hidden=hidden, site_effects=True)
                model = si.tl.train_federated(sites, key=key, task=task, rounds=30, seed=seed)
                scores += attack(model, sites)
            s = np.array(scores)
            print(
                f"{scheme:9s}  {hidden:5d}    {s[:, 0].mean():.3f} ({s[:, 0].min():.3f}-{s[:, 0].max():.3f})"
                f"        {s[:, 1].mean():.3f} ({s[:, 1].min():.3f}-{s[:, 1].max():.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
