"""Compute: train a keyed model across sites, predict on new data, audit its privacy."""

from ._federated import predict, train_federated
from ._privacy import privacy_audit

__all__ = ["predict", "privacy_audit", "train_federated"]
