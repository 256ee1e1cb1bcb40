"""The multi-omics mosaic task: reconstruct each of a cell's modalities from its joint latent."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import MosaicMatrix, SiteDataset, batch_loader, site_modalities
from ..nn.mosaic import MosaicAutoencoder, MosaicOutput, clr

if TYPE_CHECKING:
    from ..data import FederationSchema
    from .config import ModelConfig

__all__ = ["MosaicTask", "mosaic_embedding"]


def _reconstruction_losses(
    likelihood: str, output: Tensor, target: Tensor, measured: Tensor | None
) -> Tensor:
    """Per-cell reconstruction loss of one modality (as :class:`~scinfl.train.EmbeddingTask`'s)."""
    from .tasks import EmbeddingTask  # one implementation of the Gaussian and Poisson losses

    if likelihood == "clr":  # a Gaussian loss on the centred log-ratio of the counts
        target = clr(target)
        likelihood = "gaussian"
    return EmbeddingTask(likelihood, measured)._cell_losses(output, target)


class MosaicTask:
    """A joint embedding of several modalities (:class:`~scinfl.nn.MosaicAutoencoder`), without labels.

    A cell's loss is the sum, over the modalities it has, of that modality's reconstruction loss
    (averaged over its features): ``"gaussian"``, the mean squared error; ``"poisson"``, the Poisson
    negative log-likelihood of counts (as :class:`~scinfl.train.EmbeddingTask`); ``"clr"``, the mean squared
    error on the centred log-ratio of counts. For a cell with several modalities it adds
    ``alignment`` times the mean squared distance of each modality's latent to the joint latent, so that one
    modality alone places the cell where all of them do.

    ``measured`` (one flag per input column) restricts each modality's loss to the features the site
    measures (``join="outer"`` zero-fills the others).
    """

    name = "mosaic"
    needs_labels = False

    def __init__(self, alignment: float = 1.0, measured: Tensor | None = None) -> None:
        self.alignment = float(alignment)
        self.measured = None if measured is None else measured.bool()

    def build_network(self, config: ModelConfig) -> nn.Module:
        if not config.modalities:
            raise ValueError("task='mosaic' needs the modalities in the model config.")
        return MosaicAutoencoder(
            config.modalities,
            n_latent=config.n_latent,
            hidden=config.hidden,
            dropout=config.dropout,
            norm=config.norm,
            modality_dropout=config.modality_dropout,
        )

    @staticmethod
    def target(x: Tensor, y: Tensor) -> Tensor:
        return x

    def _cell_losses(self, output: MosaicOutput, target: Tensor) -> Tensor:
        losses = target.new_zeros(len(target))
        for name, rows in output.index.items():
            columns, likelihood = output.columns[name]
            measured = None if self.measured is None else self.measured[columns]
            per_cell = _reconstruction_losses(
                likelihood, output.reconstruction[name], target[rows, columns], measured
            )
            losses = losses.index_add(0, rows, per_cell)
        if self.alignment > 0 and len(output.index) > 1:
            count = target.new_zeros(len(target))
            spread = target.new_zeros(len(target))
            for name, rows in output.index.items():
                distance = (output.latents[name] - output.joint[rows]).pow(2).mean(dim=1)
                spread = spread.index_add(0, rows, distance)
                count = count.index_add(0, rows, torch.ones_like(distance))
            losses = losses + self.alignment * torch.where(count > 1, spread, 0.0)
        return losses

    def loss(self, output: MosaicOutput, target: Tensor) -> Tensor:
        return self._cell_losses(output, target).mean()

    def metric_sums(self, output: MosaicOutput, target: Tensor) -> dict[str, float]:
        return {"loss": float(self._cell_losses(output, target).sum())}


def mosaic_embedding(
    network: nn.Module,
    schema: FederationSchema,
    data: Any,
    *,
    key_material,
    batch_size: int = 1024,
    min_overlap: float = 0.5,
    site: str = "query",
    modality: str | None = None,
) -> np.ndarray:
    """The joint latent of every cell of ``data`` (a MuData, or an AnnData holding ``modality``).

    Each modality the model knows is aligned to its features by name: a modality holding fewer than
    ``min_overlap`` of them raises, fewer than all warns (they are zero-filled). Modalities the model does
    not know are ignored with a warning; a cell is embedded from the modalities it has.
    """
    modalities = site_modalities(data, site, modality)
    known = {name for name, _ in schema.modalities}
    unknown = sorted(set(modalities) - known)
    if unknown and not set(modalities) & known:
        raise ValueError(
            f"Site {site!r} holds modality {', '.join(map(repr, unknown))}, which the model does not know "
            f"(it knows {', '.join(map(repr, sorted(known)))}); name an AnnData's modality with modality=."
        )
    if unknown:
        warnings.warn(
            f"Site {site!r}: the model does not know modality {', '.join(map(repr, unknown))}; it is ignored.",
            UserWarning,
            stacklevel=3,
        )
    if data.n_obs == 0:
        raise ValueError(f"Site {site!r} has no cells.")
    matrix = MosaicMatrix(modalities, schema, data.n_obs, site)
    for name in matrix.modalities:
        present, total = matrix.present(name)
        if present < min_overlap * total:
            raise ValueError(
                f"Site {site!r} shares only {present} of the model's {total} {name!r} features "
                f"({present / total:.0%} < min_overlap={min_overlap:.0%}): check the feature identifiers."
            )
        if present < total:
            warnings.warn(
                f"Site {site!r} lacks {total - present} of the model's {total} {name!r} features; they are "
                "filled with zeros.",
                UserWarning,
                stacklevel=3,
            )
    matrix.check_finite()
    from .local import infer  # here: local.py imports tasks.py, which imports this module

    loader = batch_loader(SiteDataset(matrix, np.arange(data.n_obs)), batch_size=batch_size, shuffle=False)
    return infer(network, loader, key_material=key_material)[1]
