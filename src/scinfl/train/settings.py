"""Settings of a site's local training that every site shares: optimisation, and the DP-SGD target.

Plain dataclasses with no dependency beyond numpy, so that a run spec can carry them (and Opacus is needed
only where a site trains privately: :mod:`scinfl.train.dp`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["DPSettings", "FitSettings", "settings_from"]


def settings_from(cls, value, name: str, example: str):
    """``value`` as a ``cls`` settings object: one already, or a dict of its fields (an unknown field is
    an error naming the allowed ones). ``name`` and ``example`` are the argument's, for the error."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict such as {example}, got {type(value).__name__}.")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(known), key=str)
    if unknown:
        raise ValueError(f"Unknown {name} setting(s) {unknown}; allowed: {', '.join(known)}.")
    return cls(**value)


@dataclass(frozen=True)
class FitSettings:
    """Local optimisation settings, the same at every site (Adam, a fresh optimiser each local fit).

    Attributes
    ----------
    local_epochs
        Passes over a site's training cells per round.
    batch_size, lr, weight_decay
        Adam's batches, learning rate and weight decay.
    """

    local_epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("local_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
            object.__setattr__(self, name, int(value))
        for name in ("lr", "weight_decay"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'lr' else 'non-negative'} number.")
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class DPSettings:
    """The privacy target of DP-SGD, the same at every site.

    Attributes
    ----------
    epsilon
        Target epsilon of each site over the whole federation (all rounds).
    delta
        Target delta; keep it well below ``1 / n_train`` of the smallest site.
    max_grad_norm
        Per-cell gradient clipping bound (L2 norm over all parameters).
    """

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("epsilon", "delta", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise TypeError(f"dp[{name!r}] must be a number, got {value!r}.")
            object.__setattr__(self, name, float(value))
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"dp['epsilon'] must be a positive finite number, got {self.epsilon}.")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"dp['delta'] must be in (0, 1), got {self.delta}.")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(
                f"dp['max_grad_norm'] must be a positive finite number, got {self.max_grad_norm}."
            )

    @classmethod
    def from_mapping(cls, dp: Mapping[str, float] | DPSettings) -> DPSettings:
        """Settings from ``{"epsilon": ..., "delta": ..., "max_grad_norm": ...}`` (epsilon required)."""
        if isinstance(dp, Mapping) and not set(dp) - {f.name for f in fields(cls)} and "epsilon" not in dp:
            raise ValueError("dp needs a target 'epsilon', e.g. dp={'epsilon': 8.0, 'delta': 1e-5}.")
        return settings_from(cls, dp, "dp", "{'epsilon': 8.0}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)
