"""What defines a model's architecture, and building it (keyed or plain) from that definition."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import nn

from ..key import SCHEMES, FederationKey
from ..nn import HardenedLayout, KeyMaterial, derive_hardened_key, harden, keyify
from .tasks import get_task

__all__ = ["ModelConfig", "build_network", "hardened_layout", "key_material"]


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, enough to rebuild the network from saved weights. Holds no key material.

    ``scheme=None`` is the plain network (no keyed modules): the FedAvg baseline. ``norm`` is the
    normalisation in the residual blocks: ``"batch"`` (the paper's BatchNorm) or ``"layer"`` (LayerNorm,
    which DP-SGD needs). ``key_strength`` and the encoder sizes belong to ``scheme="infl"``; the
    ``mixing_*`` fields to ``scheme="hardened"`` (its input mixing's block size, rounds and gain range);
    ``n_latent`` and ``likelihood`` to ``task="embedding"``; ``n_covariates`` (the covariates' one-hot
    width) to ``task="perturbation"``, whose ``n_classes`` counts the perturbations, control included;
    ``modalities`` (``(name, n_features, likelihood)`` per modality) and ``modality_dropout`` to
    ``task="mosaic"`` (with ``n_latent``).
    Configs saved before a field existed load with its default.
    """

    task: str
    n_features: int
    n_classes: int
    hidden: int = 256
    dropout: float = 0.1
    scheme: str | None = "infl"
    key_strength: float = 1.0
    key_dim: int = 16
    encoder_hidden: int = 64
    n_key_points: int = 128
    coordinate_dim: int = 2
    norm: Literal["batch", "layer"] = "batch"
    mixing_block: int = 32
    mixing_rounds: int = 2
    mixing_gain: float = 4.0
    n_latent: int = 16
    likelihood: Literal["gaussian", "poisson"] = "gaussian"
    n_covariates: int = 0
    modalities: tuple[tuple[str, int, str], ...] = ()
    modality_dropout: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        # JSON gives lists; the config is hashable (hardened_layout caches by it), so nested tuples.
        return cls(**{k: _tuples(v) if k == "modalities" else v for k, v in data.items()})


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def build_network(config: ModelConfig) -> nn.Module:
    """The task network for ``config``, keyed with the config's scheme (or plain when it is None)."""
    network = get_task(config.task, likelihood=config.likelihood, n_features=config.n_features).build_network(
        config
    )
    if config.scheme is None:
        return network
    if config.scheme == "hardened":
        return harden(
            network, block_size=config.mixing_block, rounds=config.mixing_rounds, gain=config.mixing_gain
        )
    if config.scheme != "infl":
        raise ValueError(f"Unknown key scheme {config.scheme!r}; known schemes: {', '.join(SCHEMES)}.")
    return keyify(
        network,
        strength=config.key_strength,
        key_dim=config.key_dim,
        encoder_hidden=config.encoder_hidden,
        coordinate_dim=config.coordinate_dim,
    )


@lru_cache(maxsize=32)
def hardened_layout(config: ModelConfig) -> HardenedLayout:
    """The public layout of ``config``'s hardened network (what its key material must fit)."""
    return build_network(config).layout


def key_material(key: FederationKey | None, config: ModelConfig) -> torch.Tensor | KeyMaterial | None:
    """What ``key`` gives ``config``'s keyed modules (None for no key).

    The secret coordinates for ``scheme="infl"``, a :class:`~scinfl.nn.HardenedKey` for
    ``scheme="hardened"``. Derived afresh on every call and never cached: the caller holds it only as long
    as it needs it. Raises if the key is of another scheme than the model, or if a plain model is given a
    key.
    """
    if key is None:
        return None
    if not isinstance(key, FederationKey):
        raise TypeError(f"key must be a scinfl.FederationKey or None, got {type(key).__name__}.")
    if config.scheme is None:
        raise ValueError("This model was trained without a key (plain FedAvg); pass key=None.")
    if key.scheme != config.scheme:
        raise ValueError(f"The key is for scheme {key.scheme!r}, but the model uses {config.scheme!r}.")
    if config.scheme == "hardened":
        return derive_hardened_key(key.derive, hardened_layout(config))
    return torch.from_numpy(key.coordinates(config.n_key_points, config.coordinate_dim))
