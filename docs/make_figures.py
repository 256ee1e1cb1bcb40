"""Draw the overview figure of the README and the docs: ``docs/_static/overview.png``.

Produced with (from the repository root, offline, about 30 s on 2 cores)::

    python docs/make_figures.py

Data: scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs, log-normalised ``.raw``, 10 ``bulk_labels``), split as
``scinfl demo`` splits it: a stratified 20% held-out test set and 3 label-skewed sites (Dirichlet 0.5). Left
panel: UMAP of the hardened model's embedding (``.obsm["X_scinfl"]``) of all 700 cells, coloured by its
predictions under the right key. Right panel: accuracy on the held-out cells (mean ± sd over ``SEEDS``
training seeds; wrong keys: over seeds x ``N_WRONG_KEYS`` keys drawn from the same generator), for plain
FedAvg and for both key schemes with the right key, wrong keys and no key, against chance (majority class).
Keys are drawn afresh on every run, so the keyed bars move by about their spread.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
import torch

import scinfl as si

LABEL_KEY = "bulk_labels"
SEEDS = (0, 1, 2)
N_WRONG_KEYS = 10
OUTPUT = Path(__file__).resolve().parent / "_static" / "overview.png"


def accuracy(model: si.FederatedModel, test: ad.AnnData, key: si.FederationKey | None) -> float:
    """Held-out accuracy of ``model`` run under ``key`` (any key: the version check is off on purpose)."""
    predicted = model.predict(test, key=key, check_key=False, site="test").labels.astype(str)
    return float(np.mean(predicted == test.obs[LABEL_KEY].astype(str).to_numpy()))


def main() -> None:
    torch.set_num_threads(1)
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    si.settings.progress = False
    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)  # log-normalised values in .raw; the splits inherit it
    train, test = si.pp.split_holdout(adata, label_key=LABEL_KEY, fraction=0.2, seed=0)
    sites = si.pp.split_sites(train, n_sites=3, label_key=LABEL_KEY, alpha=0.5, seed=0)
    common = {"label_key": LABEL_KEY, "rounds": 20, "copy": True}

    bars: dict[str, list[float]] = {"plain FedAvg\nno key": []}
    for label in ("hardened", "INFL (paper)"):
        for view in ("right key", "wrong keys", "no key"):
            bars[f"{label}\n{view}"] = []
    shown = None
    for seed in SEEDS:
        plain = si.tl.train_federated(sites, key=None, seed=seed, **common)
        bars["plain FedAvg\nno key"].append(accuracy(plain, test, None))
        for scheme, label in (("hardened", "hardened"), ("infl", "INFL (paper)")):
            key = si.FederationKey.generate(scheme=scheme)
            model = si.tl.train_federated(sites, key=key, seed=seed, **common)
            bars[f"{label}\nright key"].append(accuracy(model, test, key))
            bars[f"{label}\nwrong keys"].extend(
                accuracy(model, test, si.FederationKey.generate(scheme=scheme)) for _ in range(N_WRONG_KEYS)
            )
            bars[f"{label}\nno key"].append(accuracy(model, test, None))
            if shown is None and scheme == "hardened":
                shown = (model, key)

    model, key = shown
    cells = adata  # all 700 cells, trained-on and held-out
    si.tl.predict(cells, model, key=key)
    sc.pp.neighbors(cells, use_rep="X_scinfl", random_state=0)
    sc.tl.umap(cells, random_state=0)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.2, 1]})
    sc.pl.umap(
        cells, color="scinfl_prediction", ax=left, show=False, size=14, legend_fontsize=7, frameon=False
    )
    left.set_title("hardened model, right key: UMAP of X_scinfl,\ncoloured by scinfl_prediction", fontsize=9)

    names = list(bars)
    means = np.array([np.mean(bars[n]) for n in names])
    sds = np.array([np.std(bars[n], ddof=1) for n in names])
    colours = ["0.55", *(["C2", "C3", "C1"] * 2)]  # plain; then right key, wrong keys, no key per scheme
    position = np.arange(len(names))
    right.barh(position, means, xerr=sds, color=colours, capsize=3, height=0.7)
    for y, (mean, sd) in enumerate(zip(means, sds, strict=True)):
        right.text(min(mean + sd, 0.93) + 0.02, y, f"{mean:.2f}", va="center", fontsize=7)
    chance = float(test.obs[LABEL_KEY].value_counts(normalize=True).max())
    right.axvline(chance, color="0.2", linestyle="--", linewidth=1, label="chance (majority class)")
    right.set_yticks(position, [n.replace("\n", ", ") for n in names], fontsize=8)
    right.invert_yaxis()
    right.set_xlabel(f"accuracy on {test.n_obs} held-out cells")
    right.set_xlim(0, 1)
    right.legend(fontsize=7, frameon=False, loc="lower right")
    right.set_title(
        f"held-out accuracy, mean ± sd over {len(SEEDS)} seeds\n(wrong keys: {N_WRONG_KEYS} per seed)",
        fontsize=9,
    )
    right.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUTPUT, dpi=100)
    for name in names:
        print(
            f"{name.replace(chr(10), ' '):<28} {np.mean(bars[name]):.3f} ± {np.std(bars[name], ddof=1):.3f}"
        )
    print(f"chance (majority class)      {chance:.3f}\nWrote {OUTPUT} ({OUTPUT.stat().st_size // 1024} KB).")


if __name__ == "__main__":
    main()
