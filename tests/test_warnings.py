"""Warnings point at the user's call, however deep in scinfl they are raised."""

from __future__ import annotations

import warnings

import scanpy as sc

import scinfl as si
from helpers import FAST


def _caught(call, phrase: str):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if phrase in str(w.message)]


def test_warnings_from_deep_inside_a_run_name_the_callers_line():
    pbmc = sc.datasets.pbmc68k_reduced().raw.to_adata()  # log-normalised: Poisson warns, from the task
    logged = si.pp.split_sites(pbmc, n_sites=2, label_key="bulk_labels", alpha=100.0, seed=0)
    task = si.tasks.Embedding(likelihood="poisson", hidden=16, n_latent=4)
    narrower = {**logged, "site_1": logged["site_1"][:, 5:].copy()}  # features not shared: the schema warns
    runs = {
        "not whole numbers": lambda: si.tl.train_federated(
            logged, key=None, task=task, rounds=1, secure_aggregation={"min_cohort": 2}
        ),
        "are left out": lambda: si.tl.train_federated(
            narrower, key=None, **{**FAST, "rounds": 1}, secure_aggregation={"min_cohort": 2}
        ),
    }
    for phrase, run in runs.items():
        caught = _caught(run, phrase)
        assert caught, phrase
        assert {w.filename for w in caught} == {__file__}, (phrase, {w.filename for w in caught})
