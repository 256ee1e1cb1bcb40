"""Per-cell reconstruction losses, shared by every task that reconstructs values (pure torch).

Each returns one loss per cell, averaged over its features (those ``measured`` by the cell's site, when a
mask is given: with ``join="outer"`` a feature outside a site's panel is zero-filled in the input and must
not be read as zero expression). Torch's own losses do the arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import NegativeBinomial

__all__ = ["LIKELIHOODS", "cell_losses", "clr", "read_counts"]

# "gaussian": values (e.g. log-normalised) read and reconstructed as they are, mean squared error.
# "poisson": raw counts; the network reads log1p(x) and outputs logits of each feature's share of the cell's
#   counts (rates: share x library size, as scVI's decoder), Poisson negative log-likelihood up to log(x!).
# "nb": raw counts, as "poisson" with a negative binomial of one inverse dispersion per feature (scVI's
#   gene-wise dispersion): the output holds the share logits, then each feature's log inverse dispersion;
#   the whole negative log-likelihood (torch.distributions.NegativeBinomial).
# "clr": raw counts read and reconstructed as their per-cell centred log-ratio (the usual ADT transform),
#   mean squared error.
LIKELIHOODS = ("gaussian", "poisson", "nb", "clr")


def clr(x: Tensor) -> Tensor:
    """Centred log-ratio of counts, per cell: ``log1p(x) - mean_j log1p(x_j)`` (the usual ADT transform)."""
    logged = torch.log1p(x)
    return logged - logged.mean(dim=1, keepdim=True)


def read_counts(x: Tensor, likelihood: str) -> Tensor:
    """What a network's first layer reads of input ``x`` under ``likelihood``."""
    if likelihood in ("poisson", "nb"):
        return torch.log1p(x)
    if likelihood == "clr":
        return clr(x)
    return x


def cell_losses(likelihood: str, output: Tensor, target: Tensor, measured: Tensor | None = None) -> Tensor:
    """Per-cell loss of ``output`` against ``target``: values, count-share logits (``"poisson"``), or for
    ``"nb"`` the share logits followed by each feature's log inverse dispersion (``2 x n_features``).

    ``measured`` (one flag per feature) restricts the loss to the features a site measures; the count
    shares are then normalised over the measured features. Count losses leave out ``log(x!)``, which does
    not depend on the model.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}."
        )
    log_theta = None
    if likelihood == "nb":
        output, log_theta = output.chunk(2, dim=1)
    if measured is not None and not bool(measured.all()):
        output, target = output[:, measured], target[:, measured]
        log_theta = None if log_theta is None else log_theta[:, measured]
    if likelihood == "clr":
        target = clr(target)
    if likelihood == "gaussian" or likelihood == "clr":
        return F.mse_loss(output, target, reduction="none").mean(dim=1)
    library = target.sum(dim=1, keepdim=True).clamp_min(1e-8)
    log_rate = torch.log_softmax(output, dim=1) + torch.log(library)
    if likelihood == "poisson":
        return F.poisson_nll_loss(log_rate, target, log_input=True, full=False, reduction="none").mean(dim=1)
    # Negative binomial with mean mu and inverse dispersion theta (scVI's): torch's, whose logits are
    # log(mu / theta). The whole log-likelihood, log(x!) included, so the loss is a real negative
    # log-likelihood (positive); its gradient is that of the hand-written form it replaced.
    counts = NegativeBinomial(total_count=log_theta.exp(), logits=log_rate - log_theta, validate_args=False)
    return -counts.log_prob(target).mean(dim=1)
