"""What a server receives with secure aggregation, simulated with the federation's own code.

With secure aggregation (:mod:`scinfl.federation.secure`) the server never holds one site's update: it
adds the cohort's masked vectors and decodes their cell-weighted mean, FedAvg. So what it learns of a
round is the change of the global weights. :func:`secure_round_changes` produces exactly that: each site
of a cohort trains the global weights as a federation's site does (:class:`scinfl.train.SiteTrainer`: the
training plan, Adam, the run's local epochs and batches, a hardened network in its plain basis), masks
its weights with the protocol's pairwise masks (fresh X25519 keys per site), and the sum is unmasked and
decoded as the server does it (:func:`scinfl.federation.secure.unmask_sum`). The attacks then read the
decoded changes; the masked vectors themselves are uniformly random (tests/federation/test_secure.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from torch import Tensor, nn

from ..data import SiteDataset
from ..data.loader import AlignedMatrix
from ..federation.secure import MaskedUpdate, MaskingKey, SecureRound, mask_update, unmask_sum
from ..train import FitSettings, Objective, SiteTrainer, copy_state

__all__ = ["secure_round_changes"]


def _site(name: str, x: Tensor, y: Tensor, network: nn.Module, objective: Objective, key_material, fit):
    columns = tuple(str(i) for i in range(x.shape[1]))
    matrix = AlignedMatrix(x.numpy(), columns, columns)
    labels = y.numpy().astype(np.int64) if len(y) == len(x) else None
    return SiteTrainer(
        name,
        SiteDataset(matrix, np.arange(len(x)), labels),
        SiteDataset(matrix, np.arange(0), labels),
        copy.deepcopy(network),
        objective,
        key_material=key_material,
        key_fingerprint=None,
        settings=fit,
    )


def secure_round_changes(
    network: nn.Module,
    cohort: Sequence[tuple[Tensor, Tensor]],
    *,
    objective: Objective,
    fit: FitSettings,
    key_material,
    rounds: int,
    seed: int,
) -> list[dict[str, Tensor]]:
    """Each round's change of the global weights when ``cohort``'s sites train under secure aggregation.

    Parameters
    ----------
    network
        The global network the rounds start from (left unchanged).
    cohort
        Each site's cells and labels, ``(x, y)`` as the network reads them (``y`` may be empty for a task
        without labels). The round sums all of them (at least 2).
    objective
        The task's training loss (:meth:`scinfl.tasks.Task.objective`).
    fit
        The run's local training settings.
    key_material
        What the sites' key gives this network (:func:`scinfl.train.key_material`), or None.
    rounds
        Consecutive rounds, each from the previous round's aggregate.
    seed
        Seeds the sites' local shuffles.

    Returns
    -------
    list of dict
        Per round, parameter name to (aggregate after the round) - (aggregate before it), float64.
    """
    if len(cohort) < 2:
        raise ValueError(f"A secure round sums at least 2 sites, got {len(cohort)}.")
    names = [f"site {i}" for i in range(len(cohort))]
    sites = [
        _site(name, x, y, network, objective, key_material, fit)
        for name, (x, y) in zip(names, cohort, strict=True)
    ]
    masking_keys = {name: MaskingKey.generate() for name in names}
    state = copy_state(network.state_dict())  # on the CPU, as a site's updates are
    changes = []
    for round_index in range(rounds):
        secure = SecureRound(
            round_index=round_index,
            attempt=0,
            cohort=tuple(names),
            public_keys={name: key.public for name, key in masking_keys.items()},
            run=f"audit/{seed}",
        )
        masked = []
        for index, (name, site) in enumerate(zip(names, sites, strict=True)):
            fitted = site.fit(state, seed=seed * 10_007 + round_index * 101 + index)
            vector = mask_update(fitted.state, fitted.n_obs, state, secure, name, masking_keys[name])
            masked.append(MaskedUpdate(vector, fitted.n_obs, None))
        aggregate = unmask_sum(masked, state)
        changes.append(
            {
                name: aggregate[name].double() - state[name].double()
                for name in state
                if state[name].is_floating_point()
            }
        )
        state = aggregate
    return changes
