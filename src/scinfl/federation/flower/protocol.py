"""What crosses the wire between scinfl's ServerApp and ClientApp, and the run's public settings.

Everything a message carries is listed here: global weights and updates as an ``ArrayRecord``, settings
as a ``ConfigRecord``, metrics as a ``MetricRecord``. None of it is key material: a site reports its key's
fingerprint (a public version tag) and its cell count, and that is all the server learns about its key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from flwr.app import ArrayRecord
from torch import Tensor

__all__ = [
    "RunSettings",
    "arrays_to_state",
    "state_to_arrays",
]

# Record names inside a message's RecordDict.
GLOBAL_WEIGHTS: Final = "global"
UPDATE: Final = "update"
INSTRUCTION: Final = "instruction"
SITE: Final = "site"
METRICS: Final = "metrics"

# Message types: the first exchange asks each SuperNode which site it is (query), the rounds train.
HELLO: Final = "query"
TRAIN: Final = "train"


@dataclass(frozen=True)
class RunSettings:
    """A federated run's public settings: the ServerApp's run config.

    In a deployment they come from ``[tool.flwr.app.config]`` of the consortium's ``pyproject.toml``
    (keys spelt with hyphens, e.g. ``key-fingerprint``) and ``flwr run --run-config`` overrides. They
    hold the key's fingerprint, which is public, and never the key.

    Attributes
    ----------
    sites
        The consortium's site names, in the order that fixes each site's seeds and the feature order
        (``join="inner"`` keeps the first site's order). Each SuperNode names its site in its
        ``--node-config``; a SuperNode of an unlisted site is left out.
    key_fingerprint
        The key version updates must be made under (``FederationKey.fingerprint``); ``""`` for plain FedAvg.
    scheme
        The keyed-module scheme (``"infl"`` or ``"hardened"``); ``""`` for plain FedAvg.
    output_dir
        Where the ServerApp writes its per-round checkpoint and the final model (absolute path on the
        ServerApp's machine).
    min_sites
        The run goes on while at least this many sites answer each round (0: every listed site);
        below it the run stops with :class:`SiteFailureError`.
    round_timeout, connect_timeout
        Seconds to wait for a round's replies, and for the listed sites' SuperNodes to connect.
    resume
        Continue from the checkpoint in ``output_dir`` instead of starting at round 1.
    """

    sites: tuple[str, ...]
    key_fingerprint: str = ""
    scheme: str = ""
    output_dir: str = ""
    task: str = "classification"
    rounds: int = 20
    local_epochs: int = 1
    fraction: float = 1.0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    hidden: int = 256
    dropout: float = 0.1
    key_strength: float = 1.0
    validation_fraction: float = 0.1
    label_key: str = ""
    layer: str = ""
    use_raw: bool = False
    join: str = "inner"
    seed: int = 0
    min_sites: int = 0
    round_timeout: float = 600.0
    connect_timeout: float = 120.0
    resume: bool = False

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("RunSettings needs the consortium's site names (run config 'sites').")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"Site names must be unique, got {list(self.sites)}.")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}.")
        if not 0 <= self.min_sites <= len(self.sites):
            raise ValueError(f"min-sites must be in [0, {len(self.sites)}], got {self.min_sites}.")
        if self.round_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("round-timeout and connect-timeout must be positive (seconds).")
        if bool(self.key_fingerprint) != bool(self.scheme):
            raise ValueError(
                "Give both key-fingerprint and scheme for a keyed run, or neither for plain FedAvg."
            )

    @property
    def required_sites(self) -> int:
        """How many sites must answer each round."""
        return self.min_sites or len(self.sites)

    @property
    def expected_fingerprint(self) -> str | None:
        return self.key_fingerprint or None

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Read the run config (hyphenated keys; unknown keys are an error, missing ones take defaults)."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"Unknown scinfl run-config keys {unknown}; known keys: {sorted(known)}.")
        values: dict[str, Any] = {}
        for name, value in run_config.items():
            field = known[name]
            if field.name == "sites":
                value = tuple(s.strip() for s in str(value).split(",") if s.strip())
            elif field.type == "bool":
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif field.type == "int":
                value = int(value)
            elif field.type == "float":
                value = float(value)
            else:
                value = str(value)
            values[field.name] = value
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The run config that :meth:`from_run_config` reads back (what ``--run-config`` takes)."""
        out = {}
        for name, value in asdict(self).items():
            out[name.replace("_", "-")] = ",".join(value) if name == "sites" else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_run_config(), sort_keys=True)


def state_to_arrays(state: Mapping[str, Tensor]) -> ArrayRecord:
    """A state dict as an ``ArrayRecord`` (exact: float32 stays float32, int64 stays int64)."""
    return ArrayRecord({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()})


def arrays_to_state(record: ArrayRecord) -> dict[str, Tensor]:
    """The state dict an ``ArrayRecord`` carries, as torch tensors in the record's order."""
    return dict(record.to_torch_state_dict())
