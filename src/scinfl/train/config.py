"""What defines a model's architecture, and building it (keyed or plain) from that definition."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..key import FederationKey
from ..nn import keyify
from .tasks import get_task

__all__ = ["ModelConfig", "build_network", "key_coordinates"]


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, enough to rebuild the network from saved weights. Holds no key material.

    ``scheme=None`` is the plain network (no keyed modules): the FedAvg baseline. ``norm`` is the
    normalisation in the residual blocks: ``"batch"`` (the paper's BatchNorm) or ``"layer"`` (LayerNorm,
    which DP-SGD needs). Configs saved before ``norm`` existed load as ``"batch"``.
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


def build_network(config: ModelConfig) -> nn.Module:
    """The task network for ``config``, keyed with the config's scheme (or plain when it is None)."""
    network = get_task(config.task).build_network(config)
    if config.scheme is None:
        return network
    if config.scheme != "infl":
        raise ValueError(f"Unknown key scheme {config.scheme!r}.")
    return keyify(
        network,
        strength=config.key_strength,
        key_dim=config.key_dim,
        encoder_hidden=config.encoder_hidden,
        coordinate_dim=config.coordinate_dim,
    )


def key_coordinates(key: FederationKey | None, config: ModelConfig) -> torch.Tensor | None:
    """The secret coordinates ``key`` gives for ``config``'s keyed modules (None for no key).

    Raises if the key is of another scheme than the model, or if a plain model is given a key.
    """
    if key is None:
        return None
    if not isinstance(key, FederationKey):
        raise TypeError(f"key must be a scinfl.FederationKey or None, got {type(key).__name__}.")
    if config.scheme is None:
        raise ValueError("This model was trained without a key (plain FedAvg); pass key=None.")
    if key.scheme != config.scheme:
        raise ValueError(f"The key is for scheme {key.scheme!r}, but the model uses {config.scheme!r}.")
    return torch.from_numpy(key.coordinates(config.n_key_points, config.coordinate_dim))
