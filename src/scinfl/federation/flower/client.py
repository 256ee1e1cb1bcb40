"""scinfl's Flower ClientApp: one site's local fit, by the same :class:`~scinfl.train.SiteTrainer` the
in-process engine calls.

A SuperNode names its site in its own ``--node-config``::

    flower-supernode ... --node-config 'site="A" data-path="/data/A.h5ad" key-path="/secure/consortium.key"'

The key file is read here, at the site, and never leaves it: replies carry the weights, the training cell
count, metrics and the key's fingerprint. The import path is kept light on purpose (no scanpy, no
plotting): in a deployment every message starts a new ClientApp process.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..._settings import settings, torch_threads
from ...data import AlignedMatrix, FederationSchema, check_finite, feature_source, label_codes, site_fields
from ...data.schema import _site_categories
from ...key import FederationKey
from ...train import FitSettings, ModelConfig, SiteTrainer, build_network, site_datasets
from . import protocol

__all__ = ["SiteNode", "app", "make_client_app"]

logger = logging.getLogger("scinfl")

NodeResolver = Callable[[Context], Mapping[str, Any]]

# Trainers kept per process, so that a ClientApp process serving several rounds (the simulation's Ray
# actors) reads its data and splits it once. A deployment's subprocess per message starts empty.
_TRAINERS: OrderedDict[tuple, tuple[SiteTrainer, str]] = OrderedDict()
_MAX_TRAINERS = 8


@dataclass(frozen=True)
class SiteNode:
    """What a SuperNode knows about its site, from its ``--node-config``: name, data and key file."""

    site: str
    data_path: Path
    key_path: Path | None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteNode:
        missing = [k for k in ("site", "data-path") if not str(node_config.get(k, "")).strip()]
        if missing:
            raise ValueError(
                f"This SuperNode's --node-config lacks {', '.join(missing)}: start it with "
                '--node-config \'site="A" data-path="/data/A.h5ad" key-path="/secure/consortium.key"\'.'
            )
        key_path = str(node_config.get("key-path", "")).strip()
        return cls(
            site=str(node_config["site"]),
            data_path=Path(str(node_config["data-path"])).expanduser(),
            key_path=Path(key_path).expanduser() if key_path else None,
        )

    def read_data(self) -> ad.AnnData:
        if not self.data_path.is_file():
            raise FileNotFoundError(f"Site {self.site!r}: no data file at {self.data_path}.")
        # Backed: the matrix stays on disk, read batch by batch (scinfl.data.AlignedMatrix); answering the
        # server's hello needs only names.
        return ad.read_h5ad(self.data_path, backed="r")

    def read_key(self) -> FederationKey | None:
        return None if self.key_path is None else FederationKey.load(self.key_path)


def answer_hello(message: Message, node: SiteNode) -> Message:
    """Name the site and publish its metadata: feature names, label categories, key fingerprint."""
    instruction = message.content[protocol.INSTRUCTION]
    adata = node.read_data()
    fields = site_fields(
        adata,
        node.site,
        label_key=str(instruction["label-key"]) or None,
        layer=str(instruction["layer"]) or None,
        use_raw=bool(instruction["use-raw"]),
    )
    key = node.read_key()
    categories = _site_categories(adata, node.site, fields.label_key) if fields.label_key else []
    reply = ConfigRecord(
        {
            "site": node.site,
            "key-fingerprint": "" if key is None else key.fingerprint,
            "var-names": [str(v) for v in feature_source(adata, fields)[1]],
            "categories": categories,
            "n-obs": int(adata.n_obs),
        }
    )
    return Message(RecordDict({protocol.SITE: reply}), reply_to=message)


def _trainer(node: SiteNode, instruction: ConfigRecord, run_id: int) -> tuple[SiteTrainer, str]:
    """This site's trainer for the run, built as :func:`scinfl.tl.train_federated` builds it, and its
    key's fingerprint (``""`` without a key)."""
    cache_key = (
        run_id,
        node,
        *(instruction[k] for k in ("schema", "model-config", "fit-settings", "validation-fraction")),
        int(instruction["seed"]),
        int(instruction["site-index"]),
    )
    if cache_key in _TRAINERS:
        _TRAINERS.move_to_end(cache_key)
        return _TRAINERS[cache_key]
    schema = FederationSchema.from_dict(json.loads(str(instruction["schema"])))
    config = ModelConfig.from_dict(json.loads(str(instruction["model-config"])))
    fit_settings = FitSettings(**json.loads(str(instruction["fit-settings"])))
    adata = node.read_data()
    fields = site_fields(
        adata, node.site, label_key=schema.label_key, layer=schema.layer, use_raw=schema.use_raw
    )
    check_finite(feature_source(adata, fields)[0], node.site)
    matrix = AlignedMatrix.from_adata(adata, schema, fields)
    labels = label_codes(adata, schema, node.site)
    # The same split seed as train_federated gives the site at this index: same seed, same split.
    rng = np.random.default_rng(
        np.random.SeedSequence([int(instruction["seed"]), 0x5EED, int(instruction["site-index"])])
    )
    train, validation = site_datasets(matrix, labels, float(instruction["validation-fraction"]), rng)
    key = node.read_key()
    trainer = SiteTrainer(node.site, train, validation, build_network(config), config, key, fit_settings)
    _TRAINERS[cache_key] = (trainer, "" if key is None else key.fingerprint)
    while len(_TRAINERS) > _MAX_TRAINERS:
        _TRAINERS.popitem(last=False)
    return _TRAINERS[cache_key]


def answer_train(message: Message, node: SiteNode, run_id: int) -> Message:
    """Evaluate the received global weights (the previous round's), then train on them if asked.

    Evaluation rides in the training reply, so that a round is one exchange, not two.
    """
    instruction = message.content[protocol.INSTRUCTION]
    if str(instruction["site"]) != node.site:
        raise ValueError(
            f"This SuperNode serves site {node.site!r} but was addressed as {instruction['site']!r}."
        )
    global_state = protocol.arrays_to_state(message.content[protocol.GLOBAL_WEIGHTS])
    trainer, fingerprint = _trainer(node, instruction, run_id)
    metrics: dict[str, float | int] = {"n-train": trainer.n_train, "num-examples": trainer.n_train}
    content = RecordDict()
    with torch_threads(settings.torch_threads):
        if bool(instruction["evaluate"]):
            metrics |= {f"evaluate/{k}": float(v) for k, v in trainer.evaluate(global_state).items()}
        if bool(instruction["train"]):
            update = trainer.fit(global_state, seed=int(instruction["fit-seed"]))
            fingerprint = update.key_fingerprint or ""
            metrics |= {f"fit/{k}": float(v) for k, v in update.metrics.items()}
            content[protocol.UPDATE] = protocol.state_to_arrays(update.state)
    content[protocol.SITE] = ConfigRecord({"site": node.site, "key-fingerprint": fingerprint})
    content[protocol.METRICS] = MetricRecord(metrics)
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
    def hello(message: Message, context: Context) -> Message:
        return answer_hello(message, SiteNode.from_node_config(resolve(context)))

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        return answer_train(message, SiteNode.from_node_config(resolve(context)), context.run_id)

    return client_app


app = make_client_app()
