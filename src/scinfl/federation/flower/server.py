"""scinfl's Flower ServerApp: the rounds of :func:`scinfl.federation.run_local`, driven over Flower.

The ServerApp never holds a key. It learns which SuperNode serves which site (a query that each site
answers with its name, its feature names and label categories, and its key's fingerprint), agrees the
schema from that metadata, then runs the rounds: sample sites, send the global weights, average the
updates made under the run's key version (FedAvg weighted by training cells, by
:func:`scinfl.federation.aggregate`) and log the rejected ones. Each site evaluates the weights it
receives before training on them, so a round's validation metrics arrive with the next round's updates
(and the last round's with a final evaluation exchange): one exchange per round instead of two.

Every exchange has a deadline. A site that misses one is dropped from the run; the run goes on while at
least ``min-sites`` sites answer, and otherwise stops with :class:`SiteFailureError`. The global model is
checkpointed after every round (written to a temporary file, then renamed), and ``resume=true``
continues from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anndata as ad
import numpy as np
import pandas as pd
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..._settings import settings as scinfl_settings
from ..._settings import torch_threads
from ...data import FederationSchema, SiteFields, build_schema
from ...train import FitSettings, LocalFitResult, ModelConfig, build_network, copy_state
from ..checkpoint import load_checkpoint, round_checkpoint, save_checkpoint
from ..engine import FederationResult, _selection_loss, aggregate, sample_sites, site_seed
from . import protocol
from .protocol import RunSettings

__all__ = ["FlowerRun", "SiteFailureError", "app", "load_checkpoint", "make_server_app", "run_server"]

logger = logging.getLogger("scinfl")

MODEL_DIR = "model"
_POLL_SECONDS = 0.05  # the ServerApp's own reply poll (Grid.send_and_receive sleeps 3 s between pulls)

K = TypeVar("K", bound=Hashable)


class SiteFailureError(RuntimeError):
    """Fewer sites than the run's minimum connected or answered a round in time."""


@dataclass
class FlowerRun:
    """A finished Flower run: the federation result, and the schema and architecture the sites agreed."""

    result: FederationResult
    schema: FederationSchema
    config: ModelConfig
    sites: list[str]
    dropped: list[str]


def exchange(grid: Grid, messages: Mapping[K, Message], timeout: float) -> dict[K, Message]:
    """Send ``messages`` and collect the replies that arrive within ``timeout`` seconds.

    Uses the Grid's public push and pull calls with a short poll, instead of ``send_and_receive``'s 3 s.
    """
    if not messages:
        return {}
    owners = list(messages)
    ids = list(grid.push_messages(messages.values()))
    pending = {message_id: owner for message_id, owner in zip(ids, owners, strict=True) if message_id}
    replies: dict[K, Message] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            owner = pending.pop(reply.metadata.reply_to_message_id, None)
            if owner is not None:
                replies[owner] = reply
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_SECONDS)
    return replies


def _failure(reply: Message | None) -> str | None:
    """Why a reply is unusable, or None."""
    if reply is None:
        return "no reply before the deadline"
    if reply.has_error():
        return f"error {reply.error.code}: {reply.error.reason}"
    return None


def _connect(grid: Grid, settings: RunSettings) -> dict[str, tuple[int, ConfigRecord]]:
    """Wait for the listed sites' SuperNodes; return site -> (node id, what the site published)."""
    instruction = ConfigRecord(
        {"label-key": settings.label_key, "layer": settings.layer, "use-raw": settings.use_raw}
    )
    deadline = time.monotonic() + settings.connect_timeout
    asked: set[int] = set()
    found: dict[str, tuple[int, ConfigRecord]] = {}
    while len(found) < len(settings.sites):
        new = [node for node in grid.get_node_ids() if node not in asked]
        asked.update(new)
        messages = {
            node: Message(
                RecordDict({protocol.INSTRUCTION: instruction}),
                dst_node_id=node,
                message_type=protocol.HELLO,
                ttl=settings.connect_timeout + settings.round_timeout,
            )
            for node in new
        }
        remaining = max(deadline - time.monotonic(), 1.0)
        replies = exchange(grid, messages, min(remaining, settings.round_timeout))
        for node in new:
            reply = replies.get(node)
            problem = _failure(reply)
            if problem is not None:
                logger.warning("SuperNode %d did not say which site it serves (%s).", node, problem)
                continue
            record = reply.content[protocol.SITE]
            site = str(record["site"])
            if site not in settings.sites:
                logger.warning(
                    "SuperNode %d serves site %r, which is not in the run's sites; left out.", node, site
                )
            elif site in found:
                logger.warning(
                    "Site %r is served by two SuperNodes (%d, %d); keeping the first.",
                    site,
                    found[site][0],
                    node,
                )
            else:
                found[site] = (node, record)
                if record["key-fingerprint"] != settings.key_fingerprint:
                    logger.warning(
                        "Site %r holds key version %s, the run expects %s: its updates will be rejected.",
                        site,
                        record["key-fingerprint"] or "none",
                        settings.key_fingerprint or "none",
                    )
        if time.monotonic() >= deadline:
            break
        if len(found) < len(settings.sites):
            time.sleep(0.2)
    missing = [s for s in settings.sites if s not in found]
    if len(found) < settings.required_sites:
        raise SiteFailureError(
            f"{len(found)} of the {len(settings.sites)} sites connected within "
            f"{settings.connect_timeout:g} s "
            f"(missing: {', '.join(missing)}); the run needs at least {settings.required_sites}. Check that "
            "each site's flower-supernode runs and reaches the SuperLink."
        )
    if missing:
        logger.warning("Sites %s did not connect; the run goes on without them.", ", ".join(missing))
    logger.info("Sites connected: %s.", ", ".join(s for s in settings.sites if s in found))
    return {site: found[site] for site in settings.sites if site in found}


def agree_schema(published: Mapping[str, ConfigRecord], settings: RunSettings) -> FederationSchema:
    """The federation schema from the sites' published metadata, by :func:`scinfl.data.build_schema`.

    Each site is stood in for by an empty AnnData that carries only its feature names and label
    categories, which is all ``build_schema`` reads.
    """
    label_key = settings.label_key or None
    stand_ins = {}
    for site, record in published.items():
        obs = pd.DataFrame(
            {label_key: pd.Categorical([], categories=list(record["categories"]))} if label_key else {},
            index=pd.Index([], dtype=str),
        )
        var = pd.DataFrame(index=pd.Index([str(v) for v in record["var-names"]]))
        stand_ins[site] = ad.AnnData(obs=obs, var=var)
    fields = dict.fromkeys(stand_ins, SiteFields(label_key=label_key))
    schema = build_schema(stand_ins, fields, join=settings.join)
    return dataclasses.replace(schema, layer=settings.layer or None, use_raw=settings.use_raw)


def model_config(settings: RunSettings, schema: FederationSchema) -> ModelConfig:
    """The architecture :func:`scinfl.tl.train_federated` builds for these settings."""
    return ModelConfig(
        task=settings.task,
        n_features=schema.n_features,
        n_classes=schema.n_classes,
        hidden=settings.hidden,
        dropout=settings.dropout,
        scheme=settings.scheme or None,
        key_strength=settings.key_strength,
    )


def _check_resumable(checkpoint: Mapping[str, Any], settings: RunSettings, schema, config) -> None:
    previous = RunSettings.from_run_config(json.loads(checkpoint["settings"]))
    same = ("sites", "key_fingerprint", "scheme", "seed", "fraction", "local_epochs", "batch_size", "lr")
    changed = [f for f in same if getattr(previous, f) != getattr(settings, f)]
    if changed or checkpoint["schema"] != schema.to_dict() or checkpoint["config"] != config.to_dict():
        raise ValueError(
            "The checkpoint was written by another run "
            f"({', '.join(changed) or 'schema or architecture'} differ); resume with the same settings."
        )


def run_server(
    grid: Grid,
    settings: RunSettings,
    *,
    config: ModelConfig | None = None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> FlowerRun:
    """Run the federation over ``grid``: connect the sites, agree the schema, train ``settings.rounds``.

    The same seed gives the same sampling, site seeds and initial weights as :func:`run_local`, so the
    same sites give the same model.

    Parameters
    ----------
    grid
        Flower's Grid (or anything with its ``get_node_ids``, ``push_messages``, ``pull_messages``).
    settings
        The run's settings.
    config, initial_state
        The architecture and the starting weights, when the caller has them (``train_federated`` in
        simulation, e.g. from ``init=``); by default the architecture follows ``settings`` and the
        weights are drawn from ``settings.seed`` as ``train_federated`` draws them.
    """
    output_dir = Path(settings.output_dir) if settings.output_dir else None
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
    connected = _connect(grid, settings)
    schema = agree_schema({site: record for site, (_, record) in connected.items()}, settings)
    if config is None:
        config = model_config(settings, schema)
    elif (config.n_features, config.n_classes) != (schema.n_features, schema.n_classes):
        raise ValueError(
            f"The given architecture has {config.n_features} features and {config.n_classes} classes; the "
            f"sites agreed {schema.n_features} and {schema.n_classes}."
        )
    nodes = {site: node for site, (node, _) in connected.items()}
    fit_settings = FitSettings(
        local_epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
    )
    shared = {
        "seed": settings.seed,
        "schema": json.dumps(schema.to_dict()),
        "model-config": json.dumps(config.to_dict()),
        "fit-settings": json.dumps(dataclasses.asdict(fit_settings)),
        "validation-fraction": settings.validation_fraction,
    }
    expected = settings.expected_fingerprint
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 0xFEDA]))  # as run_local
    rows: list[dict] = []
    pending: dict[str, dict] = {}  # this round's rows, waiting for the evaluation of its weights
    best_round, best_loss = 0, float("inf")
    first_round = 1
    if settings.resume:
        checkpoint = load_checkpoint(settings.output_dir)
        _check_resumable(checkpoint, settings, schema, config)
        state, best_state = checkpoint["state"], checkpoint["best_state"]
        best_round, best_loss = checkpoint["best_round"], checkpoint["best_loss"]
        rows, pending = checkpoint["rows"], checkpoint["pending"]
        rng.bit_generator.state = checkpoint["rng"]
        first_round = checkpoint["round"] + 1
        logger.info(
            "Resuming from the checkpoint of round %d in %s.", checkpoint["round"], settings.output_dir
        )
    elif initial_state is not None:
        state = copy_state(initial_state)
        best_state = state
    else:
        with torch_threads(scinfl_settings.torch_threads):
            torch.manual_seed(settings.seed)  # the initial weights train_federated draws
            state = copy_state(build_network(config).state_dict())
        best_state = state
    dropped: list[str] = []

    def send(round_index: int, chosen: list[str], evaluate: bool) -> dict[str, Message]:
        messages = {}
        for site in nodes:
            index = settings.sites.index(site)
            instruction = ConfigRecord(
                {
                    **shared,
                    "round": round_index,
                    "site": site,
                    "site-index": index,
                    "fit-seed": site_seed(settings.seed, round_index, index) if site in chosen else 0,
                    "train": site in chosen,
                    "evaluate": evaluate,
                }
            )
            content = RecordDict(
                {protocol.GLOBAL_WEIGHTS: protocol.state_to_arrays(state), protocol.INSTRUCTION: instruction}
            )
            messages[site] = Message(
                content,
                dst_node_id=nodes[site],
                message_type=protocol.TRAIN,
                group_id=str(round_index),
                ttl=settings.round_timeout + 60,
            )
        replies = exchange(grid, messages, settings.round_timeout)
        answered = {}
        for site in list(nodes):
            problem = _failure(replies.get(site))
            if problem is None:
                answered[site] = replies[site]
                continue
            logger.warning("Round %d: site %r dropped from the run (%s).", round_index, site, problem)
            del nodes[site]
            dropped.append(site)
        if len(answered) < settings.required_sites:
            raise SiteFailureError(
                f"Round {round_index}: {len(answered)} site(s) answered within {settings.round_timeout:g} s "
                f"({', '.join(answered) or 'none'}; dropped: {', '.join(dropped)}); the run needs at least "
                f"{settings.required_sites} (min-sites). Restart the missing SuperNodes and resume the run "
                "(run config resume=true)."
            )
        return answered

    def record_evaluation(evaluated_round: int, replies: Mapping[str, Message]) -> None:
        """Complete the evaluated round's rows; keep its weights if they are the best so far."""
        nonlocal best_state, best_round, best_loss
        evaluations = {}
        for site, reply in replies.items():
            metrics = reply.content[protocol.METRICS]
            evaluations[site] = {
                k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("evaluate/")
            }
        for site in settings.sites:
            if site not in pending:
                continue
            values = evaluations.get(site, {"n": 0.0})  # a site that left before evaluating
            rows.append(pending[site] | {f"val_{k}" if k != "n" else "n_val": v for k, v in values.items()})
        pending.clear()
        loss = _selection_loss(evaluations)  # the rule run_local applies
        if np.isnan(loss) or loss < best_loss:
            best_state, best_round = state, evaluated_round
            best_loss = loss if not np.isnan(loss) else best_loss
        if not np.isnan(loss):
            logger.info("Round %d: validation loss %.4f.", evaluated_round, loss)

    for round_index in range(first_round, settings.rounds + 1):
        started = time.monotonic()
        chosen = sample_sites(list(nodes), settings.fraction, rng)
        replies = send(round_index, chosen, evaluate=round_index > 1)
        if round_index > 1:
            record_evaluation(round_index - 1, replies)
        updates = {}
        for site in settings.sites:  # in the sites' order, as run_local averages them
            reply = replies.get(site)
            if reply is None or site not in chosen:
                continue
            metrics = reply.content[protocol.METRICS]
            updates[site] = LocalFitResult(
                state=protocol.arrays_to_state(reply.content[protocol.UPDATE]),
                n_obs=int(metrics["n-train"]),
                key_fingerprint=str(reply.content[protocol.SITE]["key-fingerprint"]) or None,
                metrics={k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("fit/")},
            )
        if not updates:
            raise SiteFailureError(
                f"Round {round_index}: none of the sampled sites ({', '.join(chosen)}) answered."
            )
        state, rejected = aggregate(updates, expected, round_index)
        for site, reply in replies.items():
            update = updates.get(site)
            pending[site] = {
                "round": round_index,
                "site": site,
                "sampled": update is not None,
                "rejected": site in rejected,
                "n_train": int(reply.content[protocol.METRICS]["n-train"]),
                **(update.metrics if update else {}),
            }
        logger.info(
            "Round %d of %d: averaged %d update(s)%s (%.1f s).",
            round_index,
            settings.rounds,
            len(updates) - len(rejected),
            f", rejected {', '.join(rejected)}" if rejected else "",
            time.monotonic() - started,
        )
        if output_dir is not None:
            save_checkpoint(
                round_checkpoint(
                    round_index,
                    state=state,
                    best_state=best_state,
                    best_round=best_round,
                    best_loss=best_loss,
                    rows=rows,
                    rng=rng,
                    pending=pending,
                    settings=json.dumps(settings.to_run_config()),
                    schema=schema.to_dict(),
                    config=config.to_dict(),
                ),
                output_dir,
            )
    # The last round's weights are evaluated by a final exchange without training.
    record_evaluation(settings.rounds, send(settings.rounds + 1, [], evaluate=True))
    history = pd.DataFrame(rows)
    history["n_val"] = history["n_val"].astype(int)
    result = FederationResult(
        best_state=best_state, final_state=state, best_round=best_round, history=history
    )
    return FlowerRun(result=result, schema=schema, config=config, sites=list(connected), dropped=dropped)


def save_model(run: FlowerRun, settings: RunSettings) -> Path:
    """Write the selected global model to ``<output-dir>/model`` (:meth:`scinfl.FederatedModel.save`)."""
    from ...model import FederatedModel

    network = build_network(run.config)
    network.load_state_dict(run.result.best_state)
    model = FederatedModel(
        network,
        run.config,
        run.schema,
        key_fingerprint=settings.expected_fingerprint,
        history=run.result.history,
        params={**settings.to_run_config(), "engine": "flower", "best_round": run.result.best_round},
    )
    return model.save(Path(settings.output_dir) / MODEL_DIR, overwrite=True)


def make_server_app(
    settings: RunSettings | None = None,
    on_result: Callable[[FlowerRun], None] | None = None,
    **run_options: Any,
) -> ServerApp:
    """A ServerApp that runs :func:`run_server`.

    Parameters
    ----------
    settings
        The run's settings; None reads them from the run config (``[tool.flwr.app.config]``).
    on_result
        Receives the finished run (the simulation hands it back to :func:`scinfl.tl.train_federated`);
        None writes the selected model to ``<output-dir>/model`` instead.
    **run_options
        Passed to :func:`run_server` (``config``, ``initial_state``).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_settings = settings or RunSettings.from_run_config(context.run_config)
        if on_result is None and not run_settings.output_dir:
            raise ValueError(
                "Set output-dir in the run config (an absolute path on the ServerApp's machine): the "
                "ServerApp writes its checkpoints and the trained model there."
            )
        run = run_server(grid, run_settings, **run_options)
        if on_result is not None:
            on_result(run)
        else:
            path = save_model(run, run_settings)
            logger.info("Selected round %d; model written to %s.", run.result.best_round, path)

    return server_app


app = make_server_app()
