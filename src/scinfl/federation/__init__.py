"""One round loop over any transport: sampling, key-version gate, FedAvg, selection, checkpoint/resume.

:func:`federate` (a :class:`RoundLoop`) runs a :class:`RunSpec` over a transport: :class:`InProcess` (``engine="local"``) or
Flower's Grid (:mod:`scinfl.federation.flower`, ``engine="flower"``). Sites are built and answered by the
same functions on every engine (:mod:`scinfl.federation.site`).
"""

from .fedavg import fedavg, weighted_mean
from .local import InProcess
from .rounds import (
    FederationRun,
    KeyVersionError,
    LoopState,
    RoundLoop,
    RoundReplies,
    SiteFailureError,
    Transport,
    aggregate,
    federate,
    sample_sites,
    site_seed,
)
from .site import Hello, Instruction, Reply, answer, build_site, hello, initial_weights, site_split
from .spec import RunSpec

ENGINES = ("local", "flower")  # "flower": scinfl.federation.flower (pip install 'scinfl[flower]')

__all__ = [
    "ENGINES",
    "FederationRun",
    "Hello",
    "InProcess",
    "Instruction",
    "KeyVersionError",
    "LoopState",
    "Reply",
    "RoundLoop",
    "RoundReplies",
    "RunSpec",
    "SiteFailureError",
    "Transport",
    "aggregate",
    "answer",
    "build_site",
    "fedavg",
    "federate",
    "hello",
    "initial_weights",
    "sample_sites",
    "site_seed",
    "site_split",
    "weighted_mean",
]
