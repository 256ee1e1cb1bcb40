"""Flower's simulation runtime on one machine: what ``train_federated(..., engine="flower")`` runs.

The ServerApp runs in a thread of this process; each simulated SuperNode's ClientApp runs in a Ray worker
process. Sites are in memory here, but the key still does not travel through Flower: every site's data
and key are written to a private workspace (a fresh directory only this user can enter, key files 0600),
and each ClientApp gets its site's file paths from a resolver bound into the ClientApp (Ray ships it to
its workers with the app), exactly as a deployed SuperNode gets them from its ``--node-config``. Messages
carry weights, counts, metrics and fingerprints only. The workspace is deleted when the run ends.

A process-local registry of keys would not do: Ray runs ClientApps in other processes, and a
:class:`~scinfl.FederationKey` refuses to be pickled precisely so that it is not copied around that way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd
from flwr.app import Context
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from torch import Tensor

from ...data import FederationSchema, SiteFields, feature_source
from ...key import FederationKey
from ...train import FitSettings, ModelConfig
from ..engine import FederationResult
from .client import make_client_app
from .protocol import RunSettings
from .server import FlowerRun, make_server_app

__all__ = ["SimulatedNodes", "private_workspace", "run_federated", "simulate", "write_site"]

logger = logging.getLogger("scinfl")


class SimulatedNodes:
    """Resolves a simulated SuperNode (its ``partition-id``) to its site's node config (file paths)."""

    def __init__(self, node_configs: list[dict[str, str]]) -> None:
        self.node_configs = node_configs

    def __call__(self, context: Context) -> Mapping[str, Any]:
        return self.node_configs[int(context.node_config["partition-id"])]


@contextmanager
def private_workspace() -> Iterator[Path]:
    """A temporary directory only this user can read (0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="scinfl-flower-"))  # mkdtemp creates it 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_site(adata: ad.AnnData, fields: SiteFields, path: Path) -> Path:
    """Write what a site trains on -- its features (``.X``, layer or ``.raw``) and labels -- as an h5ad.

    Only the fields the federation reads are written, so whatever else the AnnData holds (unwritable
    ``.uns`` entries, other layers) neither slows nor breaks the run.
    """
    matrix, var_names = feature_source(adata, fields)
    obs = pd.DataFrame(index=adata.obs_names.copy())
    if fields.label_key is not None:
        obs[fields.label_key] = adata.obs[fields.label_key].values
    ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=pd.Index(var_names).astype(str))).write_h5ad(path)
    return path


def simulate(
    sites: Mapping[str, ad.AnnData],
    fields: Mapping[str, SiteFields],
    keys: Mapping[str, FederationKey | None],
    settings: RunSettings,
    *,
    server_app: ServerApp | None = None,
    num_cpus: int | None = None,
    **run_options: Any,
) -> FlowerRun | None:
    """Run a federation of in-memory sites on Flower's simulation runtime (Ray).

    Parameters
    ----------
    sites
        Site name -> AnnData, in the order of ``settings.sites``.
    fields
        Where each site's features and labels live (:func:`scinfl.data.site_fields`).
    keys
        Site name -> the key that site holds (None: no key). A site holding another key version than
        ``settings.key_fingerprint`` has its updates rejected, as in a deployment.
    settings
        The run's settings. Its ``label_key`` is the sites'; its ``layer``/``use_raw`` are ignored, as
        each site's features are written out as ``.X``.
    server_app
        Replaces scinfl's ServerApp (tests wrap the Grid to inspect every message).
    num_cpus
        CPUs Ray may use (one ClientApp worker per CPU); None: all of this machine's.
    **run_options
        Passed to :func:`~scinfl.federation.flower.server.run_server` (``config``, ``initial_state``).

    Returns
    -------
    The finished run (None with a custom ``server_app``, which keeps its own result).
    """
    if list(sites) != list(settings.sites):
        raise ValueError(f"settings.sites {list(settings.sites)} must list the sites {list(sites)} in order.")
    settings = RunSettings.from_run_config({**settings.to_run_config(), "layer": "", "use-raw": False})
    finished: list[FlowerRun] = []
    with private_workspace() as workspace:
        node_configs = []
        for index, (name, adata) in enumerate(sites.items()):
            node = {
                "site": name,
                "data-path": str(write_site(adata, fields[name], workspace / f"site{index}.h5ad")),
            }
            if keys.get(name) is not None:
                node["key-path"] = str(keys[name].save(workspace / f"site{index}.key"))  # 0600
            node_configs.append(node)
        cpus = num_cpus or os.cpu_count() or 1
        run_simulation(
            server_app=server_app or make_server_app(settings, on_result=finished.append, **run_options),
            client_app=make_client_app(SimulatedNodes(node_configs)),
            num_supernodes=len(sites),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True},
            },
        )
    if server_app is None and not finished:
        raise RuntimeError("The Flower simulation ended without a result; see the log above.")
    return finished[0] if finished else None


def run_federated(
    sites: Mapping[str, ad.AnnData],
    fields: Mapping[str, SiteFields],
    *,
    key: FederationKey | None,
    schema: FederationSchema,
    config: ModelConfig,
    fit_settings: FitSettings,
    rounds: int,
    fraction: float,
    validation_fraction: float,
    join: str,
    seed: int,
    initial_state: Mapping[str, Tensor],
) -> FederationResult:
    """What :func:`scinfl.tl.train_federated` runs with ``engine="flower"``: every site holds ``key``.

    The run starts from ``initial_state`` with ``config``'s architecture, as the in-process engine does.
    """
    settings = RunSettings(
        sites=tuple(sites),
        key_fingerprint="" if key is None else key.fingerprint,
        scheme=config.scheme or "",
        task=config.task,
        rounds=rounds,
        local_epochs=fit_settings.local_epochs,
        fraction=fraction,
        batch_size=fit_settings.batch_size,
        lr=fit_settings.lr,
        weight_decay=fit_settings.weight_decay,
        hidden=config.hidden,
        dropout=config.dropout,
        key_strength=config.key_strength,
        validation_fraction=validation_fraction,
        label_key=schema.label_key or "",
        join=join,
        seed=seed,
    )
    run = simulate(
        sites, fields, dict.fromkeys(sites, key), settings, config=config, initial_state=initial_state
    )
    # The ServerApp agreed its schema from the sites' published metadata; it must be the one computed here.
    if (run.schema.var_names, run.schema.categories) != (
        schema.var_names,
        schema.categories,
    ) or run.config != config:
        raise RuntimeError(
            "The Flower run agreed another schema or architecture than train_federated computed."
        )
    return run.result
