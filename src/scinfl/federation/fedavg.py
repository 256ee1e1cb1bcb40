"""Federated averaging: the one aggregation rule every engine uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["fedavg"]


def fedavg(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    *,
    base: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Average state dicts, weighted by ``weights`` (each site's training cell count).

    Every floating-point entry is averaged: weights, biases, key heads, the key encoder, and BatchNorm
    running means and variances. Integer entries (BatchNorm's ``num_batches_tracked``) take the maximum,
    as their average has no meaning.

    Each entry is averaged over the updates that hold it, weighted by their own weights: a site of a
    multi-omics mosaic sends only the modules of the modalities it has
    (:class:`scinfl.nn.MosaicAutoencoder`), so an encoder is the mean of the updates of the sites that
    trained it. Without ``base`` every update must hold the same entries. With ``base`` (the global state
    the round started from) updates may hold any subset of its entries, and an entry no update holds
    keeps its value in ``base``.
    """
    if not states:
        raise ValueError("FedAvg needs at least one update.")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} updates but {len(weights)} weights.")
    if any(w < 0 for w in weights) or float(sum(weights)) <= 0:
        raise ValueError(f"FedAvg weights must be non-negative with a positive sum, got {list(weights)}.")
    if base is None:
        names = list(states[0])
        for i, state in enumerate(states[1:], start=1):
            if list(state) != names:
                raise ValueError(
                    f"Update {i} has other parameters than update 0: the sites run different models."
                )
    else:
        names = list(base)
        for i, state in enumerate(states):
            unknown = sorted(set(state) - set(base))
            if unknown:
                raise ValueError(
                    f"Update {i} has parameters the global model lacks ({', '.join(unknown[:3])}): "
                    "the sites run different models."
                )
    averaged: dict[str, Tensor] = {}
    for name in names:
        holders = [(state[name], w) for state, w in zip(states, weights, strict=True) if name in state]
        total = float(sum(w for _, w in holders))
        if not holders or total <= 0:  # no update (with cells) holds it: the global value stays
            averaged[name] = base[name].detach().clone()
        elif holders[0][0].is_floating_point():
            mean = holders[0][0] * (holders[0][1] / total)
            for tensor, weight in holders[1:]:
                mean.add_(tensor, alpha=weight / total)
            averaged[name] = mean
        else:
            averaged[name] = torch.stack([tensor for tensor, _ in holders]).amax(dim=0)
    return averaged
