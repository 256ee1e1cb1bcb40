"""Adaptive attacks on ``scheme="hardened"``: attackers who know how the key acts, but not the key.

The hardened scheme (:mod:`scinfl.nn.hardened`) hides the input behind a key-derived mixing and every
layer behind a key-derived signed permutation. An attacker who knows the construction (Kerckhoffs) can
replace the unknown transforms by free ones and fit them:

- :class:`RelaxedHardenedKey` is that continuous relaxation: a dense matrix in front of every layer and
  one behind the output layer. The true key is one point of it (signed permutations and the mixing are
  matrices), so fitting it on labelled cells is key recovery (:func:`recover_relaxed_key`), and fitting
  it jointly with a dummy input is gradient inversion with unknown key modules (:func:`invert_gradient_joint`).
- :func:`known_plaintext` reconstructs a victim's cell from its leaked (mixed) first-layer input, given
  cells whose leaked vectors and true profiles the attacker both knows: the mixing is linear, so a victim
  whose leaked vector is a combination of the known ones is the same combination of their profiles.
- :func:`labels_by_frequency` undoes a secret relabelling of the output units by frequency analysis:
  the most often leaked position is taken for the most frequent public label, and so on.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from ..nn import HardenedKey, HardenedNetwork, KeyMaterial, use_key
from ..train import module_device
from .gradients import evaluation_mode, loss_gradients
from .inversion import _attacked_parameters, _matcher
from .utility import fit_frozen

__all__ = [
    "RelaxedHardenedKey",
    "invert_gradient_joint",
    "known_plaintext",
    "labels_by_frequency",
    "recover_relaxed_key",
]


class RelaxedHardenedKey(KeyMaterial):
    """Free dense transforms in place of a hardened key's: ``u = D_i x`` before layer ``i``, ``E y`` after the last.

    Parameters
    ----------
    input_maps
        One ``(in_features, in_features)`` matrix per hardened layer.
    output_map
        ``(n_outputs, n_outputs)``.
    """

    def __init__(self, input_maps: list[Tensor], output_map: Tensor) -> None:
        self.input_maps = input_maps
        self.output_map = output_map

    @classmethod
    def identity(cls, network: HardenedNetwork) -> RelaxedHardenedKey:
        """The keyless starting point: every map the identity."""
        layout, device = network.layout, module_device(network)
        return cls(
            [torch.eye(n, device=device) for n in layout.in_features],
            torch.eye(layout.n_outputs, device=device),
        )

    @classmethod
    def from_key(cls, network: HardenedNetwork, material: HardenedKey) -> RelaxedHardenedKey:
        """The dense form of a hardened key (e.g. a wrong key, as a starting point)."""
        layout, device = network.layout, module_device(network)
        material = material.to(device)
        maps = [
            material.layer_input(i, torch.eye(n, device=device)).T.contiguous()
            for i, n in enumerate(layout.in_features)
        ]
        output = material.layer_output(
            len(maps) - 1, torch.eye(layout.n_outputs, device=device)
        ).T.contiguous()
        return cls(maps, output)

    def variables(self) -> list[Tensor]:
        return [*self.input_maps, self.output_map]

    def requires_grad_(self) -> RelaxedHardenedKey:
        for tensor in self.variables():
            tensor.requires_grad_(True)
        return self

    def layer_input(self, index: int, x: Tensor) -> Tensor:
        return x @ self.input_maps[index].T

    def weight_gradient_input(self, index: int, x: Tensor) -> Tensor:
        return self.layer_input(index, x)

    def layer_output(self, index: int, y: Tensor) -> Tensor:
        return y @ self.output_map.T if index == len(self.input_maps) - 1 else y


def recover_relaxed_key(
    network: HardenedNetwork,
    x: Tensor,
    y: Tensor,
    *,
    init: RelaxedHardenedKey,
    steps: int = 300,
    lr: float = 0.01,
) -> RelaxedHardenedKey:
    """Fit every relaxed key transform by cross-entropy on labelled cells, with the weights frozen."""
    relaxed = RelaxedHardenedKey(
        [m.detach().clone() for m in init.input_maps], init.output_map.detach().clone()
    ).requires_grad_()
    fit_frozen(network, x, y, relaxed.variables(), lambda: use_key(relaxed), steps=steps, lr=lr)
    return RelaxedHardenedKey([m.detach() for m in relaxed.input_maps], relaxed.output_map.detach())


def invert_gradient_joint(
    network: HardenedNetwork,
    target: Mapping[str, Tensor],
    *,
    labels: Tensor,
    init: RelaxedHardenedKey,
    prior_mean: Tensor,
    steps: int = 300,
    lr: float = 0.1,
    key_lr: float = 0.01,
    seed: int = 0,
) -> Tensor:
    """Gradient inversion of one cell with the key transforms unknown: the cell and the relaxed key are fitted together.

    Cosine gradient matching (as :func:`~scinfl.privacy.inversion.invert_gradient`), starting from the
    public mean profile and ``init``; the reconstruction is clamped to ``>= 0``.
    """
    parameters = _attacked_parameters(network, target)
    match = _matcher(target, "cosine")
    relaxed = RelaxedHardenedKey(
        [m.detach().clone() for m in init.input_maps], init.output_map.detach().clone()
    ).requires_grad_()
    generator = torch.Generator().manual_seed(seed)
    # Drawn on the CPU, so that the start is the same on any device.
    noise = torch.randn(1, prior_mean.numel(), generator=generator)
    x = (prior_mean.reshape(1, -1) + 0.5 * noise.to(prior_mean)).clamp(min=0).to(module_device(network))
    x.requires_grad_(True)
    optimiser = torch.optim.Adam([{"params": [x], "lr": lr}, {"params": relaxed.variables(), "lr": key_lr}])
    with evaluation_mode(network):
        for _ in range(steps):
            optimiser.zero_grad()
            simulated = loss_gradients(
                network, x, labels, parameters, key_material=relaxed, create_graph=True
            )
            match(simulated).backward()
            optimiser.step()
            with torch.no_grad():
                x.clamp_(min=0.0)
    return x.detach()


def known_plaintext(leaked: np.ndarray, known_leaked: np.ndarray, known_profiles: np.ndarray) -> np.ndarray:
    """Reconstruct cells from leaked linear images, given cells whose leaked images and profiles are both known.

    Each leaked vector is written as a least-squares combination of the known leaked vectors, and the
    reconstruction is the same combination of the known profiles. Exact for the part of a cell in the span of
    the known cells, whatever the (linear) mixing; nothing is learned about the rest.

    Parameters
    ----------
    leaked
        ``(n_victims, n)`` leaked vectors (e.g. first-layer gradient rows ``dW[i] / db[i]``).
    known_leaked, known_profiles
        ``(n_known, n)`` leaked vectors and true profiles of the known cells.
    """
    coefficients, *_ = np.linalg.lstsq(known_leaked.T, leaked.T, rcond=None)
    return coefficients.T @ known_profiles


def labels_by_frequency(positions: np.ndarray, public_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Map leaked output positions to labels by rank of frequency (the most frequent to the most frequent)."""
    position_rank = np.argsort(-np.bincount(positions, minlength=n_classes), kind="stable")
    label_rank = np.argsort(-np.bincount(public_labels, minlength=n_classes), kind="stable")
    mapping = np.empty(n_classes, dtype=np.int64)
    mapping[position_rank] = label_rank
    return mapping[positions]
