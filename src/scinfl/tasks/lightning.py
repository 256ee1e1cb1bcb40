"""Your own LightningModule, federated with a key: its linear layers become keyed plug-and-play modules.

The module is named by its import path (``"package.module:ClassName"``; a class is accepted and stored as
its path), so that every site and a saved model can build it again; on a deployment each site must be
able to import it. scinfl builds it as ``ClassName(n_features=..., n_classes=..., **options)`` and keys it
like any task network (:func:`scinfl.nn.keyify` or :func:`scinfl.nn.harden`, by the key's scheme).

What the module provides, as in any Lightning code:

- ``forward(x)``: a batch of input rows (cells x the federation's features, float32) to its output;
- ``training_step(batch, batch_idx)``: the loss of ``batch = (x, y)``, ``y`` each cell's label code (zeros
  without a label column). scinfl calls it inside its own loop, under the key; ``self.log`` has no
  ``Trainer`` there (Lightning warns and ignores it): sites' metrics reach ``scinfl.settings.logger``;
- optionally ``features(x)`` and ``head(features)``: the embedding written to ``.obsm`` and the output
  computed from it. Without them the embedding is the forward output.

With labels (``label_key`` or the sites' registration), the forward output is read as class logits: the
predictions, their confidence and probabilities land in ``.obs``/``.obsm`` as a classification's do, and
validation reports accuracy beside the module's loss. The privacy audit does not attack such a model yet
(its attack families assume scinfl's own objectives), and DP-SGD is not offered.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..data import FederationSchema
from ..nn import KeyedModule
from ._base import AuditView, ModelConfig, Predictions, Task, register
from .classification import classifier_output_keys, write_classes

__all__ = ["Lightning", "ModuleSteps", "UserNetwork"]


def _call(network: nn.Module, method: str, *args: Any) -> Any:
    """``network.<method>(*args)``, under the key where the network is keyed."""
    if isinstance(network, KeyedModule):
        return network.call(method, *args)
    return getattr(network, method)(*args)


class UserNetwork(nn.Module):
    """A user's module as scinfl's predictions read a task network: ``features`` and ``head``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def _split(self) -> bool:
        return callable(getattr(self.module, "features", None)) and callable(
            getattr(self.module, "head", None)
        )

    def features(self, x: Tensor) -> Tensor:
        return self.module.features(x) if self._split() else self.module(x)

    def head(self, features: Tensor) -> Tensor:
        return self.module.head(features) if self._split() else features

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.module.training_step(batch, batch_idx)
        loss = loss["loss"] if isinstance(loss, Mapping) else loss
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError(
                f"{type(self.module).__name__}.training_step must return the batch's loss (a scalar tensor, or a "
                f"dict with 'loss'), got {type(loss).__name__}."
            )
        return loss


class ModuleSteps:
    """The objective of a user's module: its own ``training_step``, and accuracy where there are classes.

    It computes from the network and the batch (``step_loss``, ``step_metric_sums``), not from an output
    computed beforehand: the module's step runs its own forward pass."""

    def __init__(self, classes: bool) -> None:
        self.classes = classes

    def step_loss(self, network: nn.Module, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return _call(network, "training_step", batch, batch_idx)

    def step_metric_sums(
        self, network: nn.Module, batch: tuple[Tensor, Tensor], batch_idx: int
    ) -> dict[str, float]:
        x, y = batch
        sums = {"loss": float(self.step_loss(network, batch, batch_idx)) * len(x)}
        if self.classes:
            sums["accuracy"] = float((_call(network, "forward", x).argmax(dim=1) == y).sum())
        return sums


def _import_path(module: Any) -> str:
    if isinstance(module, str):
        if ":" not in module:
            raise ValueError(f"module={module!r}: give the import path as 'package.module:ClassName'.")
        return module
    if isinstance(module, type):
        return f"{module.__module__}:{module.__qualname__}"
    raise TypeError(
        f"module must be a LightningModule class or its 'package.module:ClassName', got {module!r}."
    )


@register
@dataclass(frozen=True, kw_only=True)
class Lightning(Task):
    """Federate your own ``lightning.LightningModule`` with a key (see the module docstring).

    ``hidden`` and ``dropout`` (every task's options) are not used: the module has its own.

    Parameters
    ----------
    module
        The LightningModule class, or its import path ``"package.module:ClassName"``.
    options
        Keyword arguments of its constructor besides ``n_features`` and ``n_classes`` (JSON-able: they
        travel in the run config and the saved model).
    label_key
        ``.obs`` column with the labels; default: each site's registration. Without labels the module
        is an embedding model (``n_classes=0``).
    """

    module: str = ""
    options: str = "{}"
    label_key: str | None = None

    name: ClassVar[str] = "lightning"
    output: ClassVar[str] = "embedding"
    supports_dp: ClassVar[bool] = False
    uses_outputs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "module", _import_path(self.module))
        options = self.options
        try:
            if isinstance(options, Mapping | tuple):
                options = json.dumps(dict(options), sort_keys=True)
            if not isinstance(json.loads(options), dict):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"options must be JSON-able keyword arguments, got {self.options!r}.") from None
        object.__setattr__(self, "options", options)

    def module_class(self) -> type:
        """The module's class, imported (an error names the path)."""
        from lightning.pytorch import LightningModule

        package, _, name = self.module.partition(":")
        try:
            found: Any = importlib.import_module(package)
            for part in name.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"si.tasks.Lightning cannot import module={self.module!r} ({err}). On a deployment, install it "
                "at every site."
            ) from None
        if not (isinstance(found, type) and issubclass(found, LightningModule)):
            raise TypeError(f"module={self.module!r} is not a lightning.LightningModule subclass.")
        return found

    def build_network(self, config: ModelConfig) -> nn.Module:
        module = self.module_class()(
            n_features=config.n_features, n_classes=config.n_classes, **json.loads(self.options)
        )
        return UserNetwork(module)

    def objective(self, config: ModelConfig, measured: np.ndarray | None = None) -> ModuleSteps:
        return ModuleSteps(classes=config.n_classes >= 2)

    def predictions(self, outputs: np.ndarray, embedding: np.ndarray, inputs, schema: FederationSchema):
        if schema.n_classes < 2:
            return Predictions(probabilities=None, embedding=embedding, categories=schema.categories)
        probabilities = torch.softmax(torch.from_numpy(outputs), dim=1).numpy()
        return Predictions(probabilities=probabilities, embedding=embedding, categories=schema.categories)

    def output_keys(self, key_added: str) -> dict[str, tuple[str, ...]]:
        return classifier_output_keys(self, key_added)  # what it may write, with classes or without

    def write(
        self, data, predictions: Predictions, *, key_added: str, uns: Mapping[str, Any], schema
    ) -> None:
        super().write(data, predictions, key_added=key_added, uns=uns, schema=schema)
        if predictions.probabilities is not None:
            write_classes(data, predictions, key_added)

    def audit_view(self, config: ModelConfig) -> AuditView:
        raise ValueError(
            "The privacy audit does not attack models of si.tasks.Lightning yet: its attack families assume "
            "scinfl's own objectives. Audit the same data with a built-in task to judge the key."
        )
