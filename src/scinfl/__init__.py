"""scinfl: key-embedded federated learning (INFL) for omics data, the scverse way."""

from . import data, federation, nn, pl, pp, tasks, tl, train
from ._settings import settings
from ._version import __version__
from .key import FederationKey
from .model import FederatedModel

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
