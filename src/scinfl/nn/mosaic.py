"""The multi-omics mosaic network (pure torch): one encoder and one decoder per modality, a joint latent.

A cell's input row is the concatenation of every modality's features (zeros where the cell lacks the
modality) followed by one presence flag per modality (1 if the cell has it). Each modality's encoder reads
only its own features, and only for the cells that have that modality; a cell's joint latent is the mean
of its modalities' latents; each modality's decoder reconstructs that modality from the joint latent, for
the cells that have it. A module of a modality that no cell of a batch has is not run at all, so it gets
no gradient (``.grad`` stays None) and an optimiser leaves it untouched, weight decay included: a site
trains only the encoders and decoders of the modalities it holds.

Alignment across modalities: in training, a cell with several modalities is encoded, with probability
``modality_dropout``, from one of its modalities only (drawn at random), and still reconstructs all of
them. A single modality's encoder thus learns to place the cell where the joint latent would, which is what
lets cells measured with one modality land next to cells of the same type measured with several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .likelihoods import LIKELIHOODS, read_counts
from .networks import normalization

__all__ = ["MOSAIC_LIKELIHOODS", "MosaicAutoencoder", "MosaicOutput", "modality_parameter_names"]

# A mosaic's decoders output values or count-share logits only: no dispersion of a negative binomial yet.
MOSAIC_LIKELIHOODS = tuple(likelihood for likelihood in LIKELIHOODS if likelihood != "nb")


@dataclass
class MosaicOutput:
    """What a mosaic forward pass gives the loss.

    Attributes
    ----------
    index
        Per modality, the batch rows (cells) that have it.
    reconstruction
        Per modality, its reconstruction for those rows (values, or count-share logits for
        ``"poisson"``), decoded from the latent each cell was encoded to in this pass.
    latents
        Per modality, its encoder's latent for those rows.
    joint
        ``(n_cells, n_latent)``: the mean of each cell's modality latents.
    columns
        Per modality, its input columns and its likelihood (what the loss compares with what).
    """

    index: dict[str, Tensor]
    reconstruction: dict[str, Tensor]
    latents: dict[str, Tensor]
    joint: Tensor
    columns: dict[str, tuple[slice, str]]


class MosaicAutoencoder(nn.Module):
    """One encoder per modality into a joint latent, one decoder per modality (see the module docstring).

    ``features(x)`` is the joint latent (the cell embedding); ``head(z)`` decodes every modality from it
    (concatenated in the modalities' order); ``forward(x)`` returns a :class:`MosaicOutput` for the loss
    (:class:`scinfl.tasks.Mosaic`).

    Parameters
    ----------
    modalities
        ``(name, n_features, likelihood)`` per modality, in input order. ``likelihood``: ``"gaussian"``
        (normalised values, read and reconstructed as they are), ``"poisson"`` (raw counts: the encoder
        reads ``log1p(x)``, the decoder gives logits of each feature's share of the cell's counts) or
        ``"clr"`` (raw counts, e.g. ADT: read and reconstructed as their centred log-ratio); see
        :mod:`scinfl.nn.likelihoods`.
    n_latent
        Width of the joint latent.
    hidden
        Width of every encoder's and decoder's hidden layer.
    dropout
        Dropout in the encoders.
    norm
        ``"batch"`` or ``"layer"``. With ``"batch"`` a modality held by a single cell of a training batch
        cannot be normalised; scinfl trains mosaic networks with ``"layer"``.
    modality_dropout
        In training, the probability that a cell with several modalities is encoded from one of them only.
    """

    def __init__(
        self,
        modalities: Sequence[tuple[str, int, str]],
        *,
        n_latent: int = 16,
        hidden: int = 256,
        dropout: float = 0.1,
        norm: Literal["batch", "layer"] = "layer",
        modality_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        modalities = [(str(name), int(n), str(lik)) for name, n, lik in modalities]
        if not modalities:
            raise ValueError("A mosaic network needs at least one modality.")
        names = [name for name, _, _ in modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"Modality names repeat: {names}.")
        for name, n, likelihood in modalities:
            if likelihood not in MOSAIC_LIKELIHOODS:
                raise ValueError(
                    f"Modality {name!r}: likelihood must be one of {', '.join(map(repr, MOSAIC_LIKELIHOODS))}, "
                    f"got {likelihood!r}."
                )
            if n < 1:
                raise ValueError(f"Modality {name!r} has no features.")
        if n_latent < 1 or hidden < 1:
            raise ValueError(f"n_latent and hidden must be positive, got {n_latent} and {hidden}.")
        if not 0.0 <= modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {modality_dropout}.")
        self.modalities = tuple(modalities)
        self.n_latent = int(n_latent)
        self.modality_dropout = float(modality_dropout)
        starts, start = [], 0
        for _, n, _ in modalities:
            starts.append(start)
            start += n
        self._slices = {name: slice(s, s + n) for (name, n, _), s in zip(modalities, starts, strict=True)}
        self.n_features = start  # the modalities' features; the input has one presence flag per modality more
        # Module order: every encoder (each starting with the layer that reads its modality), then decoders.
        self.encoders = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Linear(n, hidden),
                    normalization(norm, hidden),
                    nn.ReLU(),
                    nn.Dropout(dropout),
                    nn.Linear(hidden, n_latent),
                )
                for name, n, _ in modalities
            }
        )
        self.decoders = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Linear(n_latent, hidden), normalization(norm, hidden), nn.ReLU(), nn.Linear(hidden, n)
                )
                for name, n, _ in modalities
            }
        )

    @property
    def input_width(self) -> int:
        """Columns of an input row: every modality's features, then one presence flag per modality."""
        return self.n_features + len(self.modalities)

    @property
    def input_layers(self) -> tuple[str, ...]:
        """Names (in this module) of the layers that read a modality's raw features, in modality order."""
        return tuple(f"encoders.{name}.0" for name, _, _ in self.modalities)

    def modality_slice(self, name: str) -> slice:
        """The columns of modality ``name`` in an input row."""
        return self._slices[name]

    def _check(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.input_width:
            raise ValueError(
                f"A mosaic input row has {self.input_width} columns (features of "
                f"{', '.join(n for n, _, _ in self.modalities)} and one presence flag each), got shape "
                f"{tuple(x.shape)}."
            )

    def _encode(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per modality, the rows that have it and their latents; absent modalities are not run."""
        self._check(x)
        flags = x[:, self.n_features :]
        index, latents = {}, {}
        for i, (name, _, likelihood) in enumerate(self.modalities):
            rows = torch.nonzero(flags[:, i] > 0.5, as_tuple=True)[0]
            if not len(rows):
                continue
            values = read_counts(x[rows, self._slices[name]], likelihood)
            index[name], latents[name] = rows, self.encoders[name](values)
        return index, latents

    def _joint(self, n: int, index: dict[str, Tensor], latents: dict[str, Tensor], like: Tensor) -> Tensor:
        total = like.new_zeros(n, self.n_latent)
        count = like.new_zeros(n, 1)
        for name, rows in index.items():
            total = total.index_add(0, rows, latents[name])
            count = count.index_add(0, rows, like.new_ones(len(rows), 1))
        return total / count.clamp_min(1.0)

    def features(self, x: Tensor) -> Tensor:
        """The joint latent: the mean of the latents of each cell's modalities (zeros for a cell with none)."""
        index, latents = self._encode(x)
        return self._joint(len(x), index, latents, x)

    def head(self, features: Tensor) -> Tensor:
        """Every modality decoded from the joint latent, concatenated in the modalities' order."""
        return torch.cat([self.decoders[name](features) for name, _, _ in self.modalities], dim=1)

    def forward(self, x: Tensor) -> MosaicOutput:
        index, latents = self._encode(x)
        joint = self._joint(len(x), index, latents, x)
        code = joint
        if self.training and self.modality_dropout > 0 and len(index) > 1:
            # Cells with several modalities: with probability modality_dropout, encoded from one only.
            names = list(index)
            held = torch.zeros(len(x), len(names), dtype=torch.bool, device=x.device)
            for j, name in enumerate(names):
                held[index[name], j] = True
            several = held.sum(dim=1) > 1
            drop = several & (torch.rand(len(x), device=x.device) < self.modality_dropout)
            if bool(drop.any()):
                # One of each dropped cell's modalities, uniformly: the held one with the largest noise.
                pick = torch.where(held, torch.rand(len(x), len(names), device=x.device), -1.0).argmax(dim=1)
                single = joint.new_zeros(joint.shape)
                for j, name in enumerate(names):
                    chosen = pick[index[name]] == j
                    single = single.index_add(0, index[name][chosen], latents[name][chosen])
                code = torch.where(drop[:, None], single, joint)
        reconstruction = {name: self.decoders[name](code[rows]) for name, rows in index.items()}
        columns = {name: (self._slices[name], likelihood) for name, _, likelihood in self.modalities}
        return MosaicOutput(
            index=index, reconstruction=reconstruction, latents=latents, joint=joint, columns=columns
        )


def modality_parameter_names(network: nn.Module, modalities: Sequence[str]) -> frozenset[str]:
    """The ``state_dict`` entries of ``network`` that a site holding ``modalities`` trains and sends.

    Everything except the encoders and decoders of the other modalities of the :class:`MosaicAutoencoder`
    inside ``network`` (itself, or wrapped by a keyed network). Key modules are shared by every site.
    """
    found = [(name, m) for name, m in network.named_modules() if isinstance(m, MosaicAutoencoder)]
    if len(found) != 1:
        raise ValueError("modality_parameter_names needs a network holding one MosaicAutoencoder.")
    prefix, mosaic = found[0]
    prefix = f"{prefix}." if prefix else ""
    known = {name for name, _, _ in mosaic.modalities}
    unknown = set(modalities) - known
    if unknown:
        raise ValueError(f"Modalities {sorted(unknown)} are not among the network's ({', '.join(known)}).")
    absent = [
        f"{prefix}{part}.{name}." for name in known - set(modalities) for part in ("encoders", "decoders")
    ]
    return frozenset(
        name for name in network.state_dict() if not any(name.startswith(stem) for stem in absent)
    )
