"""Compute: train a keyed model across sites, predict on new data. Results land in the AnnData."""

from ._federated import predict, train_federated

__all__ = ["predict", "train_federated"]
