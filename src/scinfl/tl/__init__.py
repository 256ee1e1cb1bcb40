"""Compute: train a keyed model across sites, predict on new data, transfer labels in its embedding, audit its
privacy, rotate its key."""

from ._federated import predict, train_federated
from ._perturbation import predict_perturbation, score_perturbation
from ._privacy import privacy_audit
from ._rekey import rekey
from ._transfer import transfer_labels

__all__ = [
    "predict",
    "predict_perturbation",
    "privacy_audit",
    "rekey",
    "score_perturbation",
    "train_federated",
    "transfer_labels",
]
