"""Federated averaging: the one aggregation rule every engine uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["fedavg"]


def fedavg(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Average state dicts, weighted by ``weights`` (each site's training cell count).

    Every floating-point entry is averaged: weights, biases, key heads, the key encoder, and BatchNorm
    running means and variances. Integer entries (BatchNorm's ``num_batches_tracked``) take the maximum,
    as their average has no meaning.
    """
    if not states:
        raise ValueError("FedAvg needs at least one update.")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} updates but {len(weights)} weights.")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"FedAvg weights must be non-negative with a positive sum, got {list(weights)}.")
    names = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != names:
            raise ValueError(
                f"Update {i} has other parameters than update 0: the sites run different models."
            )
    averaged: dict[str, Tensor] = {}
    for name in names:
        tensors = [state[name] for state in states]
        if tensors[0].is_floating_point():
            mean = tensors[0] * (weights[0] / total)
            for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
                mean.add_(tensor, alpha=weight / total)
            averaged[name] = mean
        else:
            averaged[name] = torch.stack(tensors).amax(dim=0)
    return averaged
