"""The trained federated model: schema + network + history; prediction on new AnnData; save and load."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .data import (
    AlignedMatrix,
    FederationSchema,
    PerturbationDesign,
    SiteDataset,
    batch_loader,
    check_finite,
    feature_source,
    site_fields,
    site_inputs,
)
from .data.mosaic import is_mudata
from .data.schema import check_unique_features
from .key import FederationKey
from .train import ModelConfig, build_network, get_task, infer, key_material
from .train.mosaic import mosaic_embedding

__all__ = ["FederatedModel", "KeyMismatchError", "Predictions"]

_WEIGHTS = "weights.safetensors"
_META = "model.json"
_HISTORY = "history.csv"


class KeyMismatchError(ValueError):
    """The key given is not the version the model was trained under."""


@dataclass
class Predictions:
    """Model outputs for every cell of an AnnData, in its obs order.

    ``probabilities`` (classification) is None for a task without classes; ``expression`` is a
    perturbation model's predicted values of every cell (in the model's feature order), else None.
    """

    probabilities: np.ndarray | None
    embedding: np.ndarray
    categories: tuple[str, ...]
    expression: np.ndarray | None = None

    def _classes(self) -> np.ndarray:
        if self.probabilities is None:
            raise ValueError("This model predicts no classes (task 'embedding' or 'perturbation').")
        return self.probabilities

    @property
    def labels(self) -> pd.Categorical:
        return pd.Categorical.from_codes(self._classes().argmax(axis=1), categories=list(self.categories))

    @property
    def confidence(self) -> np.ndarray:
        return self._classes().max(axis=1)


class FederatedModel:
    """A model trained by :func:`scinfl.tl.train_federated`.

    It holds the aggregated weights, the federation schema, the architecture and the training history,
    and the fingerprint of the key it was trained under, but never the key.

    Attributes
    ----------
    network
        The torch network (keyed unless ``config.scheme`` is None).
    config
        The architecture (:class:`scinfl.train.ModelConfig`).
    schema
        Feature order and label categories every input is aligned to.
    key_fingerprint
        Version tag of the key the model needs; None for a plain (keyless) model.
    history
        One row per round and site: training loss, validation loss and accuracy.
    params
        The training parameters (rounds, sites, seed, ...).
    """

    def __init__(
        self,
        network: nn.Module,
        config: ModelConfig,
        schema: FederationSchema,
        *,
        key_fingerprint: str | None,
        history: pd.DataFrame | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.network = network
        self.config = config
        self.schema = schema
        self.key_fingerprint = key_fingerprint
        self.history = history if history is not None else pd.DataFrame()
        self.params = dict(params or {})

    def __repr__(self) -> str:
        key = f"key {self.key_fingerprint}" if self.key_fingerprint else "no key (plain FedAvg)"
        return (
            f"FederatedModel(task={self.config.task!r}, scheme={self.config.scheme!r}, {key}, "
            f"{self.schema.n_features} features, {self.schema.n_classes} classes)"
        )

    def check_key(self, key: FederationKey | None) -> None:
        """Raise :class:`KeyMismatchError` unless ``key`` is the version the model was trained under."""
        given = None if key is None else key.fingerprint
        if given != self.key_fingerprint:
            expected = self.key_fingerprint or "no key"
            raise KeyMismatchError(
                f"This model was trained under key {expected}, but key {given or 'None'} was given. "
                "Use the consortium's key (scinfl.FederationKey.load(path)); the privacy audit passes "
                "check_key=False to evaluate other keys on purpose."
            )

    def predict(
        self,
        adata: AnnData,
        *,
        key: FederationKey | None,
        check_key: bool = True,
        batch_size: int = 1024,
        min_overlap: float = 0.5,
        site: str = "query",
        layer: str | None = None,
        use_raw: bool | None = None,
        modality: str | None = None,
    ) -> Predictions:
        """Class probabilities (classification), predicted values (perturbation) and embeddings for every
        cell of ``adata`` (aligned to the schema). A perturbation model reads ``adata``'s perturbation
        column, covariates and control cells, as in training.

        Features the model knows but ``adata`` lacks are zero-filled with a warning that counts them;
        below ``min_overlap`` (a fraction of the model's features) it raises instead. The features are
        read from where the model's training read them (``.X``, a layer or ``.raw``) unless ``layer`` or
        ``use_raw`` says where this AnnData keeps the same kind of values.

        A multi-omics mosaic model (``task="mosaic"``) takes a MuData, or an AnnData holding one modality
        (``modality``, else its registration's, else ``"rna"``), and reads each modality's ``.X``.
        """
        if self.schema.modalities:  # a multi-omics mosaic (scinfl.train.mosaic)
            if modality is not None and is_mudata(adata):
                raise ValueError(f"Site {site!r} is a MuData: its modalities are named by its .mod.")
            if check_key:
                self.check_key(key)
            if layer is not None or use_raw:
                raise ValueError("A mosaic model reads each modality's .X: layer= and use_raw= do not apply.")
            embedding = mosaic_embedding(
                self.network,
                self.schema,
                adata,
                key_material=key_material(key, self.config) if self.config.scheme is not None else None,
                batch_size=batch_size,
                min_overlap=min_overlap,
                site=site,
                modality=modality,
            )
            return Predictions(probabilities=None, embedding=embedding, categories=self.schema.categories)
        if modality is not None:
            raise ValueError("modality= applies to mosaic models (task='mosaic') only.")
        if not isinstance(adata, AnnData):
            raise TypeError(f"Site {site!r} is a {type(adata).__name__}, not an AnnData.")
        if check_key:
            self.check_key(key)
        # A plain model has no keyed modules: a key given with check_key=False changes nothing.
        material = key_material(key, self.config) if self.config.scheme is not None else None
        if layer is None and use_raw is None:
            layer, use_raw = self.schema.layer, self.schema.use_raw
        fields = site_fields(adata, site, layer=layer, use_raw=bool(use_raw))
        check_unique_features(feature_source(adata, fields)[1], site, used=pd.Index(self.schema.var_names))
        matrix = AlignedMatrix.from_adata(adata, self.schema, fields)
        matrix = self.site_inputs(matrix, adata, site)
        overlap = matrix.n_present / self.schema.n_features
        if overlap < min_overlap:
            raise ValueError(
                f"Site {site!r} shares only {matrix.n_present} of the model's {self.schema.n_features} features "
                f"({overlap:.0%} < min_overlap={min_overlap:.0%}): check the gene identifiers and the layer."
            )
        if matrix.n_present < self.schema.n_features:
            warnings.warn(
                f"Site {site!r} lacks {self.schema.n_features - matrix.n_present} of the model's "
                f"{self.schema.n_features} features; they are filled with zeros.",
                UserWarning,
                stacklevel=2,
            )
        if adata.n_obs == 0:
            raise ValueError(f"Site {site!r} has no cells.")
        check_finite(matrix.matrix, site)
        loader = batch_loader(
            SiteDataset(matrix, np.arange(adata.n_obs)), batch_size=batch_size, shuffle=False
        )
        outputs, embedding = infer(self.network, loader, key_material=material)
        task = get_task(
            self.config.task, likelihood=self.config.likelihood, n_features=self.config.n_features
        )
        probabilities = expression = None
        if hasattr(task, "probabilities"):
            probabilities = task.probabilities(torch.from_numpy(outputs)).numpy()
        if self.config.task == "perturbation":  # the head predicts the change from the control profile
            expression = outputs + matrix.control_rows(np.arange(adata.n_obs))
        return Predictions(
            probabilities=probabilities,
            embedding=embedding,
            categories=self.schema.categories,
            expression=expression,
        )

    def site_inputs(self, aligned, adata: AnnData, site: str):
        """``aligned`` (``adata``'s :class:`~scinfl.data.AlignedMatrix`) as this model reads it, as in
        training: each spot with its neighbours (spatial models), each cell with this data's control
        profile, its perturbation and its covariates (perturbation models)."""
        design = self.params.get("perturbation")
        return site_inputs(
            aligned,
            adata,
            self.schema,
            site,
            spatial_key=self.params.get("spatial_key"),
            spatial_neighbors=self.params.get("spatial_neighbors", 6),
            design=None if design is None else PerturbationDesign.from_dict(design),
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write weights (safetensors), architecture, schema and history to the directory ``path``.

        Nothing derived from the key is written: only the shared weights and the key's fingerprint.
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{path} exists and is not empty; pass overwrite=True to replace the model."
            )
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, path / _WEIGHTS)
        meta = {
            "scinfl_version": __version__,
            "config": self.config.to_dict(),
            "schema": self.schema.to_dict(),
            "key_fingerprint": self.key_fingerprint,
            "params": self.params,
        }
        (path / _META).write_text(json.dumps(meta, indent=1, default=_json_default))
        self.history.to_csv(path / _HISTORY, index=False)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FederatedModel:
        """Read a model written by :meth:`save` (no pickle: safetensors and JSON only)."""
        path = Path(path)
        for name in (_WEIGHTS, _META):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} is not a saved scinfl model: {name} is missing.")
        meta = json.loads((path / _META).read_text())
        config = ModelConfig.from_dict(meta["config"])
        network = build_network(config)
        network.load_state_dict(load_file(path / _WEIGHTS))
        history = pd.read_csv(path / _HISTORY) if (path / _HISTORY).is_file() else None
        return cls(
            network,
            config,
            FederationSchema.from_dict(meta["schema"]),
            key_fingerprint=meta["key_fingerprint"],
            history=history,
            params=meta.get("params"),
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"Cannot store {type(value).__name__} in model.json.")
