"""Compute: train a keyed model across sites, predict on new data, audit its privacy, rotate its key."""

from ._federated import predict, train_federated
from ._privacy import privacy_audit
from ._rekey import rekey

__all__ = ["predict", "privacy_audit", "rekey", "train_federated"]
