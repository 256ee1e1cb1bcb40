"""The site side of a federation: one site's data, its copy of the network, and (if authorised) the key."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from torch import Tensor, nn

from ..data import SiteDataset, batch_loader, stratified_split
from ..key import FederationKey
from .config import ModelConfig, key_coordinates
from .local import LocalFitResult, copy_state, evaluate, fit_local
from .tasks import get_task

__all__ = ["FitSettings", "SiteTrainer"]


@dataclass(frozen=True)
class FitSettings:
    """Local optimisation settings, the same at every site."""

    local_epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5


class SiteTrainer:
    """Trains and evaluates the global model on one site's data.

    The key stays here, at the site: :meth:`fit` returns weights, the training cell count and the key's
    fingerprint, never the key.

    Parameters
    ----------
    name
        The site's name (used in errors and the history).
    train, validation
        The site's training and validation cells.
    network
        The architecture (copied; the site trains its own copy).
    config
        The model definition (task, scheme).
    key
        The federation key, or None for plain FedAvg.
    settings
        Local optimisation settings.
    """

    def __init__(
        self,
        name: str,
        train: SiteDataset,
        validation: SiteDataset,
        network: nn.Module,
        config: ModelConfig,
        key: FederationKey | None,
        settings: FitSettings,
    ) -> None:
        if len(train) < 2:
            raise ValueError(
                f"Site {name!r} has {len(train)} training cell(s); at least 2 are needed to train "
                "(BatchNorm needs two cells per batch)."
            )
        self.name = name
        self.train = train
        self.validation = validation
        self.network = copy.deepcopy(network)
        self.task = get_task(config.task)
        self.settings = settings
        self._coordinates = key_coordinates(key, config)
        self._fingerprint = None if key is None else key.fingerprint

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_validation(self) -> int:
        return len(self.validation)

    def fit(self, global_state: Mapping[str, Tensor], *, seed: int) -> LocalFitResult:
        """Load the global weights, train locally, return the new weights."""
        self.network.load_state_dict(global_state)
        loader = batch_loader(
            self.train, batch_size=self.settings.batch_size, shuffle=True, seed=seed, drop_singleton=True
        )
        train_loss = fit_local(
            self.network,
            loader,
            self.task,
            epochs=self.settings.local_epochs,
            lr=self.settings.lr,
            weight_decay=self.settings.weight_decay,
            seed=seed,
            key_coordinates=self._coordinates,
        )
        return LocalFitResult(
            state=copy_state(self.network.state_dict()),
            n_obs=self.n_train,
            key_fingerprint=self._fingerprint,
            metrics={"train_loss": train_loss},
        )

    def evaluate(self, global_state: Mapping[str, Tensor]) -> dict[str, float]:
        """Validation metrics of the global weights on this site (empty validation: ``{"n": 0}``)."""
        if not len(self.validation):
            return {"n": 0.0}
        self.network.load_state_dict(global_state)
        loader = batch_loader(self.validation, batch_size=max(self.settings.batch_size, 512), shuffle=False)
        return evaluate(self.network, loader, self.task, key_coordinates=self._coordinates)


def site_datasets(matrix, labels: np.ndarray, validation_fraction: float, rng: np.random.Generator):
    """Split one site's cells into training and validation datasets (stratified, rare classes kept)."""
    train_idx, val_idx = stratified_split(labels, validation_fraction, rng)
    return SiteDataset(matrix, train_idx, labels), SiteDataset(matrix, val_idx, labels)
