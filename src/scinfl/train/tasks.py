"""Tasks differ by network, loss and metrics only; everything else is shared."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ResidualMLPClassifier

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = ["TASKS", "ClassificationTask", "Task", "get_task"]


class Task(Protocol):
    name: str
    needs_labels: bool

    def build_network(self, config: ModelConfig) -> nn.Module: ...

    def loss(self, output: Tensor, target: Tensor) -> Tensor: ...

    def metric_sums(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """Per-batch sums of each metric; divided by the cell count after the last batch."""
        ...


class ClassificationTask:
    """Cell type or cohort classification: residual MLP, cross-entropy, accuracy."""

    name = "classification"
    needs_labels = True

    def build_network(self, config: ModelConfig) -> nn.Module:
        if config.n_classes < 2:
            raise ValueError(
                f"Classification needs at least 2 label categories across the sites, found {config.n_classes}."
            )
        return ResidualMLPClassifier(
            config.n_features,
            config.n_classes,
            hidden=config.hidden,
            dropout=config.dropout,
            norm=config.norm,
        )

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def metric_sums(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {
            "loss": float(F.cross_entropy(output, target, reduction="sum")),
            "accuracy": float((output.argmax(dim=1) == target).sum()),
        }

    @staticmethod
    def probabilities(output: Tensor) -> Tensor:
        return torch.softmax(output, dim=1)


TASKS: dict[str, Task] = {"classification": ClassificationTask()}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; available: {', '.join(TASKS)}.") from None
