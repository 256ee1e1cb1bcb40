"""One round loop over any transport: sampling, key-version gate, FedAvg, selection, checkpoint/resume.

:func:`federate` (a :class:`RoundLoop`) runs a :class:`RunSpec` over a transport: :class:`InProcess` (``engine="local"``) or
Flower's Grid (:mod:`scinfl.federation.flower`, ``engine="flower"``). Sites are built and answered by the
same functions on every engine (:mod:`scinfl.federation.site`).
"""

from .engines import Engine, engine_names, get_engine, register_engine
from .fedavg import fedavg, weighted_mean
from .identity import Roster, SiteIdentity, SiteRefusal
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
from .secure import SecureAggregation
from .site import Hello, Instruction, Reply, answer, build_site, hello, initial_weights, site_split
from .spec import EarlyStopping, RunSpec

__all__ = [
    "EarlyStopping",
    "Engine",
    "FederationRun",
    "Hello",
    "InProcess",
    "Instruction",
    "KeyVersionError",
    "LoopState",
    "Reply",
    "Roster",
    "RoundLoop",
    "RoundReplies",
    "RunSpec",
    "SecureAggregation",
    "SiteFailureError",
    "SiteIdentity",
    "SiteRefusal",
    "Transport",
    "aggregate",
    "answer",
    "build_site",
    "engine_names",
    "fedavg",
    "federate",
    "get_engine",
    "hello",
    "initial_weights",
    "register_engine",
    "sample_sites",
    "site_seed",
    "site_split",
    "weighted_mean",
]
