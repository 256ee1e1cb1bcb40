"""Task networks (pure torch). Each exposes ``features(x)`` (the embedding) and ``head(features)``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .likelihoods import LIKELIHOODS, read_counts

__all__ = [
    "NORMS",
    "Autoencoder",
    "PerturbationNetwork",
    "ResidualBlock",
    "ResidualMLPClassifier",
    "normalization",
]

NORMS = ("batch", "layer")


def normalization(norm: Literal["batch", "layer"], width: int) -> nn.Module:
    """``BatchNorm1d`` (``"batch"``) or ``LayerNorm`` (``"layer"``) over ``width`` features.

    LayerNorm normalises each cell on its own, so a cell's output does not depend on the other cells of
    its batch: what DP-SGD's per-sample gradients require (Opacus rejects BatchNorm).
    """
    if norm == "batch":
        return nn.BatchNorm1d(width)
    if norm == "layer":
        return nn.LayerNorm(width)
    raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}.")


class ResidualBlock(nn.Module):
    """``Norm(x + Linear-Norm-ReLU-Dropout-Linear(x))``, with BatchNorm or LayerNorm as ``Norm``."""

    def __init__(self, width: int, dropout: float, norm: Literal["batch", "layer"] = "batch") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(width, width),
            normalization(norm, width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, width),
        )
        self.norm = normalization(norm, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.body(x))


class ResidualMLPClassifier(nn.Module):
    """The paper's classifier: embedding layer, two residual blocks, a narrowing layer, a head.

    The narrowing layer's activations (``hidden // 2`` units) are the cell embedding (``.obsm["X_scinfl"]``).

    Parameters
    ----------
    n_features
        Number of input features (genes or proteins).
    n_classes
        Number of label categories.
    hidden
        Width of the embedding layer and the residual blocks.
    dropout
        Dropout rate in the blocks and before the head.
    norm
        Normalisation in the residual blocks: ``"batch"`` (BatchNorm, the paper's) or ``"layer"``
        (LayerNorm, in the same places; needed for DP-SGD, whose per-sample gradients BatchNorm breaks).
    """

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        *,
        hidden: int = 256,
        dropout: float = 0.1,
        norm: Literal["batch", "layer"] = "batch",
    ) -> None:
        super().__init__()
        if hidden < 2:
            raise ValueError(f"hidden must be at least 2, got {hidden}.")
        self.embedding = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU())
        self.blocks = nn.Sequential(
            ResidualBlock(hidden, dropout, norm), ResidualBlock(hidden, dropout, norm)
        )
        self.narrow = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden // 2, n_classes)

    def features(self, x: Tensor) -> Tensor:
        """The embedding: activations of the narrowing layer."""
        return self.narrow(self.blocks(self.embedding(x)))

    def head(self, features: Tensor) -> Tensor:
        """Class logits from the embedding."""
        return self.classifier(self.dropout(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# How much faster the negative binomial's per-gene dispersion moves than the network's weights.
DISPERSION_STEP = 10.0


class Autoencoder(nn.Module):
    """An MLP autoencoder: ``features(x)`` is the latent cell embedding, ``head(z)`` its reconstruction.

    Encoder ``Linear-Norm-ReLU-Dropout-Linear`` to ``n_latent`` units; decoder ``Linear-Norm-ReLU-Linear``
    back to the features. ``likelihood`` says what the input is (:mod:`scinfl.nn.likelihoods`):
    ``"gaussian"`` for log-normalised values (the head outputs them), ``"poisson"`` for raw counts (the
    encoder reads ``log1p(x)`` and the head outputs logits of each gene's share of a cell's counts),
    ``"nb"`` for raw counts with a negative binomial (the same logits, then a learned log inverse
    dispersion per gene), ``"clr"`` for counts read and reconstructed as their centred log-ratio.

    Parameters
    ----------
    n_features
        Number of input features.
    n_latent
        Width of the latent embedding.
    hidden
        Width of the encoder's and the decoder's hidden layer.
    dropout
        Dropout in the encoder.
    norm
        ``"batch"`` or ``"layer"`` (see :func:`normalization`).
    likelihood
        ``"gaussian"``, ``"poisson"``, ``"nb"`` or ``"clr"``.
    """

    def __init__(
        self,
        n_features: int,
        *,
        n_latent: int = 16,
        hidden: int = 256,
        dropout: float = 0.1,
        norm: Literal["batch", "layer"] = "batch",
        likelihood: Literal["gaussian", "poisson", "nb", "clr"] = "gaussian",
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}."
            )
        if n_latent < 1 or hidden < 1:
            raise ValueError(f"n_latent and hidden must be positive, got {n_latent} and {hidden}.")
        self.likelihood = likelihood
        self.encoder = nn.Sequential(
            nn.Linear(n_features, hidden),
            normalization(norm, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_latent),
        )
        self.decoder = nn.Sequential(
            nn.Linear(n_latent, hidden), normalization(norm, hidden), nn.ReLU(), nn.Linear(hidden, n_features)
        )
        # "nb": one log inverse dispersion per feature, shared by all cells (scVI's gene-wise dispersion).
        # Outside the decoder's layers, so a key's transforms never touch it: it describes genes, not cells.
        # Stored divided by DISPERSION_STEP: Adam moves a parameter by about lr per step, and a federation's
        # few hundred steps at lr 1e-3 would move log(theta) by a few tenths where genes differ by units.
        self.dispersion = nn.Parameter(torch.zeros(n_features)) if likelihood == "nb" else None

    def features(self, x: Tensor) -> Tensor:
        """The latent embedding."""
        return self.encoder(read_counts(x, self.likelihood))

    def head(self, features: Tensor) -> Tensor:
        """The reconstruction (values, or count-share logits for ``"poisson"``; for ``"nb"``, those logits
        followed by each feature's log inverse dispersion)."""
        logits = self.decoder(features)
        if self.dispersion is None:
            return logits
        log_theta = self.dispersion * DISPERSION_STEP
        return torch.cat([logits, log_theta.expand_as(logits)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class PerturbationNetwork(nn.Module):
    """Predicts a perturbed cell's expression from its site's control profile, the perturbation and the
    covariates: ``control + head(features(inputs))``, so the head learns the change from control.

    Its input rows are ``[observed | control | perturbation one-hot | covariates one-hot]``
    (:class:`scinfl.data.PerturbationMatrix`): the observed profile, the training target, is dropped before
    the first layer, so the network never reads it. Encoder ``Linear-Norm-ReLU-Dropout-Linear-Norm-ReLU``
    (its output is the embedding), head ``Linear`` to the change of every feature.

    Parameters
    ----------
    n_features
        Number of expression features.
    n_perturbations
        Number of perturbation categories (the control included).
    n_covariates
        Width of the covariates' one-hot encoding (0 without covariates).
    hidden
        Width of the encoder's layers.
    dropout
        Dropout in the encoder.
    norm
        ``"batch"`` or ``"layer"`` (see :func:`normalization`).
    """

    def __init__(
        self,
        n_features: int,
        n_perturbations: int,
        n_covariates: int = 0,
        *,
        hidden: int = 256,
        dropout: float = 0.1,
        norm: Literal["batch", "layer"] = "batch",
    ) -> None:
        super().__init__()
        if hidden < 1 or n_perturbations < 2:
            raise ValueError(
                f"hidden must be positive and there must be at least 2 perturbation categories (control "
                f"included), got hidden={hidden} and {n_perturbations} categories."
            )
        self.n_features = n_features
        self.encoder = nn.Sequential(
            nn.Linear(n_features + n_perturbations + n_covariates, hidden),
            normalization(norm, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            normalization(norm, hidden),
            nn.ReLU(),
        )
        self.change = nn.Linear(hidden, n_features)

    def features(self, x: Tensor) -> Tensor:
        """The embedding of a cell's condition (its control profile, perturbation and covariates)."""
        return self.encoder(x[:, self.n_features :])

    def head(self, features: Tensor) -> Tensor:
        """The predicted change from the control profile."""
        return self.change(features)

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.n_features : 2 * self.n_features] + self.head(self.features(x))
