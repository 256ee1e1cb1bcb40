"""scinfl: key-embedded federated learning (INFL) for omics data, the scverse way."""

__version__ = "0.1.0"

from . import data, federation, nn, pl, pp, tl, train  # noqa: E402
from ._settings import settings  # noqa: E402
from .key import FederationKey  # noqa: E402
from .model import FederatedModel  # noqa: E402

__all__ = [
    "FederatedModel",
    "FederationKey",
    "__version__",
    "data",
    "federation",
    "nn",
    "pl",
    "pp",
    "settings",
    "tl",
    "train",
]
