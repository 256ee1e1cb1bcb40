"""The run spec: everything that defines a federated run, in one serialisable object.

:func:`scinfl.tl.train_federated` builds it from its arguments, the Flower ServerApp reads it from the
run config (:meth:`RunSpec.from_run_config`), every message to a site carries it, a checkpoint records what
a resumed run must share with it (:meth:`RunSpec.signature`) and a saved model keeps it. It holds the key's
fingerprint and scheme (public), never the key.
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..key import SCHEMES
from ..tasks import ModelConfig, Task, get_task
from ..tasks._base import _coerce
from ..train import DPSettings, FitSettings, settings_from
from .secure import MIN_COHORT

__all__ = ["MIN_DELTA", "PATIENCE", "ROUNDS", "EarlyStopping", "RunSpec"]

# Early stopping's defaults, measured on every data set here (benchmarks/early_stopping.py,
# docs/benchmarks.md): the longest patience that stopped within 1.5x the best round in hindsight on every
# run (8 ran to 1.6x); its selected loss was within 0.2% of the fixed 20 rounds', and lower on average.
PATIENCE = 5
MIN_DELTA = 0.0
ROUNDS = 20  # federated rounds of a run (with early stopping, at most)


@dataclass(frozen=True)
class EarlyStopping:
    """Early stopping's settings (``early_stopping=`` of ``tl.train_federated``: ``True`` for these
    defaults, or a dict of them).

    Attributes
    ----------
    patience
        Stop once the validation loss (weighted over sites, the loss that selects the round) has not
        improved for this many rounds.
    min_delta
        What counts as an improvement: a fall below the best loss by more than this fraction of it.
    """

    patience: int = PATIENCE
    min_delta: float = MIN_DELTA

    @classmethod
    def from_option(cls, value: bool | Mapping[str, Any] | EarlyStopping) -> EarlyStopping | None:
        """``early_stopping=`` as settings: None for ``False`` (every round runs)."""
        if isinstance(value, bool):
            return cls() if value else None
        return settings_from(cls, value, "early_stopping", "{'patience': 10}")


@dataclass(frozen=True)
class RunSpec:
    """A federated run's settings (see the module docstring).

    Attributes
    ----------
    task
        The task and its options (:mod:`scinfl.tasks`).
    sites
        The consortium's site names, in the order that fixes each site's seeds and the feature order
        (``join="inner"`` keeps the first site's order).
    key_fingerprint, scheme
        The key version updates must be made under (``FederationKey.fingerprint``) and its scheme; None
        for plain FedAvg.
    rounds, fraction
        Federated rounds (with ``early_stopping``, at most), and the fraction of sites sampled per round.
    early_stopping, patience, min_delta
        Stop the run once the validation loss (weighted over sites, the loss that selects the round) has
        not improved by more than ``min_delta`` of its best value (relative) for ``patience`` rounds.
    fit
        Local optimisation (:class:`~scinfl.train.FitSettings`).
    key_strength
        ``scheme="infl"``'s key strength (the network's width and dropout are the task's).
    validation_fraction
        Fraction of each site's cells held out (stratified) to select the best round.
    join
        Features: ``"inner"`` (shared by every site) or ``"outer"`` (all, zero-filled).
    seed
        Seed of initialisation, splits, sampling and local shuffling.
    dp
        DP-SGD target (:class:`~scinfl.train.DPSettings`), or None.
    min_sites
        The run goes on while at least this many sites answer each round (0: every listed site).
    round_timeout, connect_timeout
        Seconds to wait for a round's replies, and for the sites to connect (sites on other machines).
    secure_aggregation
        Sites send their updates masked (:mod:`scinfl.federation.secure`): the server learns only each
        round's sum over its cohort, never one site's update.
    min_cohort
        With secure aggregation, the fewest sites a round may sum; fewer is an error, never a lone update.
    """

    task: Task
    sites: tuple[str, ...]
    key_fingerprint: str | None = None
    scheme: str | None = None
    rounds: int = ROUNDS
    fraction: float = 1.0
    fit: FitSettings = field(default_factory=FitSettings)
    key_strength: float = 1.0
    validation_fraction: float = 0.1
    join: str = "inner"
    seed: int = 0
    dp: DPSettings | None = None
    min_sites: int = 0
    round_timeout: float = 600.0
    connect_timeout: float = 120.0
    secure_aggregation: bool = True
    min_cohort: int = MIN_COHORT
    early_stopping: bool = False
    patience: int = PATIENCE
    min_delta: float = MIN_DELTA

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", get_task(self.task))
        sites = (self.sites,) if isinstance(self.sites, str) else self.sites
        object.__setattr__(self, "sites", tuple(str(s) for s in sites))
        if not self.sites:
            raise ValueError("A run needs the consortium's site names.")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"Site names must be unique, got {list(self.sites)}.")
        for name in ("rounds", "seed", "min_sites", "min_cohort", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise ValueError(f"{name} must be an integer, got {value!r}.")
            object.__setattr__(self, name, int(value))
        if self.rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}.")
        if not isinstance(self.early_stopping, bool):
            raise ValueError(f"early_stopping must be True or False, got {self.early_stopping!r}.")
        if self.patience < 1:
            raise ValueError(f"patience must be a positive number of rounds, got {self.patience}.")
        if not 0.0 <= self.min_delta < 1.0:
            raise ValueError(
                f"min_delta is relative to the best validation loss and must be in [0, 1), got {self.min_delta}."
            )
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}.")
        if self.join not in ("inner", "outer"):
            raise ValueError(f"join must be 'inner' or 'outer', got {self.join!r}.")
        if self.scheme is not None and self.scheme not in SCHEMES:
            raise ValueError(f"Unknown key scheme {self.scheme!r}; known schemes: {', '.join(SCHEMES)}.")
        if (self.key_fingerprint is None) != (self.scheme is None):
            raise ValueError(
                "Give both the key's fingerprint and scheme for a keyed run, or neither for plain FedAvg."
            )
        if self.dp is not None:
            object.__setattr__(self, "dp", DPSettings.from_mapping(self.dp))
            if self.scheme is not None:
                raise ValueError(
                    "dp= is available for plain models only: pass key=None. Opacus computes per-sample "
                    "gradients with rules that assume layers y = x W^T + b; keyed layers compute "
                    "(x W^T) * scale + shift with a key-dependent scale and shift shared by the batch, so "
                    "their per-sample gradients (and the privacy guarantee) would be wrong."
                )
            if not self.task.supports_dp:
                raise NotImplementedError(
                    f"task={self.task.name!r}: dp= (DP-SGD) does not train this task's network yet."
                )
        if not 0 <= self.min_sites <= len(self.sites):
            raise ValueError(f"min_sites must be in [0, {len(self.sites)}], got {self.min_sites}.")
        if not (self.round_timeout > 0 and self.connect_timeout > 0):
            raise ValueError("round_timeout and connect_timeout must be positive (seconds).")
        if not isinstance(self.secure_aggregation, bool):
            raise ValueError(f"secure_aggregation must be True or False, got {self.secure_aggregation!r}.")
        if self.min_cohort < 1:
            raise ValueError(f"min_cohort must be a positive integer, got {self.min_cohort}.")
        if self.secure_aggregation and self.min_cohort < 2:
            raise ValueError(
                f"min_cohort={self.min_cohort}: secure aggregation needs at least 2 (a sum of one site's update "
                "is that update); pass secure_aggregation=False to send updates in the clear."
            )
        if self.secure_aggregation:
            cohort = max(1, round(self.fraction * len(self.sites)))
            if cohort < self.min_cohort:
                sampled = f"fraction={self.fraction:g} samples {cohort} of" if self.fraction < 1 else "it has"
                raise ValueError(
                    f"Secure aggregation sums at least min_cohort={self.min_cohort} sites per round, but {sampled} "
                    f"{len(self.sites)} site(s). "
                    + (
                        "A sum of two hides each update from the server, but each site can subtract its own "
                        "update from it and learn the other's. "
                        if cohort == 2
                        else "One site's update would reach the server alone. "
                    )
                    + ", or ".join(
                        (["Pass secure_aggregation={'min_cohort': 2} to accept that"] if cohort == 2 else [])
                        + ([("R" if cohort < 2 else "r") + "aise fraction"] if self.fraction < 1 else [])
                        + [
                            ("P" if cohort < 2 and self.fraction == 1 else "p")
                            + "ass secure_aggregation=False"
                        ]
                    )
                    + " to send updates in the clear."
                )

    @property
    def required_sites(self) -> int:
        """How many sites must answer each round."""
        return self.min_sites or len(self.sites)

    def model_config(self, schema) -> ModelConfig:
        """The architecture of this run's network for the agreed ``schema``."""
        return ModelConfig(
            task=self.task,
            schema=schema,
            norm=self.task.norm(private=self.dp is not None),
            scheme=self.scheme,
            key_strength=self.key_strength,
        )

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        """JSON-able nested dict; :meth:`from_dict` reads it back."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["task"] = self.task.to_dict()
        out["sites"] = list(self.sites)
        out["fit"] = self.fit.to_dict()
        out["dp"] = None if self.dp is None else self.dp.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown run settings {unknown}; known: {', '.join(sorted(known))}.")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name == "task":
                values[name] = value if isinstance(value, Task) else Task.from_dict(value)
            elif name == "fit":
                values[name] = FitSettings(**{str(k).replace("-", "_"): v for k, v in dict(value).items()})
            elif name == "dp":
                values[name] = (
                    None
                    if value in (None, "", {})
                    else DPSettings.from_mapping(
                        {str(k).replace("-", "_"): v for k, v in dict(value).items()}
                    )
                )
            elif name == "sites":
                values[name] = _coerce(value, tuple[str, ...], name)
            elif name in ("key_fingerprint", "scheme"):
                values[name] = str(value) or None if value is not None else None
            else:
                values[name] = _coerce(value, hints[name], name)
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls.from_dict(json.loads(text))

    def to_run_config(self) -> dict[str, Any]:
        """The spec as a Flower run config: flat keys spelt with hyphens, nested ones joined by dots
        (``task.n-latent``, ``fit.lr``, ``dp.epsilon``), lists as comma-separated text, None as ``""``.
        :meth:`from_run_config` reads it back; ``flwr run --run-config`` overrides any key."""
        return _flatten(self.to_dict())

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSpec:
        """Read a Flower run config (:meth:`to_run_config`); keys it lacks take their defaults."""
        nested = _unflatten(run_config)
        if "task" not in nested:
            raise ValueError("The run config names no task (task.name = 'classification', ...).")
        return cls.from_dict(nested)

    def signature(self) -> dict[str, Any]:
        """What a run that resumes this one's checkpoint must share: everything but the number of rounds
        (which a resumed run may raise, except with DP-SGD, whose noise is calibrated to the planned rounds)
        and how long it waits for the sites."""
        loose = {"min_sites", "min_cohort", "round_timeout", "connect_timeout"} | (
            {"rounds"} if self.dp is None else set()
        )
        return {k: v for k, v in json.loads(self.to_json()).items() if k not in loose}

    def replace(self, **changes: Any) -> RunSpec:
        return replace(self, **changes)


def _flatten(tree: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Flower's flat run config: the spec's fields (depth 0) and those of its task, fit and dp (depth 1)
    spelt with hyphens; deeper keys are data (a mosaic's modality names) and keep their spelling."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        name = str(name)
        if depth >= 2 and "." in name:
            raise ValueError(f"{prefix}{name}: a name with '.' cannot be written to a Flower run config.")
        key = f"{prefix}{name.replace('_', '-') if depth < 2 else name}"
        if isinstance(value, Mapping):
            out |= _flatten(value, f"{key}.", depth + 1)
        elif isinstance(value, list | tuple):
            items = [str(v) for v in value]
            bad = [v for v in items if "," in v or v != v.strip()]
            if bad:
                raise ValueError(
                    f"{key}: {bad[0]!r} cannot be written to a Flower run config (',' or spaces)."
                )
            out[key] = ",".join(items)
        elif value is None:
            out[key] = ""
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} is not a finite number.")
        else:
            out[key] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out
