"""Shared fixtures: real PBMC data (scanpy's bundled pbmc68k_reduced) and small sites built from it.

Helpers shared by the test modules live in ``helpers.py``.
"""

from __future__ import annotations

import hashlib
import logging

import anndata as ad
import pytest
import scanpy as sc
import torch
from threadpoolctl import threadpool_limits

import scinfl as si

# Tests run on one thread: faster for these small networks on 2 cores, and deterministic. BLAS too: a
# multithreaded OpenBLAS on two shared cores made a 765 x 765 QR take 18 s instead of 0.3 s.
torch.set_num_threads(1)
threadpool_limits(1)
si.settings.progress = False


def _registered_pbmc() -> ad.AnnData:
    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)  # its log-normalised values are in .raw
    return adata


@pytest.fixture(scope="session")
def _pbmc() -> ad.AnnData:
    return sc.datasets.pbmc68k_reduced()


@pytest.fixture
def pbmc(_pbmc) -> ad.AnnData:
    """pbmc68k_reduced: 700 PBMCs x 765 genes, log-normalised counts in .raw, 10 bulk_labels classes.

    Registered with ``use_raw=True`` (:func:`scinfl.pp.register_site`), as are the sites split from it.
    """
    adata = _pbmc.copy()
    si.pp.register_site(adata, use_raw=True)
    return adata


@pytest.fixture
def pbmc_sites(pbmc) -> dict[str, ad.AnnData]:
    """Three label-skewed sites from pbmc68k_reduced (Dirichlet alpha 0.5), registered with use_raw=True."""
    return si.pp.split_sites(pbmc, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=0)


@pytest.fixture(scope="session")
def pbmc_split() -> tuple[dict[str, ad.AnnData], ad.AnnData]:
    """Three label-skewed sites from 80% of pbmc68k_reduced, and the stratified 20% held out (142 cells),
    all registered with use_raw=True.

    Shared by several test modules: read it, or copy before writing into it.
    """
    train, held_out = si.pp.split_holdout(_registered_pbmc(), label_key="bulk_labels", fraction=0.2, seed=0)
    return si.pp.split_sites(train, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=0), held_out


@pytest.fixture(scope="session")
def key() -> si.FederationKey:
    """A fixed key of the paper's scheme, so that every run of the suite is the same run (tests of random keys
    make their own; tests/nn/test_hardened.py has the hardened scheme's)."""
    return si.FederationKey(hashlib.sha256(b"scinfl test suite key").digest(), scheme="infl")


@pytest.fixture
def scinfl_log(caplog):
    """caplog for the package logger, which does not propagate to the root logger."""
    logger = logging.getLogger("scinfl")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
