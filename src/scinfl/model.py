"""The trained federated model: run spec + architecture + network + history; prediction; save and load."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from ._version import __version__
from .data import FederationSchema, SiteDataset, batch_loader
from .federation import FederationRun, RunSpec, site_split
from .key import FederationKey, as_key
from .nn import use_key
from .tasks import ModelConfig, Predictions, Task, build_network
from .train import infer, key_material, key_on, resolve_device, sparse_batches_on, training_plan

if TYPE_CHECKING:
    from .train import TrainingPlan

__all__ = ["FederatedModel", "KeyMismatchError", "ModelFileError", "Predictions"]

_WEIGHTS = "weights.safetensors"
_META = "model.json"
_HISTORY = "history.csv"


class KeyMismatchError(ValueError):
    """The key given is not the version the model was trained under."""


class ModelFileError(ValueError):
    """A saved model's file that cannot be read: truncated, corrupt, or not written by scinfl."""


class FederatedModel:
    """A model trained by :func:`scinfl.tl.train_federated`.

    It holds the aggregated weights, the architecture (with the federation schema), the run spec it was
    trained with and the training history, and the fingerprint of the key it was trained under, but never
    the key.

    Attributes
    ----------
    network
        The torch network (keyed unless ``config.scheme`` is None).
    config
        The architecture (:class:`scinfl.tasks.ModelConfig`): the task, the schema, the network's sizes.
    spec
        The run (:class:`scinfl.federation.RunSpec`): task options, rounds, optimisation, seed, dp, ...
    history
        One row per round and site: training loss, validation loss and accuracy.
    params
        What the training recorded besides the spec: ``engine``, ``best_round``, ``stopped_round`` (the
        last round trained, when early stopping ended the run), the DP-SGD report, ...
    sites
        With ``train_federated(copy=True)``: the sites' copies with the outputs written into them (not
        saved with the model); otherwise None.
    """

    def __init__(
        self,
        network: nn.Module,
        config: ModelConfig,
        spec: RunSpec,
        *,
        history: pd.DataFrame | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.network = network
        self.config = config
        self.spec = spec
        self.history = history if history is not None else pd.DataFrame()
        self.params = dict(params or {})
        self.sites: dict[str, Any] | None = None

    @classmethod
    def from_run(cls, run: FederationRun, spec: RunSpec, **params: Any) -> FederatedModel:
        """The model of a finished run: its selected weights, with ``params`` (``engine=...``)."""
        network = build_network(run.config)
        network.load_state_dict(run.best_state)
        params = {**params, "best_round": run.best_round}
        if run.stopped_round is not None:
            params["stopped_round"] = run.stopped_round
        return cls(network, run.config, spec, history=run.history, params=params)

    @property
    def task(self) -> Task:
        return self.config.task

    @property
    def schema(self) -> FederationSchema:
        return self.config.schema

    @property
    def key_fingerprint(self) -> str | None:
        """Version tag of the key the model needs; None for a plain (keyless) model."""
        return self.spec.key_fingerprint

    def __repr__(self) -> str:
        key = f"key {self.key_fingerprint}" if self.key_fingerprint else "no key (plain FedAvg)"
        return (
            f"FederatedModel(task={self.task.name!r}, scheme={self.config.scheme!r}, {key}, "
            f"{self.schema.n_features} features, {self.schema.n_classes} classes)"
        )

    def check_key(self, key: FederationKey | str | os.PathLike[str] | None) -> None:
        """Raise :class:`KeyMismatchError` unless ``key`` is the version the model was trained under."""
        key = as_key(key)
        given = None if key is None else key.fingerprint
        if given == self.key_fingerprint:
            return
        if self.key_fingerprint is None:
            raise KeyMismatchError(
                f"This is a plain model (trained without a key), but key {given} was given: pass key=None."
            )
        if given is None:
            raise KeyMismatchError(
                f"This model was trained under key {self.key_fingerprint}, but no key was given. Pass the "
                "consortium's key: key=scinfl.FederationKey.load(path), or the key file's path."
            )
        raise KeyMismatchError(
            f"This model was trained under key {self.key_fingerprint}, but key {given} was given. Pass the "
            "consortium's key of that version: key=scinfl.FederationKey.load(path), or the key file's path."
        )

    def key_material(self, key: FederationKey | None):
        """What ``key`` gives this model's network (None for a plain model, whatever the key)."""
        return None if self.config.scheme is None else key_material(key, self.network)

    def inputs(self, data, *, site: str = "query", min_overlap: float | None = 0.5, **fields):
        """``data`` as the network reads it, as in training (:meth:`scinfl.tasks.Task.inputs`)."""
        return self.task.inputs(data, site, self.schema, min_overlap=min_overlap, **fields)

    def validation_mask(self, adata, *, site: str) -> np.ndarray:
        """Which cells of ``adata`` the run held out at ``site`` to select the best round.

        These cells were never trained on: the privacy audit uses them as the site's non-members
        (:func:`scinfl.tl.privacy_audit` with ``site=``). The split is recomputed as every engine draws it
        (the run's seed, the site's place in the roster, its labels), so ``adata`` must be the data the
        site trained on, with the same cells in the same order; a split that disagrees with the training
        cell count the run recorded raises.

        Returns
        -------
        Boolean array over ``adata``'s cells, True for a validation cell.
        """
        if site not in self.spec.sites:
            raise ValueError(f"{site!r} is not a site of this run; its sites are {list(self.spec.sites)}.")
        train, validation = site_split(self.spec, site, self.task.labels(adata, site, self.schema))
        if {"site", "n_train"} <= set(self.history.columns):
            recorded = self.history.loc[self.history["site"] == site, "n_train"].dropna()
            if len(recorded) and int(recorded.iloc[0]) != len(train):
                raise ValueError(
                    f"Site {site!r}: the run trained on {int(recorded.iloc[0])} cells there, but this data "
                    f"splits into {len(train)} training cells. Pass the data the site trained on (the same "
                    "cells, in the same order)."
                )
        mask = np.zeros(adata.n_obs, dtype=bool)
        mask[validation] = True
        return mask

    def predict(
        self,
        adata: AnnData,
        *,
        key: FederationKey | str | os.PathLike[str] | None,
        check_key: bool = True,
        batch_size: int = 1024,
        min_overlap: float = 0.5,
        site: str = "query",
        layer: str | None = None,
        use_raw: bool | None = None,
        modality: str | None = None,
    ) -> Predictions:
        """The task's predictions (class probabilities, predicted values) and embeddings for every cell of
        ``adata``, aligned to the schema by feature name.

        Features the model knows but ``adata`` lacks are zero-filled with a warning that counts them;
        below ``min_overlap`` (a fraction of the model's features) it raises instead. The features are
        read from where the model's training read them (``.X``, a layer or ``.raw``) unless ``layer`` or
        ``use_raw`` says where this AnnData keeps the same kind of values. A mosaic model takes a MuData,
        or an AnnData holding one modality (``modality``, else its registration's, else ``"rna"``).
        ``site`` names the cells' site in errors, and chooses a site-aware embedding's batch (an unknown
        site: the mean of the known sites' statistics).
        """
        key = as_key(key)
        if check_key:
            self.check_key(key)
        inputs, loader = self._loader(adata, batch_size, min_overlap, site, layer, use_raw, modality)
        outputs, embedding = infer(
            self.network, loader, key_material=self.key_material(key), outputs=self.task.uses_outputs
        )
        return self.task.predictions(outputs, embedding, inputs, self.schema)

    def _loader(self, adata, batch_size, min_overlap, site, layer, use_raw, modality, labels=False):
        fields = {
            k: v for k, v in (("layer", layer), ("use_raw", use_raw), ("modality", modality)) if v is not None
        }
        inputs = self.inputs(adata, site=site, min_overlap=min_overlap, **fields)
        codes = self.task.labels(adata, site, self.schema) if labels else None
        cells = SiteDataset(
            inputs, np.arange(inputs.n_obs), codes, sparse_batches=sparse_batches_on(resolve_device())
        )
        return inputs, batch_loader(cells, batch_size=batch_size, shuffle=False)

    def dataloader(
        self,
        adata: AnnData,
        *,
        batch_size: int = 1024,
        min_overlap: float = 0.5,
        site: str = "query",
        layer: str | None = None,
        use_raw: bool | None = None,
        modality: str | None = None,
        labels: bool = False,
    ) -> DataLoader:
        """A ``torch`` DataLoader of ``adata``'s cells as this model's input rows, in obs order: batches
        ``(x, y)`` as :meth:`predict` reads them (options as there), for your own Lightning code
        (:meth:`lightning_module`). ``labels=True``: ``y`` holds each cell's label code as the sites
        trained on it (its ``label_key`` column must be there), for ``Trainer.validate`` or ``fit``."""
        return self._loader(adata, batch_size, min_overlap, site, layer, use_raw, modality, labels)[1]

    def lightning_module(self) -> TrainingPlan:
        """This model's network as a ``lightning.LightningModule`` (:class:`scinfl.train.TrainingPlan`): the
        task's loss and metrics (``training_step``, ``validation_step``), Adam with the run's settings
        (``configure_optimizers``) and ``predict_step`` (embeddings and outputs, float32).

        The module holds this model's network itself, not a copy, and no key: run it under the key with
        :meth:`keyed` (a hardened model's plan computes as the keyed network does, inputs mixed)::

            plan = model.lightning_module()
            with model.keyed(key):
                batches = lightning.Trainer(accelerator="cpu", logger=False).predict(
                    plan, model.dataloader(adata)
                )
            embedding = torch.cat([features for features, _ in batches])
        """
        fit = self.spec.fit
        return training_plan(
            self.network,
            self.task.objective(self.config),
            lr=fit.lr,
            weight_decay=fit.weight_decay,
            predict_outputs=self.task.uses_outputs,
        )

    @contextmanager
    def keyed(
        self,
        key: FederationKey | str | os.PathLike[str] | None,
        *,
        device: str | torch.device = "cpu",
        check_key: bool = True,
    ) -> Iterator[None]:
        """Run the block with ``key`` in force for this model's network on ``device`` (where the block
        computes: a ``Trainer``'s accelerator), as :func:`scinfl.nn.use_key` does; the key material is
        derived here and dropped when the block ends, never stored in the network or a plan."""
        key = as_key(key)
        if check_key:
            self.check_key(key)
        with use_key(key_on(self.key_material(key), torch.device(device))):
            yield

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write weights (safetensors), architecture, run spec and history to the directory ``path``.

        Nothing derived from the key is written: only the shared weights and the key's fingerprint.
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{path} exists and is not empty; pass overwrite=True to replace the model."
            )
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, path / _WEIGHTS)
        os.chmod(path / _WEIGHTS, 0o600)  # weights: readable by their owner only
        self.history.to_csv(path / _HISTORY, index=False)
        meta = {
            "scinfl_version": __version__,
            "config": self.config.to_dict(),
            "spec": self.spec.to_dict(),
            "params": self.params,
            "history_rows": len(self.history),  # a truncated history.csv would otherwise load silently
            # checked at load: a damaged file that still parses (a flipped bit) is refused, not used
            "sha256": {name: _sha256(path / name) for name in (_WEIGHTS, _HISTORY)},
        }
        (path / _META).write_text(json.dumps(meta, indent=1, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FederatedModel:
        """Read a model written by :meth:`save` (no pickle: safetensors and JSON only).

        A file that is missing raises :class:`FileNotFoundError`; one that is truncated or corrupt raises
        :class:`~scinfl.model.ModelFileError`, naming it.
        """
        path = Path(path)
        for name in (_WEIGHTS, _META):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} is not a saved scinfl model: {name} is missing.")
        meta_path, weights_path, history_path = path / _META, path / _WEIGHTS, path / _HISTORY
        try:
            meta = json.loads(meta_path.read_text())
            config = ModelConfig.from_dict(meta["config"])
            # A model saved before secure aggregation existed was trained with its updates in the clear.
            spec = RunSpec.from_dict({"secure_aggregation": False, **meta["spec"]})
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelFileError(f"{meta_path} is truncated or corrupt (not JSON: {error}).") from None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ModelFileError(
                f"{meta_path} is not a scinfl model description ({type(error).__name__}: {error})."
            ) from None
        for name, digest in dict(meta.get("sha256") or {}).items():  # models saved before have none
            if (path / name).is_file() and _sha256(path / name) != digest:
                raise ModelFileError(
                    f"{path / name} is truncated or altered: its SHA-256 differs from the one {meta_path.name} "
                    "recorded when the model was saved."
                )
        network = build_network(config)
        try:
            network.load_state_dict(load_file(weights_path))
        except Exception as error:  # safetensors raises its own error type for a truncated file
            raise ModelFileError(
                f"{weights_path} is truncated, corrupt or of another architecture "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]})."
            ) from None
        history = None
        if history_path.is_file():
            try:
                history = pd.read_csv(history_path)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
                raise ModelFileError(f"{history_path} is truncated or corrupt ({error}).") from None
            expected = meta.get("history_rows")
            if expected is not None and len(history) != expected:
                raise ModelFileError(
                    f"{history_path} holds {len(history)} rows; the model wrote {expected}: it is truncated."
                )
        return cls(network, config, spec, history=history, params=meta.get("params"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"Cannot store {type(value).__name__} in model.json.")
