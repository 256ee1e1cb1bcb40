"""Rounds, client sampling, FedAvg and the key-version check; engines that run them."""

from .engine import FederationResult, KeyVersionError, Site, aggregate, run_local, sample_sites, site_seed
from .fedavg import fedavg

ENGINES = ("local", "flower")  # "flower": scinfl.federation.flower (pip install 'scinfl[flower]')

__all__ = [
    "ENGINES",
    "FederationResult",
    "KeyVersionError",
    "Site",
    "aggregate",
    "fedavg",
    "run_local",
    "sample_sites",
    "site_seed",
]
