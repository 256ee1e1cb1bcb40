"""scinfl's Flower ServerApp: :func:`scinfl.federation.federate` over Flower's Grid.

The ServerApp never holds a key. Its :class:`GridTransport` delivers the round loop's messages: a first
query that each SuperNode answers with its site's name, description and key fingerprint; for a hardened
run, a query to one site for the initial weights (only a key holder can draw them); then one train message
per site and round. Every exchange has a deadline (the run spec's ``round_timeout``): a site that misses
it or answers with an error is dropped, and the loop goes on while at least ``min_sites`` answer.

The run config is the run spec (:meth:`scinfl.federation.RunSpec.to_run_config`) plus ``output-dir``
(where the checkpoint and the model are written) and ``resume``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from ..._settings import settings as scinfl_settings
from ..._settings import torch_threads
from ...data.statistics import StatisticRequest
from ...tasks import ModelConfig
from ..preprocessing import run_recipe
from ..rounds import FederationRun, federate
from ..secure import SecureRound
from ..site import Hello, Instruction, Reply
from ..spec import RunSpec
from ..statistics import SiteProfile, StatisticsExchange, StatisticsSpec
from . import protocol

__all__ = ["GridTransport", "make_server_app", "run_preprocessing", "server_options"]

logger = logging.getLogger("scinfl")

_POLL_SECONDS = 0.05  # the ServerApp's own reply poll (Grid.send_and_receive sleeps 3 s between pulls)
# Run-config keys of a federated preprocessing run (scinfl.pp on a deployment), instead of a run spec
PREPROCESS_KEYS = ("preprocess", "preprocess-options", "preprocess-spec")
# run-config keys of the ServerApp itself, beside the run spec
SERVER_KEYS = ("output-dir", "resume", *PREPROCESS_KEYS)

K = TypeVar("K", bound=Hashable)


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


class GridTransport:
    """The round loop's messages over Flower's Grid (:class:`~scinfl.federation.Transport`), and federated
    preprocessing's (:class:`~scinfl.federation.statistics.StatisticsTransport`)."""

    remote = True

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.nodes: dict[str, int] = {}  # site -> node id
        self.asked: set[int] = set()  # every node asked which site it serves
        # The node of each dropped site -> (that site, the id of the question waiting for the node; None:
        # none pushed). An authenticated SuperNode keeps its node id when it restarts, so a dropped site's
        # own node is asked again; without waiting, as it may be dead yet listed (for up to two heartbeats).
        self.dropped: dict[int, tuple[str, str | None]] = {}

    def connect(self, spec: RunSpec) -> dict[str, Hello | str]:
        """Ask every SuperNode which site it serves until the spec's sites answered or time is up."""
        run = protocol.run_record(spec)
        deadline = time.monotonic() + spec.connect_timeout
        found: dict[str, Hello | str] = {}
        while len(self.nodes) < len(spec.sites):
            remaining = max(deadline - time.monotonic(), 1.0)
            for site, hello in self._hello(spec, run, min(remaining, spec.round_timeout)).items():
                if isinstance(hello, Hello) or site not in found:  # a site that came back wins
                    found[site] = hello
            if time.monotonic() >= deadline:
                break
            if len(self.nodes) < len(spec.sites):
                time.sleep(0.2)
        return found

    def rejoin(self, spec: RunSpec, sites: list[str]) -> dict[str, Hello]:
        """The :class:`Hello` of each of ``sites`` (dropped ones) that is back: from SuperNodes that appeared
        since (one restarted without authentication registers anew), asked and awaited, and from the
        dropped sites' own nodes (a restarted authenticated one keeps its id), asked without waiting and
        read at the next call. Waits only when a node appeared."""
        for site in sites:
            node = self.nodes.pop(site, None)
            if node is not None:
                self.dropped.setdefault(node, (site, None))
        run = protocol.run_record(spec)
        found = self._hello(spec, run, min(spec.round_timeout, 60.0))
        for site, hello in self._ask_dropped_nodes(spec, run).items():
            if isinstance(hello, Hello) or site not in found:
                found[site] = hello
        return {site: hello for site, hello in found.items() if site in sites and isinstance(hello, Hello)}

    def _ask_dropped_nodes(self, spec: RunSpec, run) -> dict[str, Hello | str]:
        """Read the answers to earlier questions to dropped sites' nodes; ask those listed and not asked."""
        found: dict[str, Hello | str] = {}
        waiting = {message_id: node for node, (_, message_id) in self.dropped.items() if message_id}
        for reply in self.grid.pull_messages(list(waiting)) if waiting else []:
            node = waiting.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            self._record(node, reply, spec, found)
            self.dropped[node] = (self.dropped[node][0], None)  # unless it is back: ask again while listed
        # forget the nodes of sites that are back (also through a new node)
        self.dropped = {node: entry for node, entry in self.dropped.items() if entry[0] not in self.nodes}
        listed = set(self.grid.get_node_ids())
        ask = [
            node for node, (_, message_id) in self.dropped.items() if message_id is None and node in listed
        ]
        if ask:
            messages = [self._hello_message(spec, run, node) for node in ask]
            for node, message_id in zip(ask, self.grid.push_messages(messages), strict=True):
                self.dropped[node] = (self.dropped[node][0], message_id or None)
        return found

    def _hello_message(self, spec: RunSpec, run, node: int) -> Message:
        return Message(
            RecordDict({protocol.SITE: run}),
            dst_node_id=node,
            message_type=protocol.HELLO,
            ttl=spec.connect_timeout + spec.round_timeout,
        )

    def _hello(self, spec: RunSpec, run, timeout: float) -> dict[str, Hello | str]:
        """Ask the SuperNodes not asked yet which site they serve; record the new ones' nodes."""
        new = [node for node in self.grid.get_node_ids() if node not in self.asked]
        self.asked.update(new)
        found: dict[str, Hello | str] = {}
        if new:
            replies = exchange(
                self.grid, {node: self._hello_message(spec, run, node) for node in new}, timeout
            )
            for node in new:
                self._record(node, replies.get(node), spec, found)
        return found

    def _record(self, node: int, reply: Message | None, spec: RunSpec, found: dict) -> None:
        """Read a SuperNode's answer: which site it serves, and whether that site can join (into ``found``);
        map the site to the node."""
        problem = _failure(reply)
        if problem is not None:
            logger.warning("SuperNode %d did not say which site it serves (%s).", node, problem)
            return
        site, hello = protocol.decode_hello(reply.content)
        if isinstance(hello, str):  # the SuperNode named its site, which cannot join
            logger.warning("Site %r (SuperNode %d) cannot join the run: %s", site, node, hello)
            if site in spec.sites:
                found.setdefault(site, hello)
        elif site not in spec.sites:
            logger.warning(
                "SuperNode %d serves site %r, which is not in the run's sites; left out.", node, site
            )
        elif site in self.nodes:
            logger.warning(
                "Site %r is served by two SuperNodes (%d, %d); keeping the first.",
                site,
                self.nodes[site],
                node,
            )
        else:
            self.nodes[site] = node
            found[site] = hello

    def initial_state(self, site: str, spec: RunSpec, config: ModelConfig) -> dict[str, Tensor]:
        message = Message(
            RecordDict({protocol.SITE: protocol.run_record(spec, config)}),
            dst_node_id=self.nodes[site],
            message_type=protocol.INIT,
            ttl=spec.round_timeout + 60,
        )
        reply = exchange(self.grid, {site: message}, spec.round_timeout).get(site)
        problem = _failure(reply)
        if problem is not None:
            raise RuntimeError(f"Site {site!r} did not send the initial weights ({problem}).")
        return protocol.arrays_to_state(reply.content[protocol.WEIGHTS])

    def exchange(
        self,
        round_index: int,
        state: Mapping[str, Tensor],
        spec: RunSpec,
        config: ModelConfig,
        instructions: Mapping[str, Instruction],
    ) -> dict[str, Reply | str]:
        run = protocol.run_record(spec, config)
        messages = {
            site: Message(
                protocol.encode_instruction(site, state, run, instruction),
                dst_node_id=self.nodes[site],
                message_type=protocol.TRAIN,
                group_id=str(round_index),
                ttl=spec.round_timeout + 60,
            )
            for site, instruction in instructions.items()
        }
        replies = exchange(self.grid, messages, spec.round_timeout)
        out: dict[str, Reply | str] = {}
        for site in instructions:
            problem = _failure(replies.get(site))
            out[site] = problem if problem is not None else protocol.decode_reply(replies[site].content)
        return out

    def profiles(self, spec: StatisticsSpec) -> dict[str, SiteProfile | str]:
        """Ask every SuperNode for its site's profile until the spec's sites answered or time is up."""
        deadline = time.monotonic() + spec.timeout
        found: dict[str, SiteProfile | str] = {}
        while True:
            new = [node for node in self.grid.get_node_ids() if node not in self.asked]
            self.asked.update(new)
            messages = {
                node: Message(
                    protocol.encode_statistics_request(spec, None, None),
                    dst_node_id=node,
                    message_type=protocol.STATISTICS,
                    ttl=spec.timeout,
                )
                for node in new
            }
            replies = exchange(self.grid, messages, max(deadline - time.monotonic(), 1.0))
            for node in new:
                problem = _failure(replies.get(node))
                if problem is not None:
                    logger.warning("SuperNode %d did not say which site it serves (%s).", node, problem)
                    continue
                site, profile = protocol.decode_profile(replies[node].content)
                if site not in spec.sites:
                    logger.warning(
                        "SuperNode %d serves site %r, which is not in the exchange; left out.", node, site
                    )
                elif isinstance(profile, SiteProfile) and site not in self.nodes:
                    self.nodes[site] = node
                    found[site] = profile
                else:
                    found.setdefault(
                        site, profile if isinstance(profile, str) else "served by two SuperNodes"
                    )
            # every site answered (a site that cannot take part says why: no use waiting for it)
            if all(site in found for site in spec.sites) or time.monotonic() >= deadline:
                return found
            time.sleep(0.2)

    def statistics(
        self, spec: StatisticsSpec, request: StatisticRequest, secure: SecureRound | None
    ) -> dict[str, np.ndarray | str]:
        messages = {
            site: Message(
                protocol.encode_statistics_request(spec, request, secure),
                dst_node_id=self.nodes[site],
                message_type=protocol.STATISTICS,
                ttl=spec.timeout,
            )
            for site in spec.sites
        }
        replies = exchange(self.grid, messages, spec.timeout)
        out: dict[str, np.ndarray | str] = {}
        for site in spec.sites:
            problem = _failure(replies.get(site))
            out[site] = problem if problem is not None else protocol.decode_statistic(replies[site].content)
        return out


def server_options(run_config: Mapping[str, Any]) -> tuple[RunSpec, dict[str, Any]]:
    """The run spec and the ServerApp's own options (``output-dir``, ``resume``) of a run config."""
    spec = RunSpec.from_run_config({k: v for k, v in run_config.items() if k not in SERVER_KEYS})
    resume = run_config.get("resume", False)
    options = {
        "output_dir": str(run_config.get("output-dir", "")),
        "resume": resume if isinstance(resume, bool) else str(resume).lower() in ("1", "true", "yes"),
    }
    return spec, options


def run_preprocessing(grid: Grid, run_config: Mapping[str, Any]) -> Path:
    """A federated preprocessing step on a deployment: the recipe ``preprocess`` names
    (:mod:`scinfl.federation.preprocessing`) with ``preprocess-options``, over the sites of
    ``preprocess-spec`` (:class:`~scinfl.federation.statistics.StatisticsSpec`), through the Grid. The
    result is written to ``<output-dir>/<step>.npz`` for the sites to apply
    (:func:`scinfl.pp.apply_preprocessing`). Build the run config with
    :func:`scinfl.federation.flower.run_config.preprocessing_run_config`."""
    step = str(run_config["preprocess"])
    output_dir = str(run_config.get("output-dir", ""))
    if not output_dir:
        raise ValueError(
            "Set output-dir in the run config: the ServerApp writes the preprocessing result there."
        )
    spec = StatisticsSpec.from_dict(json.loads(str(run_config["preprocess-spec"])))
    options = json.loads(str(run_config.get("preprocess-options", "") or "{}"))
    with torch_threads(scinfl_settings.torch_threads):
        result = run_recipe(StatisticsExchange(GridTransport(grid), spec), step, options)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    path = result.save(Path(output_dir) / f"{step}.npz")
    logger.info("Preprocessing step %s over %d sites written to %s.", step, len(spec.sites), path)
    return path


def make_server_app(
    on_result: Callable[[FederationRun, RunSpec, str | None], None],
    spec: RunSpec | None = None,
    **federate_options: Any,
) -> ServerApp:
    """A ServerApp that runs :func:`~scinfl.federation.federate` over the Grid.

    Parameters
    ----------
    on_result
        Receives the finished run, its spec and the output directory: the simulation hands the run back to
        :func:`scinfl.tl.train_federated`; the deployable app (:mod:`scinfl.flower_apps`) saves the model.
    spec
        The run; None reads it, with ``output-dir`` (required) and ``resume``, from the run config
        (``[tool.flwr.app.config]``).
    **federate_options
        Passed to :func:`~scinfl.federation.federate` (``initial_state``, ``signature``, and with ``spec``
        ``checkpoint_dir`` and ``resume``).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if spec is None and str(context.run_config.get("preprocess", "")):
            run_preprocessing(grid, context.run_config)  # scinfl.pp's statistics rounds, not training
            return
        if spec is not None:
            run_spec, output_dir, options = spec, None, dict(federate_options)
        else:
            run_spec, server = server_options(context.run_config)
            output_dir = server["output_dir"]
            if not output_dir:
                raise ValueError(
                    "Set output-dir in the run config (an absolute path on the ServerApp's machine): the "
                    "ServerApp writes its checkpoints and the trained model there."
                )
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            options = {"checkpoint_dir": output_dir, "resume": server["resume"], **federate_options}
        with torch_threads(scinfl_settings.torch_threads):
            run = federate(GridTransport(grid), run_spec, **options)
        on_result(run, run_spec, output_dir)

    return server_app
