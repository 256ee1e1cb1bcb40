"""The site side of a federation: one site's data, its copy of the network, and (if authorised) the key."""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..data import SiteDataset, batch_loader
from ..nn import HardenedKey, HardenedNetwork
from .device import resolve_device, resolve_precision, sparse_batches_on
from .local import LocalFitResult, Objective, copy_state, evaluate, fit_plan, key_on, training_plan
from .settings import FitSettings

if TYPE_CHECKING:
    from .dp import PrivateTraining

__all__ = ["SiteTrainer"]


class SiteTrainer:
    """Trains and evaluates the global model on one site's data.

    The key stays here, at the site: :meth:`fit` returns weights, the training cell count and the key's
    fingerprint, never the key. The site keeps one training plan for its whole federation, on the device
    of ``scinfl.settings.accelerator`` (resolved when the site is built).

    Parameters
    ----------
    name
        The site's name (used in errors and the history).
    train, validation
        The site's training and validation cells.
    network
        The site's own copy of the network (trained in place; :func:`scinfl.federation.site.build_site` builds
        one per site).
    objective
        The task's loss and metrics for this site (:meth:`scinfl.tasks.Task.objective`).
    key_material
        What the key gives this network (:func:`scinfl.train.key_material`), or None for plain FedAvg.
    key_fingerprint
        The key's public version tag (None without a key).
    settings
        Local optimisation settings.
    private
        This site's DP-SGD state (:class:`~scinfl.train.dp.PrivateTraining`, built for its training cells),
        or None for ordinary training. It lives as long as the site, so its accountant spans all rounds.
        A private site does not report its training loss: that is a noiseless statistic of its cells.
    trained
        The ``state_dict`` entries this site trains and sends (a multi-omics site holds only some
        modalities); None: all of them. The others get no gradient, so Adam, weight decay included,
        leaves them as received.
    """

    def __init__(
        self,
        name: str,
        train: SiteDataset,
        validation: SiteDataset,
        network: nn.Module,
        objective: Objective,
        *,
        key_material,
        key_fingerprint: str | None,
        settings: FitSettings,
        private: PrivateTraining | None = None,
        trained: Set[str] | None = None,
    ) -> None:
        if len(train) < 2:
            raise ValueError(
                f"Site {name!r} has {len(train)} training cell(s); at least 2 are needed to train "
                "(BatchNorm needs two cells per batch)."
            )
        self.name = name
        self.objective = objective
        self.settings = settings
        self.device = resolve_device()
        sparse_batches = sparse_batches_on(self.device)
        self.train = train.with_sparse_batches(sparse_batches)
        self.validation = validation.with_sparse_batches(sparse_batches)
        self.network = network.to(self.device)
        self._trained = None if trained is None else frozenset(trained)
        if self._trained is not None:
            for parameter_name, parameter in self.network.named_parameters():
                parameter.requires_grad_(parameter_name in self._trained)
        key_material = key_on(key_material, self.device)
        self._key_material = key_material
        # A hardened network trains as its equivalent plain network (so its optimisation is plain FedAvg's,
        # Adam included) and converts weights from and to the shared basis at the site.
        self._hardened = isinstance(self.network, HardenedNetwork) and isinstance(key_material, HardenedKey)
        self._fingerprint = key_fingerprint
        if private is not None:
            from .dp import check_private_network

            if key_material is not None:
                raise ValueError(f"Site {name!r}: DP-SGD is available for plain models only (key=None).")
            check_private_network(self.network)
            if resolve_precision() != "32":
                raise ValueError(
                    f"Site {name!r}: DP-SGD trains in float32 (Opacus's per-cell gradients); set "
                    "scinfl.settings.precision = '32'."
                )
            if private.n_train != len(train):
                raise ValueError(
                    f"Site {name!r}: the private-training state was built for {private.n_train} cells, "
                    f"the site trains on {len(train)}."
                )
        self.private = private
        self.plan = training_plan(
            self.network, objective, lr=settings.lr, weight_decay=settings.weight_decay, fused=private is None
        )
        # The network's own tensors, to receive global weights by in-place copies: a federation loads
        # weights twice per site and round, and load_state_dict's module walk cost more than the copies.
        self._tensors = self.network.state_dict(keep_vars=True)

    @property
    def _training_key(self):
        """The key view of local training and evaluation (None: a hardened network in the plain basis)."""
        return None if self._hardened else self._key_material

    @torch.no_grad()
    def _load(self, state: Mapping[str, Tensor]) -> None:
        if state.keys() != self._tensors.keys():
            missing = sorted(self._tensors.keys() - state.keys())[:3]
            unexpected = sorted(state.keys() - self._tensors.keys())[:3]
            raise ValueError(
                f"Site {self.name!r}: the global weights do not fit this site's network "
                f"(missing {missing}, unexpected {unexpected})."
            )
        for name, tensor in self._tensors.items():
            tensor.copy_(state[name])
        if self._hardened:
            # Converted from the network's own tensors, not from the received ones: those may sit at any
            # memory alignment (e.g. a Flower message), and BLAS kernels round differently on unaligned data.
            plain = self.network.to_plain(self._tensors, self._key_material)
            for name, tensor in self._tensors.items():
                if plain[name] is not tensor:
                    tensor.copy_(plain[name])

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def key_fingerprint(self) -> str | None:
        """The public version tag of the key this site holds (None without a key)."""
        return self._fingerprint

    def fit(self, global_state: Mapping[str, Tensor], *, seed: int) -> LocalFitResult:
        """Load the global weights, train locally, return the new weights (only those it trains).

        Its metrics: ``train_loss``, or with DP-SGD ``dp_steps`` (steps of this fit) and ``dp_epsilon``
        (spent so far, all rounds).
        """
        self._load(global_state)
        if self.private is None:
            loader = batch_loader(
                self.train, batch_size=self.settings.batch_size, shuffle=True, seed=seed, drop_singleton=True
            )
        else:
            loader = self.private.loader(self.train, seed=seed)
            steps_before = self.private.steps_taken
        train_loss = fit_plan(
            self.plan,
            loader,
            epochs=self.settings.local_epochs,
            seed=seed,
            key_material=self._training_key,
            private=self.private,
        )
        if self.private is None:
            metrics = {"train_loss": train_loss}
        else:
            metrics = {
                "dp_steps": float(self.private.steps_taken - steps_before),
                "dp_epsilon": self.private.epsilon,
            }
        state = self.network.state_dict()
        if self._hardened:
            with torch.no_grad():
                state = self.network.from_plain(state, self._key_material)
        if self._trained is not None:
            state = {name: tensor for name, tensor in state.items() if name in self._trained}
        return LocalFitResult(
            state=copy_state(state),
            n_obs=self.n_train,
            key_fingerprint=self._fingerprint,
            metrics=metrics,
        )

    def local_state(self) -> dict[str, Any]:
        """What this site carries across rounds besides the weights: a DP-SGD site's accountant (its steps,
        JSON-able) and what it spent (public accounting numbers, for the run's report)."""
        if self.private is None:
            return {}
        private = self.private
        return {
            "dp_history": [list(step) for step in private.accountant.history],
            "dp_steps": private.steps_taken,
            "noise_multiplier": private.noise_multiplier,
            "sample_rate": private.sample_rate,
            "planned_steps": private.planned_steps,
            "epsilon": private.epsilon,
        }

    def restore_local_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`local_state` of an earlier run (resuming a federation)."""
        if (self.private is None) != ("dp_history" not in state):
            raise ValueError(f"Site {self.name!r}: the checkpoint and this run differ in DP-SGD.")
        if self.private is not None:
            self.private.accountant.history = [tuple(step) for step in state["dp_history"]]
            self.private.steps_taken = int(state["dp_steps"])

    def evaluate(self, global_state: Mapping[str, Tensor]) -> dict[str, float]:
        """Validation metrics of the global weights on this site (empty validation: ``{"n": 0}``)."""
        if not len(self.validation):
            return {"n": 0.0}
        self._load(global_state)
        loader = batch_loader(self.validation, batch_size=max(self.settings.batch_size, 512), shuffle=False)
        return evaluate(self.plan, loader, key_material=self._training_key)
