"""Cell type or cohort classification: the paper's residual MLP, cross-entropy, accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import FederationSchema
from ..nn import ResidualMLPClassifier
from ._base import ModelConfig, Predictions, Task, register

__all__ = ["Classification", "CrossEntropy"]


class CrossEntropy:
    """The classifier's objective: cross-entropy against the labels (or class probabilities), accuracy."""

    def loss(self, output: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(output, y)

    def metric_sums(self, output: Tensor, x: Tensor, y: Tensor) -> dict[str, float]:
        return {
            "loss": float(F.cross_entropy(output, y, reduction="sum")),
            "accuracy": float((output.argmax(dim=1) == y).sum()),
        }


@register
@dataclass(frozen=True, kw_only=True)
class Classification(Task):
    """Predict each cell's label (cell type, cohort) from its profile.

    Writes ``.obs[f"{key_added}_prediction"]`` (categorical), ``.obs[f"{key_added}_confidence"]``,
    ``.obsm[f"{key_added}_probabilities"]`` (in the order of ``.uns[key_added]["categories"]``) and
    ``.obsm[f"X_{key_added}"]`` (the narrowing layer's activations).

    Parameters
    ----------
    label_key
        ``.obs`` column with the labels; default: each site's registration
        (:func:`scinfl.pp.register_site`). The categories are the union over the sites.
    """

    label_key: str | None = None

    name: ClassVar[str] = "classification"
    output: ClassVar[str] = "classes"
    needs_labels: ClassVar[bool] = True
    uses_outputs: ClassVar[bool] = True

    def build_network(self, config: ModelConfig) -> nn.Module:
        if config.n_classes < 2:
            raise ValueError(
                f"Classification needs at least 2 label categories across the sites, found {config.n_classes}."
            )
        return ResidualMLPClassifier(
            config.n_features, config.n_classes, hidden=self.hidden, dropout=self.dropout, norm=config.norm
        )

    def objective(self, config: ModelConfig, measured: np.ndarray | None = None) -> CrossEntropy:
        return CrossEntropy()

    def predictions(self, outputs: np.ndarray, embedding: np.ndarray, inputs, schema: FederationSchema):
        probabilities = torch.softmax(torch.from_numpy(outputs), dim=1).numpy()
        return Predictions(probabilities=probabilities, embedding=embedding, categories=schema.categories)

    def output_keys(self, key_added: str) -> dict[str, tuple[str, ...]]:
        return classifier_output_keys(self, key_added)

    def write(
        self,
        data,
        predictions: Predictions,
        *,
        key_added: str,
        uns: Mapping[str, Any],
        schema: FederationSchema,
    ) -> None:
        super().write(data, predictions, key_added=key_added, uns=uns, schema=schema)
        write_classes(data, predictions, key_added)


def classifier_output_keys(task: Task, key_added: str) -> dict[str, tuple[str, ...]]:
    """What a classifier writes under ``key_added`` (:meth:`Task.output_keys`): the embedding and the
    classes' predictions, confidence and probabilities."""
    keys = Task.output_keys(task, key_added)
    return keys | {
        "obs": (f"{key_added}_prediction", f"{key_added}_confidence"),
        "obsm": (*keys["obsm"], f"{key_added}_probabilities"),
    }


def write_classes(data, predictions: Predictions, key_added: str) -> None:
    """A classifier's predictions, confidence and probabilities in ``.obs``/``.obsm`` under ``key_added``."""
    data.obs[f"{key_added}_prediction"] = predictions.labels  # categorical, positional
    data.obs[f"{key_added}_confidence"] = predictions.confidence.astype(np.float32, copy=False)
    data.obsm[f"{key_added}_probabilities"] = predictions.probabilities.astype(np.float32, copy=False)
