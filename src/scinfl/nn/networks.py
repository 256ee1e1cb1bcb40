"""Task networks (pure torch). Each exposes ``features(x)`` (the embedding) and ``head(features)``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .likelihoods import LIKELIHOODS, read_counts

__all__ = [
    "NORMS",
    "Autoencoder",
    "BatchwiseNorm",
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


class BatchwiseNorm(nn.Module):
    """BatchNorm with running statistics of its own for each batch (site), and one shared affine map.

    Domain-specific BatchNorm (Chang et al. 2019; FedBN, Li et al. 2021, for federations): a cell is
    normalised by the statistics of its own batch, in training (those of its batch's cells in the
    mini-batch) and in evaluation (its batch's running statistics), so that a shift of a whole batch's
    activations never reaches the next layer. A cell of a batch the module does not know (an all-zero
    one-hot) is normalised by the mean of the known batches' statistics. Each batch's statistics are their
    own buffers (``running_mean_<i>``, ``running_var_<i>``), which a federation leaves to that batch's site.

    ``forward(x, batches)`` takes the cells' batch one-hot rows.
    """

    def __init__(self, width: int, n_batches: int, *, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if n_batches < 1:
            raise ValueError(f"BatchwiseNorm needs at least one batch, got {n_batches}.")
        self.n_batches, self.momentum, self.eps = n_batches, momentum, eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        for i in range(n_batches):
            self.register_buffer(f"running_mean_{i}", torch.zeros(width))
            self.register_buffer(f"running_var_{i}", torch.ones(width))

    def _statistics(self, name: str) -> Tensor:
        return torch.stack([getattr(self, f"{name}_{i}") for i in range(self.n_batches)])

    def forward(self, x: Tensor, batches: Tensor) -> Tensor:
        known = batches.sum(dim=1, keepdim=True)
        means, variances = self._statistics("running_mean"), self._statistics("running_var")
        mean = batches @ means + (1 - known) * means.mean(dim=0)
        variance = batches @ variances + (1 - known) * variances.mean(dim=0)
        if self.training:
            codes = torch.where(known[:, 0] > 0, batches.argmax(dim=1), -1)
            mean, variance = mean.clone(), variance.clone()
            for code in torch.unique(codes).tolist():
                rows = codes == code
                count = int(rows.sum())
                if count < 2:  # one cell has no spread: it keeps its batch's running statistics
                    continue
                values = x[rows]
                batch_mean, batch_variance = values.mean(dim=0), values.var(dim=0, unbiased=False)
                mean[rows], variance[rows] = batch_mean, batch_variance
                if code >= 0:
                    with torch.no_grad():
                        running_mean = getattr(self, f"running_mean_{code}")
                        running_var = getattr(self, f"running_var_{code}")
                        running_mean.lerp_(batch_mean.detach(), self.momentum)
                        running_var.lerp_(batch_variance.detach() * count / (count - 1), self.momentum)
        return (x - mean) / torch.sqrt(variance + self.eps) * self.weight + self.bias


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
# How much faster a batch's decoder shift moves: it acts on normalised units (scale 1), where Adam's steps
# of about lr would take the whole run to shift a unit by a fraction of its spread.
BATCH_SHIFT_STEP = 10.0


class Autoencoder(nn.Module):
    """An MLP autoencoder: ``features(x)`` is the latent cell embedding, ``head(z)`` its reconstruction.

    Encoder ``Linear-Norm-ReLU-Dropout-Linear`` to ``n_latent`` units; decoder ``Linear-Norm-ReLU-Linear``
    back to the features. ``likelihood`` says what the input is (:mod:`scinfl.nn.likelihoods`):
    ``"gaussian"`` for log-normalised values (the head outputs them), ``"poisson"`` for raw counts (the
    encoder reads ``log1p(x)`` and the head outputs logits of each gene's share of a cell's counts),
    ``"nb"`` for raw counts with a negative binomial (the same logits, then a learned log inverse
    dispersion per gene), ``"clr"`` for counts read and reconstructed as their centred log-ratio.

    With ``n_batches``, the network is aware of each cell's batch (its site): an input row is
    ``[features | batch one-hot]``, and

    - the encoder's first layer reads the features only; its normalisation is a :class:`BatchwiseNorm`
      (with ``norm="batch"``): each batch's cells are normalised by that batch's own statistics, so that a
      shift of a whole batch's activations does not reach the latent;
    - the decoder is conditioned on the batch, as scVI's: its hidden layer is normalised batch-wise too,
      then the batch's own shift is added (before the ReLU), so that what differs between batches is
      explained there, not in the latent.

    Each batch's shift (``batch_shifts.<i>``) and statistics are its own entries, so that a federation can
    leave them to the sites holding that batch. A row whose one-hot is all zeros (a batch the model does
    not know) is normalised by the mean of the known batches' statistics and decoded without a shift.

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
    n_batches
        Number of batches the network knows (0: none; see above).
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
        n_batches: int = 0,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}."
            )
        if n_latent < 1 or hidden < 1:
            raise ValueError(f"n_latent and hidden must be positive, got {n_latent} and {hidden}.")
        if n_batches < 0:
            raise ValueError(f"n_batches must be non-negative, got {n_batches}.")
        self.likelihood = likelihood
        self.n_features = n_features
        self.n_batches = n_batches

        def hidden_norm() -> nn.Module:
            if n_batches and norm == "batch":
                return BatchwiseNorm(hidden, n_batches)
            return normalization(norm, hidden)

        self.encoder = nn.Sequential(
            nn.Linear(n_features, hidden),
            hidden_norm(),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_latent),
        )
        self.decoder = nn.Sequential(
            nn.Linear(n_latent, hidden), hidden_norm(), nn.ReLU(), nn.Linear(hidden, n_features)
        )
        # "nb": one log inverse dispersion per feature, shared by all cells (scVI's gene-wise dispersion).
        # Outside the decoder's layers, so a key's transforms never touch it: it describes genes, not cells.
        # Stored divided by DISPERSION_STEP: Adam moves a parameter by about lr per step, and a federation's
        # few hundred steps at lr 1e-3 would move log(theta) by a few tenths where genes differ by units.
        self.dispersion = nn.Parameter(torch.zeros(n_features)) if likelihood == "nb" else None
        # One hidden-layer shift per batch (scVI injects a batch one-hot into its decoder's layer: the same
        # function). Added after the normalisation: a federated site's batches hold its own cells only, and
        # BatchNorm would subtract a shift shared by every cell of a batch before it could act.
        self.batch_shifts = nn.ParameterList(nn.Parameter(torch.zeros(hidden)) for _ in range(n_batches))

    @property
    def input_width(self) -> int:
        """Columns of an input row: the features, then the batch one-hot."""
        return self.n_features + self.n_batches

    def _batches(self, x: Tensor) -> Tensor | None:
        if not self.n_batches:
            return None
        if x.shape[1] != self.input_width:
            raise ValueError(
                f"An input row has {self.input_width} columns ({self.n_features} features and "
                f"{self.n_batches} batch flags), got shape {tuple(x.shape)}."
            )
        return x[:, self.n_features :]

    @staticmethod
    def _norm(norm: nn.Module, hidden: Tensor, batches: Tensor | None) -> Tensor:
        if isinstance(norm, BatchwiseNorm):
            return norm(
                hidden, batches if batches is not None else hidden.new_zeros(len(hidden), norm.n_batches)
            )
        return norm(hidden)

    def features(self, x: Tensor) -> Tensor:
        """The latent embedding (the first layer reads the features; the batch flags only choose the
        statistics of the normalisation)."""
        linear, norm, activation, dropout, output = self.encoder
        batches = self._batches(x)
        hidden = self._norm(norm, linear(read_counts(x[:, : self.n_features], self.likelihood)), batches)
        return output(dropout(activation(hidden)))

    def decode(self, features: Tensor, batches: Tensor | None = None) -> Tensor:
        """The reconstruction from the latent (values, or count-share logits for ``"poisson"``; for
        ``"nb"``, those logits followed by each feature's log inverse dispersion), in the batches of the
        one-hot rows ``batches`` (None: no known batch)."""
        linear, norm, activation, output = self.decoder
        hidden = self._norm(norm, linear(features), batches)
        if batches is not None and self.n_batches:
            hidden = hidden + batches @ torch.stack(tuple(self.batch_shifts)) * BATCH_SHIFT_STEP
        logits = output(activation(hidden))
        if self.dispersion is None:
            return logits
        log_theta = self.dispersion * DISPERSION_STEP
        return torch.cat([logits, log_theta.expand_as(logits)], dim=1)

    def head(self, features: Tensor) -> Tensor:
        """The reconstruction in no known batch (see :meth:`decode`)."""
        return self.decode(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.features(x), self._batches(x))


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
