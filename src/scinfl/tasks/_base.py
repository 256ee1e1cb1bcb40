"""What every task provides, and what the rest of scinfl asks of it.

A task is a frozen dataclass of its user options (``si.tasks.Embedding(n_latent=32)``) whose methods say
how its sites' data become network inputs, which network it builds, what that network is trained on, how
its outputs land in an AnnData and what the privacy audit attacks. Engines, the model and the audit ask
the task; none of them tests a task's name. A new task is one module with one subclass, registered with
:func:`register`, and its tests.

The hooks, in the order a federation calls them:

=====================  ===================================================================================
``describe``           what a site publishes for the schema to be agreed (names and counts, never values)
``agree``              the federation schema, from every site's description
``inputs``             one site's cells as network input rows (``labels``: codes stratifying its validation)
``build_network``      the plain task network (``scinfl.nn``; keyed by :func:`build_network`)
``trained_parameters`` the ``state_dict`` entries a site trains and sends (default: all)
``objective``          the loss and metrics of one site (``loss(output, x, y)``, ``metric_sums``)
``predictions``        the network's embeddings, and its outputs where ``uses_outputs``, read as predictions
``write``              predictions written into an AnnData/MuData (scanpy style)
``audit_view``         what the privacy audit attacks: kind of output, profile columns, loss
=====================  ===================================================================================
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from torch import Tensor, nn

from .._warnings import warn
from ..data import (
    AlignedMatrix,
    FederationSchema,
    SiteFields,
    build_schema,
    check_finite,
    describe_site,
    feature_source,
    label_codes,
    scinfl_entry,
    site_fields,
)
from ..data.mosaic import is_mudata
from ..data.schema import check_unique_features
from ..key import SCHEMES
from ..nn import harden, keyify

__all__ = [
    "TASKS",
    "AuditView",
    "ModelConfig",
    "Predictions",
    "Task",
    "build_network",
    "get_task",
    "register",
]

TASKS: dict[str, type[Task]] = {}


class PerCellObjective:
    """An objective whose loss is the mean of a per-cell loss (``cell_losses(output, x)``), reported as
    its sum so that a site's evaluation can be averaged over cells."""

    def cell_losses(self, output: Any, x: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, output: Any, x: Tensor, y: Tensor) -> Tensor:
        return self.cell_losses(output, x).mean()

    def metric_sums(self, output: Any, x: Tensor, y: Tensor) -> dict[str, float]:
        return {"loss": float(self.cell_losses(output, x).sum())}


def register(cls: type[Task]) -> type[Task]:
    """Make a task class available by its ``name`` (``train_federated(task="...")``, saved models)."""
    TASKS[cls.name] = cls
    return cls


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
            raise ValueError("This model predicts no classes.")
        return self.probabilities

    @property
    def labels(self) -> pd.Categorical:
        return pd.Categorical.from_codes(self._classes().argmax(axis=1), categories=list(self.categories))

    @property
    def confidence(self) -> np.ndarray:
        return self._classes().max(axis=1)


@dataclass(frozen=True)
class AuditView:
    """What the privacy audit attacks in a task's model (:func:`scinfl.privacy.audit.run_audit`).

    Attributes
    ----------
    output
        What the network outputs, which decides the attack families that apply: ``"classes"`` (logits:
        every family), ``"embedding"`` (a latent to reconstruct from: utility by kNN label transfer in the
        embedding, analytic attacks on the first layer), ``"profile"`` (predicted values of a condition:
        utility by Pearson delta per condition, analytic attacks on the output layer's residual).
    objective
        The loss the clients' gradients are of (None: the cross-entropy of a classifier).
    profile
        The columns of an input row holding the cell's own values, which reconstruction attacks are after.
    control, condition, label
        ``"profile"`` models: the columns of a row with the control profile the cell's prediction starts
        from, those naming its condition (label and covariates), and the label's one-hot among them.
    """

    output: Literal["classes", "embedding", "profile"]
    objective: Any = None
    profile: slice = field(default_factory=lambda: slice(None))
    control: slice | None = None
    condition: slice | None = None
    label: slice | None = None


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` (from JSON or a flat run config) as the type ``hint`` of a task option."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value == "" and type(None) in typing.get_args(hint):
            return None  # a flat run config spells None as ""
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if isinstance(value, Mapping) and any(typing.get_origin(h) in (Mapping, dict) for h in options):
            hint = next(h for h in options if typing.get_origin(h) in (Mapping, dict))
        elif isinstance(value, str) and str in options:
            return value
        else:
            hint = options[0]
        origin = typing.get_origin(hint)
    if origin is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        return tuple(str(v) for v in items)
    if origin in (Mapping, dict):
        return tuple((str(k), str(v)) for k, v in dict(value).items())
    if hint is bool:
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if hint in (int, float, str):
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"Task option {name!r} must be a {hint.__name__}, got {value!r}.") from None
    return value


@dataclass(frozen=True, kw_only=True)
class Task:
    """Base of every task (see the module docstring). Subclasses are frozen, keyword-only dataclasses of
    options; every task's network has a width and a dropout rate.

    Parameters
    ----------
    hidden
        Width of the network's hidden layers.
    dropout
        Dropout rate.
    """

    hidden: int = 256
    dropout: float = 0.1

    name: ClassVar[str] = ""
    output: ClassVar[Literal["classes", "embedding", "profile"]] = "embedding"
    needs_labels: ClassVar[bool] = False  # the label column must exist at every site
    supports_dp: ClassVar[bool] = True  # DP-SGD (Opacus) trains this task's network
    supports_init: ClassVar[bool] = True  # train_federated(init=...) starts from a trained model
    uses_outputs: ClassVar[bool] = False  # predictions() reads the head's outputs, not only the embedding

    # ---- options ----------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if isinstance(self.hidden, bool) or int(self.hidden) != self.hidden or self.hidden < 2:
            raise ValueError(f"hidden must be an integer of at least 2, got {self.hidden!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON (with the task's ``name``); :meth:`from_dict` reads them back."""
        out: dict[str, Any] = {"name": self.name}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and value and isinstance(value[0], tuple):
                value = dict(value)  # a mapping option, stored as pairs (hashable)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Task:
        """The task :meth:`to_dict` wrote (keys may be spelt with hyphens, as in a Flower run config)."""
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        name = data.pop("name", None)
        cls = _task_class(name)
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Task {name!r} has no option {unknown[0]!r}; its options: {', '.join(sorted(known))}."
            )
        return cls(**{k: _coerce(v, hints[k], k) for k, v in data.items()})

    def replace(self, **changes: Any) -> Task:
        return dataclasses.replace(self, **changes)

    # ---- what a site publishes, and the schema agreed from it --------------------------------------
    def site_fields(self, data: AnnData, site: str) -> SiteFields:
        """Where ``data`` keeps this task's features and labels: the task's label column, else the
        registration's, and the registration's place of the values."""
        return site_fields(data, site, label_key=getattr(self, "label_key", None))

    def agreed_columns(self) -> tuple[str, ...]:
        """Categorical ``.obs`` columns the task reads besides the labels (their categories are agreed)."""
        return ()

    def obsm_keys(self) -> tuple[str, ...]:
        """``.obsm`` entries a site's inputs read."""
        return ()

    def check_site(self, data: Any, site: str) -> None:
        """Raise naming the site if ``data`` is not the kind of site this task trains on."""
        if is_mudata(data):
            raise ValueError(
                f"Site {site!r} is a MuData: multi-omics sites train with task='mosaic' (got task={self.name!r})."
            )
        if not isinstance(data, AnnData):
            raise TypeError(f"Site {site!r} is a {type(data).__name__}, not an AnnData.")
        if data.n_obs == 0:
            raise ValueError(f"Site {site!r} has no cells.")

    def describe(self, data: AnnData, site: str) -> dict[str, Any]:
        """What ``site`` publishes: feature names, label and covariate categories, counts (JSON-able)."""
        self.check_site(data, site)
        return describe_site(data, site, self.site_fields(data, site), covariate_keys=self.agreed_columns())

    def agree(self, descriptions: Mapping[str, Mapping[str, Any]], *, join: str) -> FederationSchema:
        """The federation schema from every site's :meth:`describe`."""
        schema = build_schema(descriptions, join=join)
        if self.needs_labels and schema.label_key is None:
            raise ValueError(
                f"task={self.name!r} needs labels: pass label_key= or register it with pp.register_site."
            )
        return schema

    # ---- a site's inputs ----------------------------------------------------------------------------
    def aligned(
        self,
        data: AnnData,
        site: str,
        schema: FederationSchema,
        *,
        layer: str | None = None,
        use_raw: bool | None = None,
        min_overlap: float | None = None,
        modality: str | None = None,
    ) -> AlignedMatrix:
        """``data``'s features aligned to ``schema``, read from where training read them unless ``layer``
        or ``use_raw`` say otherwise (a query keeping the same values elsewhere), then the registration.

        ``min_overlap`` (new data): fewer of the model's features than that fraction raise, fewer than all
        warn; None (a training site) accepts the zero-filled features of ``join="outer"``.
        """
        self.check_site(data, site)
        if modality is not None:
            raise ValueError(f"modality= applies to multi-omics mosaic models only, not task={self.name!r}.")
        if layer is None and use_raw is None:
            fields = site_fields(data, site, layer=schema.layer, use_raw=schema.use_raw)
        else:
            fields = site_fields(data, site, layer=layer, use_raw=use_raw)
        values, var_names = feature_source(data, fields)
        check_unique_features(var_names, site, used=pd.Index(schema.var_names))
        check_finite(values, site)  # names the site (a backed CSC matrix is refused here too)
        matrix = AlignedMatrix(values, var_names, schema.var_names)
        if min_overlap is not None:
            _check_overlap(site, matrix.n_present, schema.n_features, min_overlap)
        return matrix

    def labels(self, data: AnnData, site: str, schema: FederationSchema) -> np.ndarray:
        """Each cell's label code (zeros without a label column): stratifies the validation split."""
        if schema.label_key is None:
            return np.zeros(data.n_obs, dtype=np.int64)
        return label_codes(data, schema, site)

    def inputs(
        self,
        data: AnnData,
        site: str,
        schema: FederationSchema,
        *,
        min_overlap: float | None = None,
        **fields,
    ):
        """``site``'s cells as the network reads them: a matrix with ``rows(index)`` (dense float32 input
        rows), ``n_obs`` and ``measured`` (one flag per column: does the site measure it). See
        :meth:`aligned` for the options."""
        return self.aligned(data, site, schema, min_overlap=min_overlap, **fields)

    # ---- the network and what it is trained on ------------------------------------------------------
    def norm(self, *, private: bool) -> Literal["batch", "layer"]:
        """The normalisation of the network: LayerNorm for DP-SGD, whose per-cell gradients BatchNorm mixes."""
        return "layer" if private else "batch"

    def build_network(self, config: ModelConfig) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def trained_parameters(self, network: nn.Module, inputs) -> frozenset[str] | None:
        """The ``state_dict`` entries a site with ``inputs`` (its :meth:`inputs`) trains and sends (None: all)."""
        return None

    def objective(self, config: ModelConfig, measured: np.ndarray | None = None):  # pragma: no cover
        """The loss and metrics of a site measuring the input columns ``measured`` (None: all)."""
        raise NotImplementedError

    # ---- predictions and write-back -----------------------------------------------------------------
    def predictions(
        self, outputs: np.ndarray | None, embedding: np.ndarray, inputs, schema: FederationSchema
    ) -> Predictions:
        """The network's outputs (``head``; None where the task does not use them, :attr:`uses_outputs`) and
        embeddings (``features``) of ``inputs`` as predictions."""
        return Predictions(probabilities=None, embedding=embedding, categories=schema.categories)

    def output_keys(self, key_added: str) -> dict[str, tuple[str, ...]]:
        """What :meth:`write` sets, by AnnData attribute."""
        return {"obsm": (f"X_{key_added}",), "uns": (key_added,)}

    def write(
        self,
        data: Any,
        predictions: Predictions,
        *,
        key_added: str,
        uns: Mapping[str, Any],
        schema: FederationSchema,
    ) -> None:
        """Write ``predictions`` into ``data``, scanpy style, replacing what an earlier model wrote under
        ``key_added`` (with a warning naming what goes)."""
        _clear_other_outputs(data, self.output_keys(key_added), key_added)
        data.obsm[f"X_{key_added}"] = predictions.embedding.astype(np.float32, copy=False)
        # A new entry: an earlier model's (params, dp, ...) goes; a registration under this key stays.
        previous = scinfl_entry(data, "query", key_added)
        data.uns[key_added] = {k: v for k, v in previous.items() if k == "registration"} | dict(uns)

    # ---- the privacy audit --------------------------------------------------------------------------
    def audit_view(self, config: ModelConfig) -> AuditView:
        """What the privacy audit attacks in this task's model (:class:`AuditView`)."""
        return AuditView(output=self.output, objective=self.objective(config))


def _check_overlap(site: str, present: int, total: int, min_overlap: float, what: str = "") -> None:
    if present < min_overlap * total:
        raise ValueError(
            f"Site {site!r} shares only {present} of the model's {total} {what}features "
            f"({present / total:.0%} < min_overlap={min_overlap:.0%}): check the feature identifiers and "
            "where the values are read from (layer, use_raw, modality)."
        )
    if present < total:
        warn(
            f"Site {site!r} lacks {total - present} of the model's {total} {what}features; they are filled "
            "with zeros."
        )


# Every output a task may write under key_added, by attribute; a task's write replaces those of others.
_ALL_OUTPUTS = {
    "obs": ("{}_prediction", "{}_confidence"),
    "obsm": ("{}_probabilities", "X_{}"),
    "layers": ("{}_predicted",),
}


def _clear_other_outputs(data: Any, own: Mapping[str, tuple[str, ...]], key_added: str) -> None:
    stale = []
    for attribute, patterns in _ALL_OUTPUTS.items():
        store = getattr(data, attribute, None)
        if store is None:
            continue
        for pattern in patterns:
            name = pattern.format(key_added)
            if name in store and name not in own.get(attribute, ()):
                stale.append(f".{attribute}[{name!r}]")
                del store[name]
    if stale:
        warn(
            f"Removed {', '.join(stale)}: an earlier model's outputs under key_added={key_added!r}, which this "
            "model does not write. Pass another key_added= to keep both models' outputs."
        )


def _task_class(name: Any) -> type[Task]:
    try:
        return TASKS[str(name)]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; available: {', '.join(TASKS)}.") from None


def get_task(task: str | Task, *, label_key: str | None = None) -> Task:
    """The task ``task`` names (with its default options), or ``task`` itself; ``label_key`` sets the
    label column of a task that has one (the shortcut of ``train_federated(label_key=...)``)."""
    if isinstance(task, str):
        task = _task_class(task)()
    elif not isinstance(task, Task):
        raise TypeError(
            f"task must be a task name ({', '.join(map(repr, TASKS))}) or a scinfl.tasks object, got "
            f"{type(task).__name__}."
        )
    if label_key is not None:
        current = getattr(task, "label_key", None)
        if current is not None and current != label_key:
            raise ValueError(
                f"label_key={label_key!r} and the task's label column {current!r} differ: give it once "
                f"(task={task.name!r})."
            )
        if "label_key" not in {f.name for f in fields(task)}:
            if current is None:
                raise ValueError(f"task={task.name!r} has no label column option: leave label_key= out.")
        else:
            task = task.replace(label_key=label_key)
    return task


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, enough to rebuild the network from saved weights. Holds no key material.

    ``task`` (its options, the network's width and dropout included) and ``schema`` (features,
    categories, modalities, covariates) fix the task network's shape; ``norm`` its normalisation layers
    (``"batch"``, the paper's BatchNorm, or ``"layer"``, LayerNorm, which DP-SGD needs). ``scheme=None`` is the plain
    network (no keyed modules): the FedAvg baseline. ``key_strength`` and the encoder sizes belong to
    ``scheme="infl"``; the ``mixing_*`` fields to ``scheme="hardened"`` (its input mixing's block size,
    rounds and gain range).
    """

    task: Task
    schema: FederationSchema
    norm: Literal["batch", "layer"] = "batch"
    scheme: str | None = None
    key_strength: float = 1.0
    key_dim: int = 16
    encoder_hidden: int = 64
    n_key_points: int = 128
    coordinate_dim: int = 2
    mixing_block: int = 32
    mixing_rounds: int = 2
    mixing_gain: float = 4.0

    @property
    def n_features(self) -> int:
        return self.schema.n_features

    @property
    def n_classes(self) -> int:
        return self.schema.n_classes

    @property
    def hidden(self) -> int:
        return self.task.hidden

    @property
    def dropout(self) -> float:
        return self.task.dropout

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["task"] = self.task.to_dict()
        out["schema"] = self.schema.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        data = dict(data)
        return cls(
            task=Task.from_dict(data.pop("task")),
            schema=FederationSchema.from_dict(data.pop("schema")),
            **data,
        )


def build_network(config: ModelConfig) -> nn.Module:
    """The task network for ``config``, keyed with the config's scheme (or plain when it is None)."""
    network = config.task.build_network(config)
    if config.scheme is None:
        return network
    if config.scheme == "hardened":
        return harden(
            network, block_size=config.mixing_block, rounds=config.mixing_rounds, gain=config.mixing_gain
        )
    if config.scheme != "infl":
        raise ValueError(f"Unknown key scheme {config.scheme!r}; known schemes: {', '.join(SCHEMES)}.")
    return keyify(
        network,
        strength=config.key_strength,
        key_dim=config.key_dim,
        encoder_hidden=config.encoder_hidden,
        coordinate_dim=config.coordinate_dim,
        n_key_points=config.n_key_points,
    )
