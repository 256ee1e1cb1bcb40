"""scinfl: key-embedded federated learning (INFL) for omics data, the scverse way.

The subpackages load when first used (``si.pp``, ``si.tl``, ``import scinfl.tl``), as scipy's do: a Flower
ClientApp, which starts a process for every message it answers, then imports only what a site needs
(docs/benchmarks.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._settings import settings
from ._version import __version__
from .key import FederationKey

if TYPE_CHECKING:  # for type checkers and IDEs; at run time they load on first use
    from . import data, federation, nn, pl, pp, privacy, tasks, tl, train
    from .model import FederatedModel

_SUBPACKAGES = ("data", "federation", "nn", "pl", "pp", "privacy", "tasks", "tl", "train")

__all__ = [
    "FederatedModel",
    "FederationKey",
    "__version__",
    "data",
    "federation",
    "nn",
    "pl",
    "pp",
    "privacy",
    "settings",
    "tasks",
    "tl",
    "train",
]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "FederatedModel":
        return importlib.import_module(f"{__name__}.model").FederatedModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
