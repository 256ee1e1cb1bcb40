"""What a key gives a network: the material its keyed modules run with."""

from __future__ import annotations

import torch
from torch import nn

from ..key import FederationKey
from ..nn import HardenedNetwork, KeyedModule, KeyedNetwork, KeyMaterial, derive_hardened_key

__all__ = ["key_material"]


def key_material(key: FederationKey | None, network: nn.Module) -> torch.Tensor | KeyMaterial | None:
    """What ``key`` gives ``network``'s keyed modules (None for no key).

    The secret coordinates for ``scheme="infl"``, a :class:`~scinfl.nn.HardenedKey` for
    ``scheme="hardened"``; both are fixed by the network's public structure. Derived afresh on every call
    and never cached: the caller holds it only as long as it needs it. Raises if the key is of another
    scheme than the network, or if a plain network is given a key.
    """
    if key is None:
        return None
    if not isinstance(key, FederationKey):
        raise TypeError(f"key must be a scinfl.FederationKey or None, got {type(key).__name__}.")
    if not isinstance(network, KeyedModule):
        raise ValueError("This model was trained without a key (plain FedAvg); pass key=None.")
    if key.scheme != network.scheme:
        raise ValueError(f"The key is for scheme {key.scheme!r}, but the model uses {network.scheme!r}.")
    if isinstance(network, HardenedNetwork):
        return derive_hardened_key(key.derive, network.layout)
    assert isinstance(network, KeyedNetwork)
    return torch.from_numpy(key.coordinates(network.n_key_points, network.key_encoder.coordinate_dim))
