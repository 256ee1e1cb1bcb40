"""Compute: train a keyed model across sites, predict on new data, transfer labels in its embedding, map a new site
into it, score how it mixes the sites, audit its privacy, rotate its key."""

from ._federated import predict, train_federated
from ._map import map_site
from ._mixing import site_mixing
from ._perturbation import predict_perturbation, score_perturbation
from ._privacy import privacy_audit
from ._rekey import rekey
from ._transfer import transfer_labels

__all__ = [
    "map_site",
    "predict",
    "predict_perturbation",
    "privacy_audit",
    "rekey",
    "score_perturbation",
    "site_mixing",
    "train_federated",
    "transfer_labels",
]
