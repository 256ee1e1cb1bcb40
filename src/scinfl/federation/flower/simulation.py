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
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from ...data import feature_source, is_mudata, scinfl_entry
from ...key import FederationKey
from ...tasks import Task
from ..identity import write_consortium
from ..preprocessing import PreprocessingResult
from ..rounds import FederationRun
from ..spec import RunSpec
from ..statistics import StatisticsSpec
from .client import make_client_app
from .run_config import statistics_run_config
from .server import make_server_app, run_preprocessing

__all__ = [
    "SimulatedNodes",
    "private_workspace",
    "remove_orphaned_workspaces",
    "simulate",
    "simulate_statistics",
    "write_site",
]

logger = logging.getLogger("scinfl")


class SimulatedNodes:
    """Resolves a simulated SuperNode (its ``partition-id``) to its site's node config (file paths)."""

    def __init__(self, node_configs: list[dict[str, Any]]) -> None:
        self.node_configs = node_configs

    def __call__(self, context: Context) -> Mapping[str, Any]:
        return self.node_configs[int(context.node_config["partition-id"])]


_WORKSPACE_PREFIX = "scinfl-flower-"


@contextmanager
def private_workspace() -> Iterator[Path]:
    """A temporary directory only this user can read (0700), removed afterwards.

    Its name carries this process's ID. A process killed outright (SIGKILL, the machine's OOM killer)
    cannot remove it, and it holds the sites' key files: the next workspace this user creates removes the
    workspaces of processes that no longer run (:func:`remove_orphaned_workspaces`).
    """
    remove_orphaned_workspaces()
    path = Path(tempfile.mkdtemp(prefix=f"{_WORKSPACE_PREFIX}{os.getpid()}-"))  # mkdtemp creates it 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_orphaned_workspaces(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove this user's simulation workspaces whose process is gone; return them."""
    removed = []
    for path in Path(directory or tempfile.gettempdir()).glob(f"{_WORKSPACE_PREFIX}*-*"):
        pid = path.name[len(_WORKSPACE_PREFIX) :].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid() or _alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.warning(
            "Removed %d workspace(s) of Flower simulations whose process was killed (they held key files): %s",
            len(removed),
            ", ".join(str(p) for p in removed),
        )
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that ID: not ours to judge
        return True
    return True


def write_site(data: Any, task: Task, site: str, path: Path) -> Path:
    """Write what a site trains on -- its features where its registration says (``.X``, a layer or
    ``.raw``), the ``.obs`` columns and ``.obsm`` entries the task reads -- as an h5ad (an h5mu for a
    MuData site, each modality's ``.X``). Returns the path written.

    Only what the federation reads is written, so whatever else the data holds (unwritable ``.uns``
    entries, other layers) neither slows nor breaks the run.
    """
    registered = scinfl_entry(data, site, "scinfl").get("registration", {})
    label_key = getattr(task, "label_key", None) or registered.get("label_key")
    obs_keys = [k for k in (label_key, *task.agreed_columns()) if k is not None]
    obs = pd.DataFrame(index=data.obs_names.copy())
    for key in obs_keys:
        if key in data.obs:
            obs[key] = data.obs[key].values
    if is_mudata(data):
        import mudata

        modalities = {
            name: ad.AnnData(
                X=mod.X,
                obs=pd.DataFrame(index=mod.obs_names.copy()),
                var=pd.DataFrame(index=mod.var_names.copy()),
            )
            for name, mod in data.mod.items()
        }
        lean = mudata.MuData(modalities)
        for key in obs.columns:
            lean.obs[key] = obs[key].reindex(lean.obs_names).values
        path = path.with_suffix(".h5mu")
        lean.write(path)
        os.chmod(path, 0o600)
        return path
    fields = task.site_fields(data, site)
    matrix, var_names = feature_source(data, fields)
    var = pd.DataFrame(index=pd.Index(var_names).astype(str))
    obsm = {k: data.obsm[k] for k in task.obsm_keys() if k in data.obsm}
    if fields.use_raw:
        lean = ad.AnnData(obs=obs, obsm=obsm)
        lean.raw = ad.AnnData(X=matrix, obs=obs, var=var)
    elif fields.layer is not None:
        lean = ad.AnnData(obs=obs, var=var, obsm=obsm, layers={fields.layer: matrix})
    else:
        lean = ad.AnnData(X=matrix, obs=obs, var=var, obsm=obsm)
    path = path.with_suffix(".h5ad")
    lean.write_h5ad(path)
    os.chmod(path, 0o600)  # a site's data: its owner's only, as the key files beside it
    return path


def node_config(data: Any, site: str) -> dict[str, Any]:
    """A site's data fields (its registration) as node-config entries (``label-key``, ``layer``, ...)."""
    registered = scinfl_entry(data, site, "scinfl").get("registration", {})
    names = {"label_key": "label-key", "layer": "layer", "use_raw": "use-raw", "modality": "modality"}
    return {names[k]: v for k, v in registered.items() if k in names and v is not None}


def simulate(
    sites: Mapping[str, Any],
    keys: Mapping[str, FederationKey | None],
    spec: RunSpec,
    *,
    server_app: ServerApp | None = None,
    num_cpus: int | None = None,
    **federate_options: Any,
) -> FederationRun | None:
    """Run a federation of in-memory (or backed) sites on Flower's simulation runtime (Ray).

    Parameters
    ----------
    sites
        Site name -> its data, in the order of ``spec.sites``.
    keys
        Site name -> the key that site holds (None: no key). A site holding another key version than
        ``spec.key_fingerprint`` has its updates rejected, as in a deployment.
    spec
        The run.
    server_app
        Replaces scinfl's ServerApp (tests wrap the Grid to inspect every message).
    num_cpus
        CPUs Ray may use (one ClientApp worker per CPU); None: all of this machine's.
    **federate_options
        Passed to :func:`~scinfl.federation.federate` (``initial_state``, ``checkpoint_dir``, ``resume``,
        ``signature``).

    Returns
    -------
    The finished run (None with a custom ``server_app``, which keeps its own result).
    """
    if list(sites) != list(spec.sites):
        raise ValueError(f"spec.sites {list(spec.sites)} must list the sites {list(sites)} in order.")
    finished: list[FederationRun] = []
    with private_workspace() as workspace:
        node_configs = []
        consortium = write_consortium(workspace / "identities", list(sites))
        for index, (name, data) in enumerate(sites.items()):
            node = {"site": name, **node_config(data, name), **consortium[name]}
            if getattr(data, "isbacked", False):  # its file, read backed by the ClientApp as here
                node["data-path"] = str(Path(data.filename).absolute())
            else:
                node["data-path"] = str(write_site(data, spec.task, name, workspace / f"site{index}"))
            if keys.get(name) is not None:
                node["key-path"] = str(keys[name].save(workspace / f"site{index}.key"))  # 0600
            node_configs.append(node)
        _run_simulation(
            server_app or make_server_app(lambda run, *_: finished.append(run), spec, **federate_options),
            node_configs,
            num_cpus,
        )
    if server_app is None and not finished:
        raise RuntimeError("The Flower simulation ended without a result; see the log above.")
    return finished[0] if finished else None


def _run_simulation(server_app: ServerApp, node_configs: list[dict[str, Any]], num_cpus: int | None) -> None:
    """Flower's simulation of ``server_app`` with one simulated SuperNode per node config."""
    cpus = num_cpus or os.cpu_count() or 1
    # The ServerApp runs in a thread of its own, where torch's thread count starts at its default: the
    # count it sets and restores there would leak into the caller's session (and make a later in-process
    # run differ in the last bits). The caller's count is restored here.
    threads = torch.get_num_threads()
    try:
        run_simulation(
            server_app=server_app,
            client_app=make_client_app(SimulatedNodes(node_configs)),
            num_supernodes=len(node_configs),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True},
            },
        )
    finally:
        torch.set_num_threads(threads)


def simulate_statistics(
    sites: Mapping[str, Any],
    spec: StatisticsSpec,
    step: str,
    options: Mapping[str, Any],
    *,
    num_cpus: int | None = None,
) -> PreprocessingResult:
    """Run a federated preprocessing ``step`` on Flower's simulation runtime, as a deployment runs it: the
    ServerApp's :func:`~scinfl.federation.flower.server.run_preprocessing` with the run config a consortium
    would give ``flwr run``, over simulated SuperNodes whose ClientApps answer for their sites from their
    files (a backed site's own; an in-memory site's values and batch column written to a private
    workspace). Returns the result the ServerApp saved; an error in the run is raised here.
    """
    failures: list[Exception] = []
    server_app = ServerApp()
    with private_workspace() as workspace:
        config = statistics_run_config(step, spec, options, workspace / "result")

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                run_preprocessing(grid, config)
            except Exception as error:  # raised again in the caller's thread, below
                failures.append(error)

        node_configs = []
        consortium = write_consortium(workspace / "identities", list(sites))
        for index, (name, data) in enumerate(sites.items()):
            if getattr(data, "isbacked", False):
                path = Path(data.filename).absolute()
            else:
                path = _write_statistics_site(data, spec, workspace / f"site{index}.h5ad")
            node_configs.append({"site": name, "data-path": str(path), **consortium[name]})
        _run_simulation(server_app, node_configs, num_cpus)
        if failures:
            raise failures[0]
        saved = workspace / "result" / f"{step}.npz"
        if not saved.is_file():
            raise RuntimeError("The Flower simulation ended without a result; see the log above.")
        return PreprocessingResult.load(saved)


def _write_statistics_site(data: Any, spec: StatisticsSpec, path: Path) -> Path:
    """What a statistics exchange reads of an in-memory site: its values (``.X`` or the layer) and its
    batch column, as an h5ad only its owner can read."""
    obs = pd.DataFrame(index=data.obs_names.copy())
    if spec.batch_key is not None and spec.batch_key in data.obs:
        obs[spec.batch_key] = data.obs[spec.batch_key].values
    var = pd.DataFrame(index=pd.Index(data.var_names).astype(str))
    if spec.layer is None:
        lean = ad.AnnData(X=data.X, obs=obs, var=var)
    else:
        lean = ad.AnnData(
            obs=obs,
            var=var,
            layers={spec.layer: data.layers[spec.layer]} if spec.layer in data.layers else {},
        )
    lean.write_h5ad(path)
    os.chmod(path, 0o600)
    return path
