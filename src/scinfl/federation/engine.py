"""Federation rounds, run in-process (``engine="local"``).

The engine sees sites only through :class:`Site`: fit on global weights and return weights, a cell count
and a key fingerprint; evaluate global weights. It knows nothing of tasks or keys beyond the fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from ..train import LocalFitResult, copy_state
from .checkpoint import checkpoint_path, load_checkpoint, round_checkpoint, save_checkpoint
from .fedavg import fedavg

__all__ = [
    "FederationResult",
    "KeyVersionError",
    "Site",
    "aggregate",
    "run_local",
    "sample_sites",
    "site_seed",
]

logger = logging.getLogger("scinfl")


class KeyVersionError(RuntimeError):
    """No update of a round was made under the federation's key version."""


class Site(Protocol):
    name: str

    @property
    def n_train(self) -> int: ...

    def fit(self, global_state: Mapping[str, Tensor], *, seed: int) -> LocalFitResult: ...

    def evaluate(self, global_state: Mapping[str, Tensor]) -> dict[str, float]: ...

    def local_state(self) -> dict[str, Any]:
        """What the site carries from round to round besides the global weights (e.g. a DP accountant)."""
        ...

    def restore_local_state(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class FederationResult:
    """The selected global weights, the final ones, and the per-round, per-site history."""

    best_state: dict[str, Tensor]
    final_state: dict[str, Tensor]
    best_round: int
    history: pd.DataFrame


def site_seed(seed: int, round_index: int, site_index: int) -> int:
    """An independent seed for one site's local fit in one round."""
    return int(np.random.SeedSequence([seed, round_index, site_index]).generate_state(1)[0])


def sample_sites(names: list[str], fraction: float, rng: np.random.Generator) -> list[str]:
    """The sites that train this round: ``max(1, round(fraction * n))`` of them, in their given order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    n = max(1, round(fraction * len(names)))
    chosen = set(rng.choice(len(names), size=n, replace=False).tolist())
    return [name for i, name in enumerate(names) if i in chosen]


def aggregate(
    updates: Mapping[str, LocalFitResult],
    expected_fingerprint: str | None,
    round_index: int,
    base: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """FedAvg of the updates made under the expected key version; returns it and the rejected sites.

    ``base`` is the global state of the round: an entry no accepted update holds keeps its value there
    (see :func:`~scinfl.federation.fedavg`).
    """
    accepted = {s: u for s, u in updates.items() if u.key_fingerprint == expected_fingerprint}
    rejected = [s for s in updates if s not in accepted]
    for site in rejected:
        logger.warning(
            "Round %d: rejected the update of site %r, made under key version %s instead of %s.",
            round_index,
            site,
            updates[site].key_fingerprint,
            expected_fingerprint,
        )
    if not accepted:
        raise KeyVersionError(
            f"Round {round_index}: no site sent an update under key version {expected_fingerprint}; "
            f"rejected: {', '.join(rejected)}."
        )
    state = fedavg([u.state for u in accepted.values()], [u.n_obs for u in accepted.values()], base=base)
    return state, rejected


def _selection_loss(evaluations: Mapping[str, dict[str, float]]) -> float:
    n = sum(e.get("n", 0.0) for e in evaluations.values())
    if n == 0:
        return float("nan")
    return sum(e["loss"] * e["n"] for e in evaluations.values() if e.get("n", 0.0) > 0) / n


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted names (``params.lr``), to name what changed."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out |= _flatten(value, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = value
    return out


def _resume(
    directory: str | os.PathLike[str], signature: Mapping[str, Any], sites: Mapping[str, Site], rounds: int
) -> dict[str, Any]:
    """The checkpoint of ``directory``, after checking that it belongs to this run; restores the sites."""
    checkpoint = load_checkpoint(directory)
    previous, current = _flatten(json.loads(checkpoint["signature"])), _flatten(signature)
    changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
    if changed:
        raise ValueError(
            f"The checkpoint in {directory} was written by another run ({', '.join(changed)} differ); "
            "resume with the same sites and settings, or start a new run in another directory."
        )
    if checkpoint["round"] > rounds:
        raise ValueError(
            f"The checkpoint in {directory} is at round {checkpoint['round']}, past rounds={rounds}; "
            f"pass rounds >= {checkpoint['round']}."
        )
    for name, state in checkpoint["sites"].items():
        sites[name].restore_local_state(state)
    logger.info("Resuming from the checkpoint of round %d in %s.", checkpoint["round"], directory)
    return checkpoint


def run_local(
    sites: Mapping[str, Site],
    initial_state: Mapping[str, Tensor],
    *,
    rounds: int,
    fraction: float = 1.0,
    seed: int = 0,
    expected_fingerprint: str | None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    signature: Mapping[str, Any] | None = None,
) -> FederationResult:
    """Run ``rounds`` rounds of FedAvg in this process.

    Each round samples sites, fits them locally from the global weights, rejects updates made under
    another key version, averages the rest weighted by training cell count, and evaluates the new global
    weights on every site's validation cells. The returned ``best_state`` is the round with the lowest
    validation loss (weighted by validation cells), or the last round where no site has validation cells.

    With ``checkpoint_dir``, the server's state (global and best weights, history, sampling generator) and
    each site's local state are checkpointed atomically after every round; ``resume=True`` continues from
    that checkpoint, which must carry the same ``signature`` (a JSON-able description of the run). Every
    round's randomness derives from ``seed`` and the round index, so a resumed run ends with the weights
    of an uninterrupted one.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}.")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir=, the directory of the interrupted run.")
    signature = json.loads(json.dumps(dict(signature or {})))  # as it reads back (tuples as lists)
    names = list(sites)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xFEDA]))
    state = copy_state(initial_state)
    best_state, best_round, best_loss = state, 0, float("inf")
    rows: list[dict] = []
    first_round = 1
    if resume:
        checkpoint = _resume(checkpoint_dir, signature, sites, rounds)
        state, best_state = checkpoint["state"], checkpoint["best_state"]
        best_round, best_loss, rows = checkpoint["best_round"], checkpoint["best_loss"], checkpoint["rows"]
        rng.bit_generator.state = checkpoint["rng"]
        first_round = checkpoint["round"] + 1
    elif checkpoint_dir is not None and checkpoint_path(checkpoint_dir).exists():
        raise FileExistsError(
            f"{checkpoint_path(checkpoint_dir)} holds another run's checkpoint: pass resume=True to continue "
            "it, or choose another checkpoint_dir."
        )
    bar = tqdm(
        range(first_round, rounds + 1),
        desc="federated rounds",
        unit="round",
        disable=not progress,
        leave=False,
        initial=first_round - 1,
        total=rounds,
    )
    for round_index in bar:
        chosen = sample_sites(names, fraction, rng)
        updates = {
            name: sites[name].fit(state, seed=site_seed(seed, round_index, names.index(name)))
            for name in chosen
        }
        state, rejected = aggregate(updates, expected_fingerprint, round_index, base=state)
        evaluations = {name: sites[name].evaluate(state) for name in names}
        for name in names:
            update = updates.get(name)
            rows.append(
                {
                    "round": round_index,
                    "site": name,
                    "sampled": update is not None,
                    "rejected": name in rejected,
                    "n_train": sites[name].n_train,
                    **(update.metrics if update else {}),  # what the site reports of its fit
                    **{f"val_{k}" if k != "n" else "n_val": v for k, v in evaluations[name].items()},
                }
            )
        loss = _selection_loss(evaluations)
        if np.isnan(loss) or loss < best_loss:
            best_state, best_round, best_loss = (
                state,
                round_index,
                (loss if not np.isnan(loss) else best_loss),
            )
        if checkpoint_dir is not None:
            save_checkpoint(
                round_checkpoint(
                    round_index,
                    state=state,
                    best_state=best_state,
                    best_round=best_round,
                    best_loss=best_loss,
                    rows=rows,
                    rng=rng,
                    sites={name: sites[name].local_state() for name in names},
                    signature=json.dumps(signature, sort_keys=True),
                ),
                checkpoint_dir,
            )
        if progress and not np.isnan(loss):
            bar.set_postfix(val_loss=f"{loss:.3f}")
    history = pd.DataFrame(rows)
    history["n_val"] = history["n_val"].astype(int)
    return FederationResult(best_state=best_state, final_state=state, best_round=best_round, history=history)
