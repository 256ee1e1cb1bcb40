"""Federated averaging: the one aggregation rule every engine and both aggregation paths use.

FedAvg is decided in one place, :func:`weighted_mean`: each entry of the global state is the sum of its
holders' ``n * value`` divided by the sum of their ``n`` (``n``: each site's training cells). The clear
path (:func:`fedavg`) forms those sums from the updates; secure aggregation
(:func:`scinfl.federation.secure.unmask_sum`) decodes them from the masked vectors. Both then call
:func:`weighted_mean`, so they agree entry by entry, every dtype: floating-point entries to the secure
path's fixed-point resolution, integer entries exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["fedavg", "weighted_mean"]


def weighted_mean(
    sums: Mapping[str, Tensor], counts: Mapping[str, float], reference: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The global state from the holders' sums: ``sums[name] / counts[name]`` for every entry of
    ``reference`` (the round's global state, which gives each entry's shape and dtype).

    - Floating-point entries (weights, biases, key heads, BatchNorm running means and variances) are the
      weighted mean, computed in float64 and cast to the entry's dtype.
    - Integer and boolean entries (BatchNorm's ``num_batches_tracked``) are the weighted mean rounded to
      the nearest integer (halves to even): the only rule a secure sum allows (a maximum would need each
      site's value), and the same in the clear.
    - An entry that no holder with cells sent (``counts`` 0 or absent) keeps its value in ``reference``.
    """
    out: dict[str, Tensor] = {}
    for name, ref in reference.items():
        count = float(counts.get(name, 0.0))
        if count <= 0:
            out[name] = ref.detach().clone()
            continue
        mean = sums[name].to(torch.float64).reshape(ref.shape) / count
        if not ref.is_floating_point():
            mean = mean.round()
        out[name] = mean.to(ref.dtype)
    return out


def fedavg(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    *,
    base: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Average state dicts, weighted by ``weights`` (each site's training cell count), by
    :func:`weighted_mean`'s rule.

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
        reference = states[0]
    else:
        for i, state in enumerate(states):
            unknown = sorted(set(state) - set(base))
            if unknown:
                raise ValueError(
                    f"Update {i} has parameters the global model lacks ({', '.join(unknown[:3])}): "
                    "the sites run different models."
                )
        reference = base
    sums: dict[str, Tensor] = {}
    counts: dict[str, float] = {}
    for state, weight in zip(states, weights, strict=True):
        if weight <= 0:
            continue
        for name, tensor in state.items():
            value = tensor.detach().to(torch.float64) * float(weight)
            sums[name] = sums[name].add_(value) if name in sums else value
            counts[name] = counts.get(name, 0.0) + float(weight)
    return weighted_mean(sums, counts, reference)
