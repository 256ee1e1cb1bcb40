"""The one round loop of every engine: connect, agree the schema, then sample, train, aggregate, select.

:class:`RoundLoop` drives a :class:`Transport`, which only delivers messages: in-process sites
(:class:`scinfl.federation.local.InProcess`) or Flower's Grid (:mod:`scinfl.federation.flower`). It knows
nothing of tasks beyond the run spec and nothing of keys beyond fingerprints. :func:`federate` is the
call every engine makes.

A round is one exchange: each site evaluates the weights it receives (the previous round's aggregate) and,
if sampled, trains on them; the loop averages the updates made under the run's key version (FedAvg
weighted by training cells), and completes the previous round's history rows with the evaluations. A
final exchange evaluates the last round's weights. The round whose weights have the lowest validation loss
(weighted by validation cells) is selected. Every round's randomness derives from the seed and the round
index, and the loop's state (:class:`LoopState`) is checkpointed after every round, so a resumed run ends
with the weights of an uninterrupted one.

Each stage of a round is one method of :class:`RoundLoop`, in the order a round runs them:
:meth:`~RoundLoop.rejoin`, :meth:`~RoundLoop.sample`, :meth:`~RoundLoop.train_clear` or
:meth:`~RoundLoop.train_secure` (each through :meth:`~RoundLoop.configure` and :meth:`~RoundLoop.send`),
:meth:`~RoundLoop.aggregate_evaluate` (the previous round's weights), :meth:`~RoundLoop.aggregate_train`,
:meth:`~RoundLoop.record_training` and :meth:`~RoundLoop.save_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._warnings import warn
from ..data import FederationSchema
from ..tasks import ModelConfig
from ..train import LocalFitResult, copy_state
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .fedavg import fedavg
from .secure import MaskedUpdate, SecureRound, run_digest, unmask_sum
from .site import Hello, Instruction, Reply, initial_weights
from .spec import RunSpec

# Below this many cells a site trains, with a warning: its local fit is one small batch, and its few
# validation cells say little when the loop selects the best round.
MIN_SITE_CELLS = 20

__all__ = [
    "FederationRun",
    "KeyVersionError",
    "LoopState",
    "RoundLoop",
    "RoundReplies",
    "SiteFailureError",
    "Transport",
    "aggregate",
    "federate",
    "sample_sites",
    "site_seed",
]

logger = logging.getLogger("scinfl")


class KeyVersionError(RuntimeError):
    """No update of a round was made under the federation's key version."""


class SiteFailureError(RuntimeError):
    """Fewer sites than the run's minimum connected or answered a round in time."""


class Transport(Protocol):
    """Delivers the round loop's messages to the sites and brings back their answers.

    ``remote`` says whether the sites are other processes (the loop then logs every round). A reply that
    did not come (deadline, error) is a string saying why; in-process sites raise instead. A transport
    whose sites can come back after dropping out (a restarted SuperNode) also has ``rejoin(spec,
    sites)``: the :class:`Hello` of each of those sites that is back, asked before every round.
    """

    remote: bool

    def connect(self, spec: RunSpec) -> dict[str, Hello | str]: ...

    def initial_state(self, site: str, spec: RunSpec, config: ModelConfig) -> dict[str, Tensor]: ...

    def exchange(
        self,
        round_index: int,
        state: Mapping[str, Tensor],
        spec: RunSpec,
        config: ModelConfig,
        instructions: Mapping[str, Instruction],
    ) -> dict[str, Reply | str]: ...


@dataclass
class FederationRun:
    """A finished run: selected and final weights, the per-round, per-site history, what was agreed."""

    best_state: dict[str, Tensor]
    final_state: dict[str, Tensor]
    best_round: int
    history: pd.DataFrame
    schema: FederationSchema
    config: ModelConfig
    sites: list[str]
    dropped: list[str]
    site_states: dict[str, dict]  # each site's last running state (e.g. its DP-SGD accounting)
    stopped_round: int | None = None  # the last round trained when early stopping ended the run


def site_seed(seed: int, round_index: int, site_index: int, attempt: int = 0) -> int:
    """An independent seed for one site's local fit in one round (and, when a secure round is retried,
    in each attempt: a retried site does not send the same update again)."""
    entropy = [seed, round_index, site_index] + ([attempt] if attempt else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


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


@dataclass
class LoopState:
    """What the server holds during a run: the round loop's whole state, and (but for the roster) what
    a checkpoint saves after every round."""

    state: dict[str, Tensor]  # the global weights the next round starts from
    best_state: dict[str, Tensor]
    rng: np.random.Generator  # samples the sites of each round
    hellos: dict[str, Hello]  # the roster: each site that joined, as it last said hello
    nodes: list[str]  # the sites still in the run, in the spec's order
    dropped: list[str] = field(default_factory=list)
    next_round: int = 1
    best_round: int = 0
    best_loss: float = math.inf
    improved_round: int = 0  # early stopping: the last evaluated round that improved reference_loss
    reference_loss: float = math.inf
    stopped_round: int | None = None
    rows: list[dict] = field(default_factory=list)  # the history: a row per site and evaluated round
    pending: dict[str, dict] = field(default_factory=dict)  # the last round's rows, awaiting evaluation
    site_states: dict[str, dict] = field(default_factory=dict)  # each site's last running state
    restore: dict[str, dict] = field(default_factory=dict)  # running states to hand back to sites

    _CHECKPOINTED = (
        "state",
        "best_state",
        "best_round",
        "best_loss",
        "rows",
        "pending",
        "improved_round",
        "reference_loss",
        "stopped_round",
    )

    def checkpoint(self, round_index: int, signature: str) -> dict[str, Any]:
        """The checkpoint after ``round_index``: what the server holds, each site's running state (a
        DP-SGD site's accountant, in-process) and the run's ``signature``. Never a key."""
        content = {name: getattr(self, name) for name in self._CHECKPOINTED}
        return content | {
            "round": round_index,
            "rng": self.rng.bit_generator.state,
            "sites": self.site_states,
            "signature": signature,
        }

    def restore_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Continue from ``checkpoint`` (:meth:`checkpoint`'s content)."""
        for name in self._CHECKPOINTED:
            if name in checkpoint:
                setattr(self, name, checkpoint[name])
        # (a checkpoint written before early stopping existed: its best round is the last improvement)
        self.improved_round = checkpoint.get("improved_round", self.best_round)
        self.reference_loss = checkpoint.get("reference_loss", self.best_loss)
        self.site_states = dict(checkpoint["sites"])
        self.restore = dict(checkpoint["sites"])
        self.rng.bit_generator.state = checkpoint["rng"]
        self.next_round = checkpoint["round"] + 1


@dataclass
class RoundReplies:
    """What one round brought back: every site's reply (its evaluation of the weights it received), the
    updates to aggregate, and the sites whose updates are left out for their key version."""

    replies: dict[str, Reply]
    updates: dict[str, LocalFitResult | MaskedUpdate]
    rejected: list[str] = field(default_factory=list)


def _interactive() -> bool:
    """Whether a progress bar has somewhere to draw: a notebook, or a terminal (not a log file)."""
    return "notebook" in tqdm.__module__ or sys.stderr.isatty()


def _all_finite(tensors) -> bool:
    """Whether every value of ``tensors`` is finite: their sum in float64 is, since NaN and infinities
    carry into it and float32 values cannot overflow it. ``isfinite().all()`` per tensor took 3.5 times as
    long, 1.7 ms per update of the default network (docs/benchmarks.md)."""
    sums = [t.sum(dtype=torch.float64) for t in tensors if t.is_floating_point()]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def _selection_loss(evaluations: Mapping[str, Mapping[str, float]]) -> float:
    """A round's validation loss: the sites' losses weighted by their validation cells."""
    n = sum(e.get("n", 0.0) for e in evaluations.values())
    if n == 0:
        return float("nan")
    return sum(e["loss"] * e["n"] for e in evaluations.values() if e.get("n", 0.0) > 0) / n


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted names (``spec.fit.lr``), to name what changed."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out |= _dotted(value, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = value
    return out


class RoundLoop:
    """One federated run of ``spec`` over ``transport``, a method per stage (see the module docstring).

    :meth:`run` is the whole run; the stages are public so that each can be read, tested and extended
    alone. ``checkpoint_dir`` and ``signature`` are :func:`federate`'s.
    """

    def __init__(
        self,
        transport: Transport,
        spec: RunSpec,
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        signature: Mapping[str, Any] | None = None,
    ) -> None:
        self.transport, self.spec, self.checkpoint_dir = transport, spec, checkpoint_dir
        self.extra_signature = dict(signature or {})
        self.level = logging.INFO if transport.remote else logging.DEBUG
        self.digest = run_digest(spec.to_json())  # what secure rounds' masks are bound to

    # ---- setting up ----
    def connect(self) -> dict[str, Hello]:
        """Say hello to every site, agree the schema and the network; the sites that joined."""
        spec = self.spec
        replies = self.transport.connect(spec)
        hellos: dict[str, Hello] = {}
        for site in spec.sites:
            reply = replies.get(site)
            if not isinstance(reply, Hello):
                logger.warning("Site %r did not join the run (%s).", site, reply or "it did not connect")
                continue
            hellos[site] = reply
            if reply.key_fingerprint != spec.key_fingerprint:
                logger.warning(
                    "Site %r holds key version %s, the run expects %s: its updates will be rejected.",
                    site,
                    reply.key_fingerprint or "none",
                    spec.key_fingerprint or "none",
                )
        missing = [s for s in spec.sites if s not in hellos]
        if len(hellos) < spec.required_sites:
            raise SiteFailureError(
                f"{len(hellos)} of the {len(spec.sites)} sites joined within {spec.connect_timeout:g} s "
                f"(missing: {', '.join(missing)}); the run needs at least {spec.required_sites}. Check that "
                "each site's flower-supernode runs and reaches the SuperLink, and the log lines above."
            )
        if missing:
            logger.warning("Sites %s did not connect; the run goes on without them.", ", ".join(missing))
        for site, hello in hellos.items():
            n_obs = hello.description.get("n_obs")
            if n_obs is not None and n_obs < MIN_SITE_CELLS:
                warn(
                    f"Site {site!r} has {n_obs} cells (fewer than {MIN_SITE_CELLS}): it trains on one small "
                    f"batch per round, its validation split ({spec.validation_fraction:.0%} of its cells per "
                    "label) holds at most a few cells, and the best round is chosen almost without it."
                )
        self.schema = spec.task.agree({site: h.description for site, h in hellos.items()}, join=spec.join)
        self.config = spec.model_config(self.schema)
        self.signature = json.loads(
            json.dumps(
                {
                    "spec": spec.signature(),
                    "schema": self.schema.to_dict(),
                    "n_obs": {site: hello.description.get("n_obs") for site, hello in hellos.items()},
                    **self.extra_signature,
                }
            )
        )
        return hellos

    def start(
        self, hellos: Mapping[str, Hello], initial_state: Mapping[str, Tensor] | None, resume: bool
    ) -> LoopState:
        """The state before the first round to run: the checkpoint's (``resume``), or fresh weights."""
        spec, config = self.spec, self.config
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0xFEDA]))
        nodes = list(hellos)
        if resume:
            return self.resume(LoopState({}, {}, rng, dict(hellos), nodes))
        if initial_state is not None:
            state = copy_state(initial_state)
        elif config.scheme == "hardened":  # only a key holder can draw it (see initial_weights)
            holder = next((s for s in nodes if hellos[s].key_fingerprint == spec.key_fingerprint), None)
            if holder is None:
                raise SiteFailureError(
                    "No site holds the run's key version to draw the hardened initial weights."
                )
            state = copy_state(self.transport.initial_state(holder, spec, config))
        else:
            state = initial_weights(config, spec.seed)
        return LoopState(state, state, rng, dict(hellos), nodes)

    def resume(self, fresh: LoopState) -> LoopState:
        """``fresh`` continued from the checkpoint in ``checkpoint_dir``, which must be this run's."""
        checkpoint = load_checkpoint(self.checkpoint_dir)
        previous, current = _dotted(json.loads(checkpoint["signature"])), _dotted(self.signature)
        changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
        if changed:
            raise ValueError(
                f"The checkpoint in {self.checkpoint_dir} was written by another run ({', '.join(changed[:8])} "
                "differ); resume with the same sites and settings, or start a new run in another directory."
            )
        if checkpoint["round"] > self.spec.rounds:
            raise ValueError(
                f"The checkpoint in {self.checkpoint_dir} is at round {checkpoint['round']}, past rounds="
                f"{self.spec.rounds}; pass rounds >= {checkpoint['round']}."
            )
        fresh.restore_checkpoint(checkpoint)
        logger.info(
            "Resuming from the checkpoint of round %d in %s.", checkpoint["round"], self.checkpoint_dir
        )
        return fresh

    # ---- the stages of a round ----
    def rejoin(self, loop: LoopState, round_index: int) -> None:
        """Take back dropped sites whose SuperNode is back, if they are the same site: the same key version
        and the same description (features, categories, cell counts). Their running state (a DP-SGD
        accountant) is handed back with their next instruction."""
        if not loop.dropped or not hasattr(self.transport, "rejoin"):
            return
        for site, hello in self.transport.rejoin(self.spec, list(loop.dropped)).items():
            before = loop.hellos[site]
            if hello.key_fingerprint != before.key_fingerprint or hello.description != before.description:
                logger.warning(
                    "Round %d: site %r is back but not as it joined (another key version or other data); "
                    "it stays out of the run.",
                    round_index,
                    site,
                )
                continue
            loop.hellos[site] = hello  # its new masking key, if any
            loop.dropped.remove(site)
            loop.nodes[:] = [s for s in self.spec.sites if s in loop.nodes or s == site]
            if site in loop.site_states:
                loop.restore[site] = loop.site_states[site]
            logger.warning("Round %d: site %r rejoined the run.", round_index, site)

    def sample(self, loop: LoopState) -> list[str]:
        """The sites that train this round."""
        return sample_sites(loop.nodes, self.spec.fraction, loop.rng)

    def configure(
        self,
        loop: LoopState,
        round_index: int,
        targets: list[str],
        cohort: list[str],
        evaluate: bool,
        attempt: int = 0,
        secure: SecureRound | None = None,
    ) -> dict[str, Instruction]:
        """What each of ``targets`` is asked: to evaluate the weights it receives, and (the ``cohort``) to
        train on them with its own fit seed, masked for ``secure``."""
        spec = self.spec
        return {
            site: Instruction(
                train=site in cohort,
                evaluate=evaluate,
                fit_seed=site_seed(spec.seed, round_index, spec.sites.index(site), attempt)
                if site in cohort
                else 0,
                restore=loop.restore.get(site),
                secure=secure if site in cohort else None,
                round_index=round_index,
            )
            for site in targets
        }

    def send(
        self, loop: LoopState, round_index: int, instructions: Mapping[str, Instruction]
    ) -> dict[str, Reply]:
        """Deliver ``instructions`` with the global weights; the replies that came. A site that did not
        answer is dropped; the run stops when fewer than its minimum of sites remain."""
        spec = self.spec
        replies = self.transport.exchange(round_index, loop.state, spec, self.config, instructions)
        loop.restore.clear()
        answered = {}
        for site in instructions:
            reply = replies.get(site)
            if isinstance(reply, Reply):
                answered[site] = reply
                loop.site_states[site] = reply.local_state
                continue
            logger.warning(
                "Round %d: site %r dropped from the run (%s).", round_index, site, reply or "no reply"
            )
            loop.nodes.remove(site)
            loop.dropped.append(site)
        if len(loop.nodes) < spec.required_sites:
            raise SiteFailureError(
                f"Round {round_index}: {len(loop.nodes)} site(s) answered within {spec.round_timeout:g} s "
                f"({', '.join(loop.nodes) or 'none'}; dropped: {', '.join(loop.dropped)}); the run needs at "
                f"least {spec.required_sites} (min-sites). Restart the missing sites and resume the run "
                "(resume=True, or run config resume=true)."
            )
        return answered

    def train_clear(self, loop: LoopState, round_index: int, chosen: list[str]) -> RoundReplies:
        """A round in the clear: every site evaluates, the chosen ones train and send their updates."""
        instructions = self.configure(loop, round_index, list(loop.nodes), chosen, round_index > 1)
        replies = self.send(loop, round_index, instructions)
        updates = {
            site: replies[site].update
            for site in self.spec.sites
            if site in replies and replies[site].update is not None
        }
        if not updates:
            raise SiteFailureError(
                f"Round {round_index}: none of the sampled sites ({', '.join(chosen)}) answered."
            )
        for site, update in updates.items():
            self.check_update(update, site, round_index)
        return RoundReplies(replies, updates)

    def train_secure(self, loop: LoopState, round_index: int, chosen: list[str]) -> RoundReplies:
        """A round under secure aggregation: the evaluations of every site's replies, the cohort's masked
        updates, and the sites left out for their key version.

        A masked update cannot be taken out of the sum afterwards, so the cohort holds only sites that
        said they hold the run's key version; if one of them fails or answers under another version, the
        round is retried with the others (new attempt: new masks and new local shuffles)."""
        spec = self.spec
        rejected = [s for s in chosen if loop.hellos[s].key_fingerprint != spec.key_fingerprint]
        for site in rejected:
            logger.warning(
                "Round %d: left site %r out of the sum: it holds key version %s instead of %s.",
                round_index,
                site,
                loop.hellos[site].key_fingerprint or "none",
                spec.key_fingerprint or "none",
            )
        cohort = [s for s in chosen if s not in rejected]
        evaluated: dict[str, Reply] = {}
        for attempt in range(len(chosen) + 1):
            if len(cohort) < spec.min_cohort:
                raise SiteFailureError(
                    f"Round {round_index}: {len(cohort)} site(s) can be summed ({', '.join(cohort) or 'none'}"
                    + (f"; left out for their key version: {', '.join(rejected)}" if rejected else "")
                    + f"), but secure aggregation sums at least min_cohort={spec.min_cohort} sites: a smaller "
                    "sum hides too little. Restart the missing sites (or give them the run's key version) "
                    "and resume the run."
                )
            keys = {s: loop.hellos[s].masking_key for s in cohort}
            signatures = {s: loop.hellos[s].masking_signature for s in cohort}
            secure = SecureRound(round_index, attempt, tuple(cohort), keys, self.digest, signatures)
            targets = list(loop.nodes) if attempt == 0 else cohort
            evaluate = round_index > 1 and attempt == 0
            instructions = self.configure(loop, round_index, targets, cohort, evaluate, attempt, secure)
            replies = self.send(loop, round_index, instructions)
            evaluated = evaluated or replies
            updates = {s: replies[s].update for s in cohort if s in replies}
            for site, update in updates.items():
                if isinstance(update, MaskedUpdate):
                    self.check_update(update, site, round_index)
            wrong = [
                s for s, u in updates.items() if u is not None and u.key_fingerprint != spec.key_fingerprint
            ]
            failed = [s for s in cohort if updates.get(s) is None] + wrong
            if not failed:
                return RoundReplies(evaluated, dict(updates), rejected)
            rejected += wrong
            cohort = [s for s in cohort if s not in failed]
            logger.warning(
                "Round %d: %s sent no usable masked update, so the others' masks cannot cancel; retrying "
                "the round with %s (attempt %d).",
                round_index,
                ", ".join(failed),
                ", ".join(cohort) or "no site",
                attempt + 1,
            )
        raise AssertionError("unreachable: every attempt removes a site from the cohort")

    def check_update(self, update: LocalFitResult | MaskedUpdate, site: str, round_index: int) -> None:
        """Stop the run, naming the site and the round, when an update's loss or weights are not finite:
        every later round would average NaN into the model. (A masked update's site checked its own.)"""
        loss = update.metrics.get("train_loss", 0.0)
        finite = update.finite if isinstance(update, MaskedUpdate) else True
        if finite and np.isfinite(loss) and _all_finite(update.state.values()):
            return
        raise FloatingPointError(
            f"Round {round_index}: site {site!r} trained to a non-finite "
            + (f"loss ({loss})" if not np.isfinite(loss) else "update")
            + ". Likely causes: values its task's likelihood cannot take (a count likelihood such as 'poisson' "
            "needs raw counts, non-negative integers), values of very different scales (log-normalise or "
            f"scale them), or too high a learning rate (lr={self.spec.fit.lr:g})."
        )

    def aggregate_evaluate(
        self, loop: LoopState, evaluated_round: int, replies: Mapping[str, Reply]
    ) -> float:
        """Complete the evaluated round's rows; keep its weights if they are the best so far, and note an
        improvement for early stopping; return the round's validation loss."""
        spec = self.spec
        evaluations = {
            site: reply.evaluation for site, reply in replies.items() if reply.evaluation is not None
        }
        for site in spec.sites:
            if site not in loop.pending:
                continue
            values = evaluations.get(site, {"n": 0.0})  # a site that left before evaluating
            loop.rows.append(
                loop.pending[site] | {f"val_{k}" if k != "n" else "n_val": v for k, v in values.items()}
            )
        loop.pending.clear()
        loss = _selection_loss(evaluations)
        if np.isnan(loss) or loss < loop.best_loss:
            loop.best_state, loop.best_round = loop.state, evaluated_round
            loop.best_loss = loss if not np.isnan(loss) else loop.best_loss
        # An improvement for early stopping: below the reference loss by min_delta of it (any finite loss
        # improves on none).
        reference = loop.reference_loss
        threshold = reference - spec.min_delta * abs(reference) if np.isfinite(reference) else np.inf
        if not np.isnan(loss) and loss < threshold:
            loop.improved_round, loop.reference_loss = evaluated_round, loss
        if not np.isnan(loss):
            logger.log(self.level, "Round %d: validation loss %.4f.", evaluated_round, loss)
        return loss

    def aggregate_train(self, loop: LoopState, round_index: int, result: RoundReplies) -> int:
        """The round's FedAvg into ``loop.state``; the number of updates averaged. In the clear, updates
        made under another key version are rejected here (``result.rejected``)."""
        if self.spec.secure_aggregation:
            loop.state = unmask_sum(list(result.updates.values()), base=loop.state)
            return len(result.updates)
        loop.state, result.rejected = aggregate(
            result.updates, self.spec.key_fingerprint, round_index, base=loop.state
        )
        return len(result.updates) - len(result.rejected)

    def record_training(
        self, loop: LoopState, round_index: int, chosen: list[str], result: RoundReplies
    ) -> None:
        """The round's history rows, completed when its weights are evaluated (next round)."""
        for site, reply in result.replies.items():
            update = result.updates.get(site)
            loop.pending[site] = {
                "round": round_index,
                "site": site,
                "sampled": site in chosen,
                "rejected": site in result.rejected,
                "n_train": reply.n_train,
                **(update.metrics if update else {}),  # what the site reports of its fit
            }

    def save_checkpoint(self, loop: LoopState, round_index: int) -> None:
        """Checkpoint the loop's state after ``round_index`` (atomically), if the run checkpoints."""
        if self.checkpoint_dir is not None:
            signature = json.dumps(self.signature, sort_keys=True)
            save_checkpoint(loop.checkpoint(round_index, signature), self.checkpoint_dir)

    # ---- the run ----
    def run_round(self, loop: LoopState, round_index: int) -> float:
        """One round, every stage in order; the validation loss of the previous round's weights (NaN in
        round 1). Sets ``loop.stopped_round`` when early stopping ends the run with this round."""
        spec = self.spec
        started = time.monotonic()
        self.rejoin(loop, round_index)
        chosen = self.sample(loop)
        train = self.train_secure if spec.secure_aggregation else self.train_clear
        result = train(loop, round_index, chosen)
        loss = float("nan")
        if round_index > 1:
            loss = self.aggregate_evaluate(loop, round_index - 1, result.replies)
            if spec.early_stopping and round_index - 1 - loop.improved_round >= spec.patience:
                loop.stopped_round = round_index  # this round's updates are in: aggregate them, then stop
        n_summed = self.aggregate_train(loop, round_index, result)
        self.record_training(loop, round_index, chosen, result)
        logger.log(
            self.level,
            "Round %d of %d: averaged %d update(s)%s%s (%.1f s).",
            round_index,
            spec.rounds,
            n_summed,
            " (secure aggregation)" if spec.secure_aggregation else "",
            f", rejected {', '.join(result.rejected)}" if result.rejected else "",
            time.monotonic() - started,
        )
        self.save_checkpoint(loop, round_index)
        if loop.stopped_round is not None:
            logger.info(
                "Stopping after round %d: the validation loss has not improved by %g (relative) since round "
                "%d (patience %d).",
                round_index,
                spec.min_delta,
                loop.improved_round,
                spec.patience,
            )
        return loss

    def finish(self, loop: LoopState) -> FederationRun:
        """Evaluate the last round's weights by a final exchange without training; the finished run."""
        last = self.spec.rounds if loop.stopped_round is None else loop.stopped_round
        final = self.send(loop, last + 1, self.configure(loop, last + 1, list(loop.nodes), [], True))
        self.aggregate_evaluate(loop, last, final)
        history = pd.DataFrame(loop.rows)
        history["n_val"] = history["n_val"].astype(int)
        return FederationRun(
            best_state=loop.best_state,
            final_state=loop.state,
            best_round=loop.best_round,
            history=history,
            schema=self.schema,
            config=self.config,
            sites=list(loop.hellos),
            dropped=loop.dropped,
            site_states=loop.site_states,
            stopped_round=loop.stopped_round,
        )

    def run(
        self,
        *,
        initial_state: Mapping[str, Tensor] | None = None,
        resume: bool = False,
        progress: bool = False,
    ) -> FederationRun:
        """The whole run: connect, start (or resume), every round, the final evaluation."""
        loop = self.start(self.connect(), initial_state, resume)
        rounds = range(
            loop.next_round, self.spec.rounds + 1 if loop.stopped_round is None else loop.next_round
        )
        bar = tqdm(
            rounds,
            desc="federated rounds",
            unit="round",
            disable=not (progress and _interactive()),
            leave=False,
            initial=loop.next_round - 1,
            total=self.spec.rounds,
        )
        for round_index in bar:
            loss = self.run_round(loop, round_index)
            if progress and not np.isnan(loss):
                bar.set_postfix(val_loss=f"{loss:.3f}")
            if loop.stopped_round is not None:
                bar.close()
                break
        return self.finish(loop)


def federate(
    transport: Transport,
    spec: RunSpec,
    *,
    initial_state: Mapping[str, Tensor] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = False,
    signature: Mapping[str, Any] | None = None,
) -> FederationRun:
    """Run ``spec``'s federation over ``transport`` (see the module docstring).

    Parameters
    ----------
    transport
        Delivers messages to the sites.
    spec
        The run.
    initial_state
        Starting weights (e.g. a trained model's, ``train_federated(init=...)``); default: drawn from the
        seed (:func:`~scinfl.federation.site.initial_weights`), by the first site for a hardened network.
    checkpoint_dir
        Checkpoint the loop's state (global and best weights, history, sampling generator, each site's
        running state) into this directory after every round, atomically. Never a key.
    resume
        Continue the run checkpointed in ``checkpoint_dir``; its signature must be this run's.
    progress
        Show a progress bar over rounds.
    signature
        What else a checkpoint must share with a run that resumes it (besides the spec, the schema and the
        sites' cell counts).
    """
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir=, the directory of the interrupted run.")
    if not resume and checkpoint_dir is not None and checkpoint_path(checkpoint_dir).exists():
        raise FileExistsError(
            f"{checkpoint_path(checkpoint_dir)} holds another run's checkpoint: pass resume=True to continue "
            "it, or choose another checkpoint directory."
        )
    loop = RoundLoop(transport, spec, checkpoint_dir=checkpoint_dir, signature=signature)
    return loop.run(initial_state=initial_state, resume=resume, progress=progress)
