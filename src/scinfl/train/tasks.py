"""Tasks differ by network, loss and metrics only; everything else is shared."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import LIKELIHOODS, Autoencoder, PerturbationNetwork, ResidualMLPClassifier
from .mosaic import MosaicTask

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = ["TASKS", "ClassificationTask", "EmbeddingTask", "PerturbationTask", "Task", "get_task"]


class Task(Protocol):
    name: str
    needs_labels: bool

    def build_network(self, config: ModelConfig) -> nn.Module: ...

    def target(self, x: Tensor, y: Tensor) -> Tensor:
        """What the network's output is scored against, from a batch's inputs and labels."""
        ...

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

    @staticmethod
    def target(x: Tensor, y: Tensor) -> Tensor:
        return y

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


class EmbeddingTask:
    """A cell embedding without labels: an autoencoder whose latent is the embedding.

    The loss suits the input (``config.likelihood``): ``"gaussian"``, the mean squared error on
    log-normalised values; ``"poisson"``, the Poisson negative log-likelihood of raw counts, with rates
    ``softmax(output) * library size`` (each gene's share of the cell's observed total, as scVI's decoder
    does), up to the constant ``log(x!)``. Both are averaged over genes and cells.

    ``measured`` (one flag per feature) restricts the loss to the features a site measures: with
    ``join="outer"`` a gene outside the site's panel is zero-filled in the input, and must not be read as
    zero expression by the loss. The Poisson shares are then normalised over the measured genes.
    """

    name = "embedding"
    needs_labels = False

    def __init__(self, likelihood: str = "gaussian", measured: Tensor | None = None) -> None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}."
            )
        self.likelihood = likelihood
        self.measured = None if measured is None or bool(measured.all()) else measured.bool()

    def build_network(self, config: ModelConfig) -> nn.Module:
        return Autoencoder(
            config.n_features,
            n_latent=config.n_latent,
            hidden=config.hidden,
            dropout=config.dropout,
            norm=config.norm,
            likelihood=config.likelihood,
        )

    @staticmethod
    def target(x: Tensor, y: Tensor) -> Tensor:
        return x

    def _cell_losses(self, output: Tensor, target: Tensor) -> Tensor:
        if self.measured is not None:
            output, target = output[:, self.measured], target[:, self.measured]
        if self.likelihood == "gaussian":
            return (output - target).pow(2).mean(dim=1)
        log_share = torch.log_softmax(output, dim=1)
        library = target.sum(dim=1, keepdim=True)
        rate = log_share.exp() * library
        return (rate - target * (log_share + torch.log(library.clamp_min(1e-8)))).mean(dim=1)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return self._cell_losses(output, target).mean()

    def metric_sums(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {"loss": float(self._cell_losses(output, target).sum())}


class PerturbationTask:
    """Perturbation response: predict each cell's expression from its site's control profile, its
    perturbation and its covariates (:class:`~scinfl.nn.PerturbationNetwork`); mean squared error.

    A batch's rows are ``[observed | control | perturbation | covariates]``
    (:class:`~scinfl.data.PerturbationMatrix`); the target is the observed profile, its first
    ``n_features`` columns. ``measured`` restricts the loss to the features a site measures, as for
    :class:`EmbeddingTask`. The loss is per cell; its optimum is each condition's mean profile, the level at
    which perturbation effects are scored (:func:`scinfl.tl.score_perturbation`).
    """

    name = "perturbation"
    needs_labels = True

    def __init__(self, n_features: int, measured: Tensor | None = None) -> None:
        self.n_features = n_features
        self.measured = None if measured is None or bool(measured.all()) else measured.bool()

    def build_network(self, config: ModelConfig) -> nn.Module:
        return PerturbationNetwork(
            config.n_features,
            config.n_classes,
            config.n_covariates,
            hidden=config.hidden,
            dropout=config.dropout,
            norm=config.norm,
        )

    def target(self, x: Tensor, y: Tensor) -> Tensor:
        return x[:, : self.n_features]

    def _cell_losses(self, output: Tensor, target: Tensor) -> Tensor:
        if self.measured is not None:
            output, target = output[:, self.measured], target[:, self.measured]
        return (output - target).pow(2).mean(dim=1)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return self._cell_losses(output, target).mean()

    def metric_sums(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {"loss": float(self._cell_losses(output, target).sum())}


TASKS: dict[str, type] = {
    "classification": ClassificationTask,
    "embedding": EmbeddingTask,
    "perturbation": PerturbationTask,
    "mosaic": MosaicTask,  # multi-omics sites (train/mosaic.py)
}


def get_task(
    name: str, *, likelihood: str = "gaussian", measured: Tensor | None = None, n_features: int = 0
) -> Task:
    """The task called ``name``. ``likelihood`` shapes the embedding task's reconstruction loss;
    ``measured`` (the features a site measures) restricts the embedding's, perturbation's and mosaic's
    losses;
    ``n_features`` is the perturbation task's profile width."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; available: {', '.join(TASKS)}.") from None
    if cls is EmbeddingTask:
        return cls(likelihood, measured)
    if cls is PerturbationTask:
        return cls(n_features, measured)
    if cls is MosaicTask:
        return cls(measured=measured)
    return cls()
