"""scinfl: key-embedded federated learning (INFL) for omics data, the scverse way."""

__version__ = "0.1.0"

from . import data, federation, nn, pl, pp, tl, train
from ._settings import settings
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
    "tl",
    "train",
]
