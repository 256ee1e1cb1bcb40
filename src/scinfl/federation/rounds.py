"""The one round loop of every engine: connect, agree the schema, then sample, train, aggregate, select.

:func:`federate` drives a :class:`Transport`, which only delivers messages: in-process sites
(:class:`scinfl.federation.local.InProcess`) or Flower's Grid (:mod:`scinfl.federation.flower`). It knows
nothing of tasks beyond the run spec and nothing of keys beyond fingerprints.

A round is one exchange: each site evaluates the weights it receives (the previous round's aggregate) and,
if sampled, trains on them; the loop averages the updates made under the run's key version (FedAvg
weighted by training cells), and completes the previous round's history rows with the evaluations. A
final exchange evaluates the last round's weights. The round whose weights have the lowest validation loss
(weighted by validation cells) is selected. Every round's randomness derives from the seed and the round
index, and the loop's state is checkpointed after every round, so a resumed run ends with the weights of
an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
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
from .checkpoint import checkpoint_path, load_checkpoint, round_checkpoint, save_checkpoint
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


def _interactive() -> bool:
    """Whether a progress bar has somewhere to draw: a notebook, or a terminal (not a log file)."""
    return "notebook" in tqdm.__module__ or sys.stderr.isatty()


def _all_finite(tensors) -> bool:
    """Whether every value of ``tensors`` is finite: their sum in float64 is, since NaN and infinities
    carry into it and float32 values cannot overflow it. ``isfinite().all()`` per tensor took 3.5 times as
    long, 1.7 ms per update of the default network (docs/benchmarks.md)."""
    sums = [t.sum(dtype=torch.float64) for t in tensors if t.is_floating_point()]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def check_finite(update: LocalFitResult | MaskedUpdate, site: str, round_index: int, spec: RunSpec) -> None:
    """Stop the run, naming the site and the round, when an update's loss or weights are not finite: every
    later round would average NaN into the model. (A masked update's site checked its own.)"""
    loss = update.metrics.get("train_loss", 0.0)
    finite = update.finite if isinstance(update, MaskedUpdate) else True
    if finite and np.isfinite(loss) and _all_finite(update.state.values()):
        return
    raise FloatingPointError(
        f"Round {round_index}: site {site!r} trained to a non-finite "
        + (f"loss ({loss})" if not np.isfinite(loss) else "update")
        + ". Likely causes: values its task's likelihood cannot take (a count likelihood such as 'poisson' "
        "needs raw counts, non-negative integers), values of very different scales (log-normalise or "
        f"scale them), or too high a learning rate (lr={spec.fit.lr:g})."
    )


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


def _selection_loss(evaluations: Mapping[str, Mapping[str, float]]) -> float:
    n = sum(e.get("n", 0.0) for e in evaluations.values())
    if n == 0:
        return float("nan")
    return sum(e["loss"] * e["n"] for e in evaluations.values() if e.get("n", 0.0) > 0) / n


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted names (``spec.fit.lr``), to name what changed."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out |= _flatten(value, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = value
    return out


def _connect(transport: Transport, spec: RunSpec) -> dict[str, Hello]:
    replies = transport.connect(spec)
    connected: dict[str, Hello] = {}
    for site in spec.sites:
        reply = replies.get(site)
        if isinstance(reply, Hello):
            connected[site] = reply
            if reply.key_fingerprint != spec.key_fingerprint:
                logger.warning(
                    "Site %r holds key version %s, the run expects %s: its updates will be rejected.",
                    site,
                    reply.key_fingerprint or "none",
                    spec.key_fingerprint or "none",
                )
        else:
            logger.warning("Site %r did not join the run (%s).", site, reply or "it did not connect")
    missing = [s for s in spec.sites if s not in connected]
    if len(connected) < spec.required_sites:
        raise SiteFailureError(
            f"{len(connected)} of the {len(spec.sites)} sites joined within {spec.connect_timeout:g} s "
            f"(missing: {', '.join(missing)}); the run needs at least {spec.required_sites}. Check that "
            "each site's flower-supernode runs and reaches the SuperLink, and the log lines above."
        )
    if missing:
        logger.warning("Sites %s did not connect; the run goes on without them.", ", ".join(missing))
    return connected


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
    connected = _connect(transport, spec)
    for site, hello in connected.items():
        n_obs = hello.description.get("n_obs")
        if n_obs is not None and n_obs < MIN_SITE_CELLS:
            warn(
                f"Site {site!r} has {n_obs} cells (fewer than {MIN_SITE_CELLS}): it trains on one small "
                f"batch per round, its validation split ({spec.validation_fraction:.0%} of its cells per "
                "label) holds at most a few cells, and the best round is chosen almost without it."
            )
    schema = spec.task.agree({site: hello.description for site, hello in connected.items()}, join=spec.join)
    config = spec.model_config(schema)
    nodes = list(connected)  # the sites still in the run, in the spec's order
    run_signature = json.loads(
        json.dumps(
            {
                "spec": spec.signature(),
                "schema": schema.to_dict(),
                "n_obs": {site: hello.description.get("n_obs") for site, hello in connected.items()},
                **dict(signature or {}),
            }
        )
    )
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0xFEDA]))
    rows: list[dict] = []
    pending: dict[str, dict] = {}  # the last round's rows, waiting for the evaluation of its weights
    site_states: dict[str, dict] = {}
    restore: dict[str, dict] = {}
    best_round, best_loss = 0, float("inf")
    # Early stopping: the last evaluated round that improved the reference loss by min_delta, and that loss.
    improved_round, reference_loss = 0, float("inf")
    stopped_round: int | None = None
    first_round = 1
    if resume:
        checkpoint = load_checkpoint(checkpoint_dir)
        previous, current = _flatten(json.loads(checkpoint["signature"])), _flatten(run_signature)
        changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
        if changed:
            raise ValueError(
                f"The checkpoint in {checkpoint_dir} was written by another run ({', '.join(changed[:8])} "
                "differ); resume with the same sites and settings, or start a new run in another directory."
            )
        if checkpoint["round"] > spec.rounds:
            raise ValueError(
                f"The checkpoint in {checkpoint_dir} is at round {checkpoint['round']}, past rounds="
                f"{spec.rounds}; pass rounds >= {checkpoint['round']}."
            )
        state, best_state = checkpoint["state"], checkpoint["best_state"]
        best_round, best_loss = checkpoint["best_round"], checkpoint["best_loss"]
        # (a checkpoint written before early stopping existed: its best round is the last improvement)
        improved_round = checkpoint.get("improved_round", best_round)
        reference_loss = checkpoint.get("reference_loss", best_loss)
        stopped_round = checkpoint.get("stopped_round")
        rows, pending = checkpoint["rows"], checkpoint["pending"]
        restore = dict(checkpoint["sites"])
        site_states = dict(restore)
        rng.bit_generator.state = checkpoint["rng"]
        first_round = checkpoint["round"] + 1
        logger.info("Resuming from the checkpoint of round %d in %s.", checkpoint["round"], checkpoint_dir)
    elif initial_state is not None:
        state = copy_state(initial_state)
        best_state = state
    elif config.scheme == "hardened":  # only a key holder can draw it (see initial_weights)
        holder = next((s for s in nodes if connected[s].key_fingerprint == spec.key_fingerprint), None)
        if holder is None:
            raise SiteFailureError(
                "No site holds the run's key version to draw the hardened initial weights."
            )
        state = best_state = copy_state(transport.initial_state(holder, spec, config))
    else:
        state = best_state = initial_weights(config, spec.seed)
    dropped: list[str] = []
    level = logging.INFO if transport.remote else logging.DEBUG

    digest = run_digest(spec.to_json())

    def instructions(
        round_index: int,
        targets: list[str],
        cohort: list[str],
        evaluate: bool,
        attempt: int = 0,
        secure: SecureRound | None = None,
    ) -> dict[str, Instruction]:
        return {
            site: Instruction(
                train=site in cohort,
                evaluate=evaluate,
                fit_seed=site_seed(spec.seed, round_index, spec.sites.index(site), attempt)
                if site in cohort
                else 0,
                restore=restore.get(site),
                secure=secure if site in cohort else None,
            )
            for site in targets
        }

    def rejoin(round_index: int) -> None:
        """Take back dropped sites whose SuperNode is back, if they are the same site: the same key version
        and the same description (features, categories, cell counts). Their running state (a DP-SGD
        accountant) is handed back with their next instruction."""
        if not dropped or not hasattr(transport, "rejoin"):
            return
        for site, hello in transport.rejoin(spec, list(dropped)).items():
            before = connected[site]
            if hello.key_fingerprint != before.key_fingerprint or hello.description != before.description:
                logger.warning(
                    "Round %d: site %r is back but not as it joined (another key version or other data); "
                    "it stays out of the run.",
                    round_index,
                    site,
                )
                continue
            connected[site] = hello  # its new masking key, if any
            dropped.remove(site)
            nodes[:] = [s for s in spec.sites if s in nodes or s == site]
            if site in site_states:
                restore[site] = site_states[site]
            logger.warning("Round %d: site %r rejoined the run.", round_index, site)

    def send(round_index: int, targets: Mapping[str, Instruction]) -> dict[str, Reply]:
        replies = transport.exchange(round_index, state, spec, config, targets)
        restore.clear()
        answered = {}
        for site in targets:
            reply = replies.get(site)
            if isinstance(reply, Reply):
                answered[site] = reply
                site_states[site] = reply.local_state
                continue
            logger.warning(
                "Round %d: site %r dropped from the run (%s).", round_index, site, reply or "no reply"
            )
            nodes.remove(site)
            dropped.append(site)
        if len(nodes) < spec.required_sites:
            raise SiteFailureError(
                f"Round {round_index}: {len(nodes)} site(s) answered within {spec.round_timeout:g} s "
                f"({', '.join(nodes) or 'none'}; dropped: {', '.join(dropped)}); the run needs at least "
                f"{spec.required_sites} (min-sites). Restart the missing sites and resume the run "
                "(resume=True, or run config resume=true)."
            )
        return answered

    def secure_round(
        round_index: int, chosen: list[str]
    ) -> tuple[dict[str, Reply], dict[str, MaskedUpdate], list[str]]:
        """One round under secure aggregation: the evaluations of every site's replies, the cohort's
        masked updates, and the sites left out for their key version.

        A masked update cannot be taken out of the sum afterwards, so the cohort holds only sites that
        said they hold the run's key version; if one of them fails or answers under another version, the
        round is retried with the others (new attempt: new masks and new local shuffles)."""
        rejected = [s for s in chosen if connected[s].key_fingerprint != spec.key_fingerprint]
        for site in rejected:
            logger.warning(
                "Round %d: left site %r out of the sum: it holds key version %s instead of %s.",
                round_index,
                site,
                connected[site].key_fingerprint or "none",
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
            secure = SecureRound(
                round_index, attempt, tuple(cohort), {s: connected[s].masking_key for s in cohort}, digest
            )
            targets = list(nodes) if attempt == 0 else cohort
            replies = send(
                round_index,
                instructions(round_index, targets, cohort, round_index > 1 and attempt == 0, attempt, secure),
            )
            evaluated = evaluated or replies
            updates = {s: replies[s].update for s in cohort if s in replies}
            for site, update in updates.items():
                if isinstance(update, MaskedUpdate):
                    check_finite(update, site, round_index, spec)
            wrong = [s for s, u in updates.items() if u is None or u.key_fingerprint != spec.key_fingerprint]
            failed = [s for s in cohort if s not in updates] + wrong
            if not failed:
                return evaluated, updates, rejected
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

    def record_evaluation(evaluated_round: int, replies: Mapping[str, Reply]) -> float:
        """Complete the evaluated round's rows; keep its weights if they are the best so far; return the
        round's validation loss."""
        nonlocal best_state, best_round, best_loss, improved_round, reference_loss
        evaluations = {
            site: reply.evaluation for site, reply in replies.items() if reply.evaluation is not None
        }
        for site in spec.sites:
            if site not in pending:
                continue
            values = evaluations.get(site, {"n": 0.0})  # a site that left before evaluating
            rows.append(pending[site] | {f"val_{k}" if k != "n" else "n_val": v for k, v in values.items()})
        pending.clear()
        loss = _selection_loss(evaluations)
        if np.isnan(loss) or loss < best_loss:
            best_state, best_round = state, evaluated_round
            best_loss = loss if not np.isnan(loss) else best_loss
        # An improvement for early stopping: below the reference loss by min_delta of it (any finite loss
        # improves on none).
        threshold = (
            reference_loss - spec.min_delta * abs(reference_loss) if np.isfinite(reference_loss) else np.inf
        )
        if not np.isnan(loss) and loss < threshold:
            improved_round, reference_loss = evaluated_round, loss
        if not np.isnan(loss):
            logger.log(level, "Round %d: validation loss %.4f.", evaluated_round, loss)
        return loss

    bar = tqdm(
        range(first_round, spec.rounds + 1 if stopped_round is None else first_round),
        desc="federated rounds",
        unit="round",
        disable=not (progress and _interactive()),
        leave=False,
        initial=first_round - 1,
        total=spec.rounds,
    )
    for round_index in bar:
        started = time.monotonic()
        rejoin(round_index)
        chosen = sample_sites(nodes, spec.fraction, rng)
        if spec.secure_aggregation:
            replies, masked, rejected = secure_round(round_index, chosen)
            updates: dict[str, LocalFitResult | MaskedUpdate] = dict(masked)
        else:
            replies = send(round_index, instructions(round_index, list(nodes), chosen, round_index > 1))
            updates = {
                site: replies[site].update
                for site in spec.sites
                if site in replies and replies[site].update is not None
            }
            if not updates:
                raise SiteFailureError(
                    f"Round {round_index}: none of the sampled sites ({', '.join(chosen)}) answered."
                )
            for site, update in updates.items():
                check_finite(update, site, round_index, spec)
        if round_index > 1:
            loss = record_evaluation(round_index - 1, replies)
            if progress and not np.isnan(loss):
                bar.set_postfix(val_loss=f"{loss:.3f}")
            if spec.early_stopping and round_index - 1 - improved_round >= spec.patience:
                stopped_round = round_index  # this round's updates are in: aggregate them, then stop
        if spec.secure_aggregation:
            state = unmask_sum(list(masked.values()), base=state)
            n_summed = len(masked)
        else:
            state, rejected = aggregate(updates, spec.key_fingerprint, round_index, base=state)
            n_summed = len(updates) - len(rejected)
        for site, reply in replies.items():
            update = updates.get(site)
            pending[site] = {
                "round": round_index,
                "site": site,
                "sampled": site in chosen,
                "rejected": site in rejected,
                "n_train": reply.n_train,
                **(update.metrics if update else {}),  # what the site reports of its fit
            }
        logger.log(
            level,
            "Round %d of %d: averaged %d update(s)%s%s (%.1f s).",
            round_index,
            spec.rounds,
            n_summed,
            " (secure aggregation)" if spec.secure_aggregation else "",
            f", rejected {', '.join(rejected)}" if rejected else "",
            time.monotonic() - started,
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
                    pending=pending,
                    rng=rng,
                    sites=site_states,
                    signature=json.dumps(run_signature, sort_keys=True),
                    improved_round=improved_round,
                    reference_loss=reference_loss,
                    stopped_round=stopped_round,
                ),
                checkpoint_dir,
            )
        if stopped_round is not None:
            logger.info(
                "Stopping after round %d: the validation loss has not improved by %g (relative) since round "
                "%d (patience %d).",
                round_index,
                spec.min_delta,
                improved_round,
                spec.patience,
            )
            bar.close()
            break
    # The last round's weights are evaluated by a final exchange without training.
    last_round = spec.rounds if stopped_round is None else stopped_round
    record_evaluation(last_round, send(last_round + 1, instructions(last_round + 1, list(nodes), [], True)))
    history = pd.DataFrame(rows)
    history["n_val"] = history["n_val"].astype(int)
    return FederationRun(
        best_state=best_state,
        final_state=state,
        best_round=best_round,
        history=history,
        schema=schema,
        config=config,
        sites=list(connected),
        dropped=dropped,
        site_states=site_states,
        stopped_round=stopped_round,
    )
