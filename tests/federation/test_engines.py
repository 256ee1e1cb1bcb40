"""Every task on every engine: Flower's simulation gives the in-process weights, bit for bit.

Both engines run the same round loop (``federate``) over different transports, and every site is built and
answered by the same functions, in-process or in a ClientApp in a Ray worker. With one torch thread per
process (the package default) and float32 weights carried exactly by Flower's ArrayRecords, the weights,
the history and what is written into each site must be identical. Each case is a small real run on
pbmc68k_reduced (2 sites, 2 rounds); Ray's start-up dominates (about 20 s per case). A classifier with
the hardened scheme is compared in ``test_flower.py`` (three sites, one on a stale key), and an embedding
with labels through its label path, which every classification case takes.
"""

from __future__ import annotations

import hashlib

import mudata as md
import numpy as np
import pytest

import scinfl as si
from helpers import assert_same_history, assert_same_weights

pytest.importorskip("flwr")
pytest.importorskip("ray")

pytestmark = pytest.mark.slow

HARDENED = si.FederationKey(hashlib.sha256(b"engine matrix key").digest(), scheme="hardened")
INFL = si.FederationKey(hashlib.sha256(b"engine matrix key").digest(), scheme="infl")
RUN = {
    "rounds": 2,
    "seed": 3,
    "secure_aggregation": {"min_cohort": 2},
}  # masked updates on both engines (secure aggregation)


def _pbmc_sites(pbmc):
    sites = si.pp.split_sites(pbmc, n_sites=2, label_key="bulk_labels", alpha=5.0, seed=0)
    for site in sites.values():
        site.obs["guide"] = site.obs["louvain"].astype(str)  # clusters as pseudo-perturbations, "0" control
    return sites


def _mosaic_sites(pbmc):
    """A MuData site (RNA: the first 600 genes, 'protein': the other 165) and an RNA-only AnnData site."""
    values = pbmc.raw.to_adata()
    values.uns.pop("scinfl")  # pbmc's registration (its values in .raw): these modalities keep them in .X
    rna, prot = values[:, :600], values[:, 600:]
    paired = md.MuData({"rna": rna[:350].copy(), "prot": prot[:350].copy()})
    paired.obs["bulk_labels"] = pbmc.obs["bulk_labels"].iloc[:350].values
    rna_only = rna[350:].copy()
    si.pp.register_site(rna_only, modality="rna", label_key="bulk_labels")
    return {"paired": paired, "rna_only": rna_only}


CASES = {
    "classification, paper's scheme": (
        INFL,
        si.tasks.Classification(label_key="bulk_labels", hidden=32),
        _pbmc_sites,
    ),
    "site-aware spatial embedding without labels": (
        HARDENED,
        si.tasks.Embedding(n_latent=8, hidden=32, spatial_key="X_umap", site_effects=True),
        _pbmc_sites,
    ),
    "perturbation": (
        HARDENED,
        si.tasks.Perturbation(perturbation_key="guide", control="0", covariate_keys=("phase",), hidden=32),
        _pbmc_sites,
    ),
    "mosaic": (HARDENED, si.tasks.Mosaic(n_latent=8, hidden=32, label_key="bulk_labels"), _mosaic_sites),
    "classification with DP-SGD": (
        None,
        si.tasks.Classification(label_key="bulk_labels", hidden=32),
        _pbmc_sites,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flower_simulation_gives_the_in_process_model(pbmc, case):
    key, task, make_sites = CASES[case]
    options = {**RUN, "task": task, "copy": True}
    if case.endswith("DP-SGD"):
        pytest.importorskip("opacus")
        options |= {"dp": {"epsilon": 8.0}, "fit": {"lr": 1e-2}}
    sites = make_sites(pbmc)
    local = si.tl.train_federated(sites, key=key, engine="local", **options)
    flower = si.tl.train_federated(sites, key=key, engine="flower", **options)
    assert (local.params["engine"], flower.params["engine"]) == ("local", "flower")
    assert flower.spec == local.spec
    assert flower.config == local.config
    assert_same_weights(local, flower)
    assert_same_history(local.history, flower.history)
    assert flower.params["best_round"] == local.params["best_round"]
    for name, site in local.sites.items():  # what each site received
        np.testing.assert_array_equal(flower.sites[name].obsm["X_scinfl"], site.obsm["X_scinfl"])
        if "scinfl_predicted" in (getattr(site, "layers", None) or {}):  # a perturbation model's
            np.testing.assert_array_equal(
                flower.sites[name].layers["scinfl_predicted"], site.layers["scinfl_predicted"]
            )
    if "dp" in options:
        # each site's accountant spans the rounds whichever Ray worker served it
        assert flower.params["dp"] == local.params["dp"]
        assert flower.history["dp_steps"].sum() == local.history["dp_steps"].sum() > 0
        assert 0 < max(flower.params["dp"]["spent_epsilon"].values()) <= 8.0
