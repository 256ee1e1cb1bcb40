"""scinfl's Flower ClientApp: one site's answers, by the same functions the in-process engine calls
(:mod:`scinfl.federation.site`).

A SuperNode names its site, its data file and its key file in its own ``--node-config``, with the site's
data fields (what :func:`scinfl.pp.register_site` records) where the file does not carry them::

    flower-supernode ... --node-config 'site="A" data-path="/data/A.h5ad" key-path="/secure/consortium.key"
                                        identity-path="/secure/A.identity" roster-path="/secure/roster.json"
                                        use-raw=true'

``identity-path`` is the site's identity key and ``roster-path`` the consortium's roster
(:mod:`scinfl.federation.identity`): with them the site signs its masking keys and refuses a cohort whose
keys its peers did not sign (a server's own keys) or whose members are not on its roster.

The key file is read here, at the site, and never leaves it: replies carry descriptions, weights, the
training cell count, metrics, DP accounting and the key's fingerprint. A site's running state (a DP-SGD
accountant) lives in the SuperNode's context for the run (``context.state``), whichever process serves
the next message. The import path is kept light on purpose (no scanpy, no plotting): in a deployment every
message starts a new ClientApp process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..._settings import settings, torch_threads
from ...data.sites import read_site_file
from ...key import FederationKey
from ...train import SiteTrainer
from ..identity import Roster, SiteIdentity, SiteRefusal, SiteSecrets
from ..secure import MaskingKey
from ..site import answer, build_site, hello, initial_weights, site_secrets
from ..statistics import answer_statistic, profile_of, statistics_secrets
from . import protocol

__all__ = ["SiteNode", "make_client_app"]

logger = logging.getLogger("scinfl")

NodeResolver = Callable[[Context], Mapping[str, Any]]

# Trainers kept per process, so that a ClientApp process serving several rounds (the simulation's Ray
# actors) reads its data and splits it once. A deployment's subprocess per message starts empty.
_TRAINERS: OrderedDict[tuple, SiteTrainer] = OrderedDict()
_MAX_TRAINERS = 8
_LOCAL_STATE = "scinfl-local-state"
_MASKING_KEY = "scinfl-masking-key"  # the site's masking key pair for the run (node-local, never sent)
_STATISTICS_KEY = "scinfl-statistics-key"  # its masking key pair for a statistics exchange
# Node-config keys of a site's data fields (the registration of scinfl.pp.register_site).
_REGISTRATION = {"label-key": "label_key", "layer": "layer", "use-raw": "use_raw", "modality": "modality"}


@dataclass(frozen=True)
class SiteNode:
    """What a SuperNode knows about its site, from its ``--node-config``: name, data and key files, and
    the data fields of its file (``label-key``, ``layer``, ``use-raw``, ``modality``) if given."""

    site: str
    data_path: Path
    key_path: Path | None
    registration: tuple[tuple[str, Any], ...] = field(default=())
    identity_path: Path | None = None
    roster_path: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteNode:
        missing = [k for k in ("site", "data-path") if not str(node_config.get(k, "")).strip()]
        if missing:
            raise ValueError(
                f"This SuperNode's --node-config lacks {', '.join(missing)}: start it with "
                '--node-config \'site="A" data-path="/data/A.h5ad" key-path="/secure/consortium.key"\'.'
            )
        key_path = str(node_config.get("key-path", "")).strip()
        identity_path = str(node_config.get("identity-path", "")).strip()
        roster_path = str(node_config.get("roster-path", "")).strip()
        registration = []
        for name, field_name in _REGISTRATION.items():
            value = node_config.get(name, "")
            if value == "":
                continue
            if field_name == "use_raw":
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            registration.append((field_name, value))
        return cls(
            site=str(node_config["site"]),
            data_path=Path(str(node_config["data-path"])).expanduser(),
            key_path=Path(key_path).expanduser() if key_path else None,
            registration=tuple(registration),
            identity_path=Path(identity_path).expanduser() if identity_path else None,
            roster_path=Path(roster_path).expanduser() if roster_path else None,
        )

    def read_data(self):
        """The site's data: an h5ad read backed (the matrix stays on disk, read batch by batch), or an
        h5mu (a multi-omics site), with the node config's data fields as its registration."""
        if not self.data_path.is_file():
            raise FileNotFoundError(f"Site {self.site!r}: no data file at {self.data_path}.")
        if self.data_path.suffix == ".h5mu":
            import mudata

            data = mudata.read_h5mu(self.data_path)
        else:
            data = read_site_file(self.data_path, self.site)
        if self.registration:
            entry = data.uns.get("scinfl", {})
            entry = dict(entry) if isinstance(entry, Mapping) else {}
            entry["registration"] = {
                **dict(entry.get("registration", {})),
                "site": self.site,
                **dict(self.registration),
            }
            data.uns["scinfl"] = entry
        return data

    def read_key(self) -> FederationKey | None:
        return None if self.key_path is None else FederationKey.load(self.key_path)

    def read_identity(self) -> tuple[SiteIdentity, Roster]:
        """The site's identity and the consortium's roster, which secure aggregation needs: without them
        the site cannot tell a peer's masking key from one the server made."""
        missing = [
            name
            for name, path in (("identity-path", self.identity_path), ("roster-path", self.roster_path))
            if path is None
        ]
        if missing:
            raise SiteRefusal(
                f"Site {self.site!r} cannot take part in secure aggregation: its --node-config lacks "
                f"{' and '.join(missing)} (its identity key and the consortium's roster; `scinfl identity "
                "create` and `scinfl roster create` make them, docs/across_sites.md)."
            )
        return SiteIdentity.load(self.identity_path), Roster.load(self.roster_path)

    def secrets(self, context: Context, slot: str, what: str) -> SiteSecrets:
        """The site's secrets for this run, kept in ``slot`` of its run context since its hello."""
        if slot not in context.state:
            raise SiteRefusal(
                f"Site {self.site!r} was asked for a masked {what} but drew no masking key in this run "
                "(its SuperNode restarted since the run began): resume the run to reconnect it."
            )
        record = context.state[slot]
        identity, roster = self.read_identity()
        masking_key = MaskingKey.from_bytes(bytes(record["private"]))
        answered = json.loads(str(record["answered"])) if "answered" in record else {}
        return SiteSecrets(self.site, masking_key, identity, roster, str(record["run"]), answered)


def answer_hello(message: Message, node: SiteNode, context: Context) -> Message:
    """Name the site and publish what the schema is agreed from, with the key's fingerprint and, for a
    run with secure aggregation, the public half of a masking key drawn for the run (the private half
    stays in this SuperNode's run context)."""
    spec, _ = protocol.read_run(message.content[protocol.SITE])
    data = node.read_data()  # a missing data file is the first thing to say
    secrets = None
    if spec.secure_aggregation:
        secrets = site_secrets(spec, node.site, *node.read_identity())
        context.state[_MASKING_KEY] = ConfigRecord(
            {"private": secrets.masking_key.to_bytes(), "run": secrets.run}
        )
    answer_ = hello(spec, data, node.site, node.read_key(), secrets)
    return Message(protocol.encode_hello(node.site, answer_), reply_to=message)


def answer_init(message: Message, node: SiteNode) -> Message:
    """The run's initial weights, drawn here where the key is (a hardened network's)."""
    spec, config = protocol.read_run(message.content[protocol.SITE])
    with torch_threads(settings.torch_threads):
        state = initial_weights(config, spec.seed, node.read_key())
    return Message(RecordDict({protocol.WEIGHTS: protocol.state_to_arrays(state)}), reply_to=message)


def _trainer(node: SiteNode, run: ConfigRecord, run_id: int) -> SiteTrainer:
    """This site's trainer for the run, built by :func:`~scinfl.federation.site.build_site` (cached)."""
    cache_key = (run_id, node, str(run["spec"]), str(run["config"]))
    if cache_key in _TRAINERS:
        _TRAINERS.move_to_end(cache_key)
        return _TRAINERS[cache_key]
    spec, config = protocol.read_run(run)
    trainer = build_site(spec, config, node.read_data(), node.site, node.read_key())
    _TRAINERS[cache_key] = trainer
    while len(_TRAINERS) > _MAX_TRAINERS:
        _TRAINERS.popitem(last=False)
    return _TRAINERS[cache_key]


def process_age() -> float | None:
    """Seconds since this process started (Linux's ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rpartition(")")[2].split()[19])
        with open("/proc/stat") as stat:
            boot = next(int(line.split()[1]) for line in stat if line.startswith("btime"))
        return time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def answer_train(message: Message, node: SiteNode, context: Context) -> Message:
    """Evaluate the received global weights (the previous round's), then train on them if asked.

    Evaluation rides in the training reply, so that a round is one exchange, not two. The site's log (its
    SuperNode's) gets one line per message with where the time went: the site's data and trainer, the
    answer (evaluation, training, masking), and how long after the process started the message reached
    scinfl (in a deployment, a process per message: its imports and Flower's own set-up).
    """
    age, started = process_age(), time.perf_counter()
    site, state, instruction = protocol.decode_instruction(message.content)
    if site != node.site:
        raise ValueError(f"This SuperNode serves site {node.site!r} but was addressed as {site!r}.")
    with torch_threads(settings.torch_threads):
        trainer = _trainer(node, message.content[protocol.SITE], context.run_id)
        ready = time.perf_counter()
        if instruction.restore is None and _LOCAL_STATE in context.state:
            # This run's state of the site, wherever the previous message was served.
            trainer.restore_local_state(json.loads(str(context.state[_LOCAL_STATE]["state"])))
        secrets = None if instruction.secure is None else node.secrets(context, _MASKING_KEY, "update")
        reply = answer(trainer, state, instruction, secrets)
    context.state[_LOCAL_STATE] = ConfigRecord({"state": json.dumps(reply.local_state)})
    done = time.perf_counter()
    logger.info(
        "Site %r: data and trainer %.2f s, answer %.2f s; the message reached scinfl %s s after this "
        "process started.",
        node.site,
        ready - started,
        done - ready,
        "?" if age is None else f"{age:.2f}",
    )
    return Message(protocol.encode_reply(node.site, reply), reply_to=message)


def answer_statistics(message: Message, node: SiteNode, context: Context) -> Message:
    """Federated preprocessing: publish the site's profile (and draw a masking key for the exchange), or
    compute one statistic over the site's data and send it, masked under secure aggregation. An error at
    the site (its data has NaN, is not counts, lacks the layer) is sent back as the reason, naming it."""
    try:
        spec, request, secure = protocol.decode_statistics_request(message.content)
        data = node.read_data()
        if request is None:
            secrets = None
            if spec.secure_aggregation:
                secrets = statistics_secrets(spec, node.site, *node.read_identity())
                record = {"private": secrets.masking_key.to_bytes(), "run": secrets.run}
                context.state[_STATISTICS_KEY] = ConfigRecord(record)
            content = protocol.encode_profile(node.site, profile_of(data, node.site, spec, secrets))
        else:
            secrets = None if secure is None else node.secrets(context, _STATISTICS_KEY, "statistic")
            vector = answer_statistic(data, node.site, spec, request, secure, secrets)
            if secrets is not None:  # the contexts it masked under, for every later message of the exchange
                context.state[_STATISTICS_KEY]["answered"] = json.dumps(secrets.answered)
            content = protocol.encode_statistic(node.site, vector)
    except Exception as error:  # the server knows only a node ID: name the site and the cause
        content = protocol.encode_failure(node.site, f"{type(error).__name__}: {error}")
    return Message(content, reply_to=message)


def _from_node_config(context: Context) -> Mapping[str, Any]:
    return context.node_config


def make_client_app(resolve_node: NodeResolver | None = None) -> ClientApp:
    """A ClientApp whose SuperNode's site comes from ``resolve_node(context)`` (default: its node config).

    The simulation passes a resolver that maps Flower's ``partition-id`` to a site's files, since
    simulated SuperNodes have no node config of their own.
    """
    resolve = resolve_node or _from_node_config
    client_app = ClientApp()

    @client_app.query()
    def query(message: Message, context: Context) -> Message:
        node_config = resolve(context)
        try:
            return answer_hello(message, SiteNode.from_node_config(node_config), context)
        except Exception as error:  # name the site and the cause: the server knows only a node ID
            site = str(node_config.get("site", "")) or "(no site in --node-config)"
            reason = f"{type(error).__name__}: {error}"
            return Message(protocol.encode_failure(site, reason), reply_to=message)

    @client_app.query("init")
    def init(message: Message, context: Context) -> Message:
        return answer_init(message, SiteNode.from_node_config(resolve(context)))

    @client_app.query("statistics")
    def statistics(message: Message, context: Context) -> Message:
        return answer_statistics(message, SiteNode.from_node_config(resolve(context)), context)

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        return answer_train(message, SiteNode.from_node_config(resolve(context)), context)

    return client_app
