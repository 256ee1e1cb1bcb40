"""Local training at one site: a Lightning training plan and plain functions any engine can call.

The key enters only through :func:`scinfl.nn.use_key` around the call; neither the plan nor the network
stores it. Local fits run the LightningModule through Lightning Fabric, on the accelerator of
``scinfl.settings.accelerator``: a federation makes hundreds of short fits, and a new ``Trainer`` per fit
cost more than the training itself on small sites (docs/benchmarks.md). A site keeps one plan for the
whole federation (:class:`~scinfl.train.SiteTrainer`), and every fit in a process shares one Fabric. The same loop runs DP-SGD when given
a site's private-training state (:mod:`scinfl.train.dp`): Opacus then wraps the optimiser the plan
configures.

What a task contributes is an *objective*: ``loss(output, x, y)`` (the mean loss of a batch) and
``metric_sums(output, x, y)`` (per-batch sums of each metric), where ``x, y`` are the batch's rows and
labels (:meth:`scinfl.tasks.Task.objective`).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from .._settings import settings
from ..nn import HardenedKey, HardenedNetwork, KeyedModule, use_key

if TYPE_CHECKING:
    from .dp import PrivateTraining

__all__ = [
    "LocalFitResult",
    "Objective",
    "TrainingPlan",
    "copy_state",
    "evaluate",
    "fit_local",
    "fit_plan",
    "infer",
    "make_fabric",
]

for _name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class Objective(Protocol):
    """What a task network is trained and evaluated on (see the module docstring)."""

    def loss(self, output, x: Tensor, y: Tensor) -> Tensor: ...

    def metric_sums(self, output, x: Tensor, y: Tensor) -> dict[str, float]: ...


@dataclass
class LocalFitResult:
    """What a site returns after local training: its weights, its training size, metrics, key version."""

    state: dict[str, Tensor]
    n_obs: int
    key_fingerprint: str | None
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingPlan(pl.LightningModule):
    """Loss and optimiser around a task network (Adam; a fresh optimiser each local fit).

    ``fused=False`` gives the unfused Adam, which DP-SGD uses: Opacus's ``DPOptimizer`` wraps it, writes
    the clipped, noised gradient into each ``p.grad`` and calls its ``step``. Opacus 1.6 accepts the fused
    kernel too, but a DP step's time goes to per-sample gradients (about 65 ms against 4 ms for a
    non-private step of 128 cells, hidden 64, fused or not), so the DP path does not depend on it.
    """

    def __init__(
        self, network: nn.Module, objective: Objective, *, lr: float, weight_decay: float, fused: bool = True
    ) -> None:
        super().__init__()
        self.network = network
        self.objective = objective
        self.lr = lr
        self.weight_decay = weight_decay
        self.fused = fused
        self.loss_sum = 0.0
        self.n_seen = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.objective.loss(self.network(x), x, y)
        self.loss_sum += float(loss.detach()) * len(x)
        self.n_seen += len(x)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The fused kernel makes a step of the paper's classifier about a quarter faster on a CPU.
        return torch.optim.Adam(
            self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=self.fused
        )


def make_fabric(accelerator: str | None = None) -> Fabric:
    """The one-device Fabric on ``accelerator`` (default ``scinfl.settings.accelerator``), one per process.

    Building a Fabric scans the installed packages' entry points (about 50 ms), so every fit shares it; it
    keeps no per-fit state, since :func:`fit_plan` sets up the plan's network and optimiser, never the plan
    itself (Fabric would keep a set-up LightningModule, and its network, as a callback forever).
    """
    return _fabric(accelerator or settings.accelerator)


@functools.cache
def _fabric(accelerator: str) -> Fabric:
    return Fabric(accelerator=accelerator, devices=1)


def fit_plan(
    fabric: Fabric,
    plan: TrainingPlan,
    batches: Iterable,
    *,
    epochs: int,
    seed: int,
    key_material,
    private: PrivateTraining | None = None,
) -> float:
    """Train ``plan``'s network in place for ``epochs`` epochs of ``batches``; return the mean training loss.

    ``fabric`` places the network and every batch on its device. With ``private`` (one site's
    :class:`~scinfl.train.dp.PrivateTraining`), the fit is DP-SGD: the optimiser the plan configures
    (unfused Adam) is wrapped by Opacus to clip per-cell gradients and add noise, every step is recorded
    in the site's accountant, and ``private.steps_taken`` counts the steps. ``batches`` should then be
    ``private.loader(...)``; its empty Poisson batches are skipped. Keyed networks cannot be trained
    privately (see :mod:`scinfl.train.dp`).
    """
    torch.manual_seed(seed)
    plan.loss_sum, plan.n_seen = 0.0, 0
    plan.network.train()
    steps = 0
    with ExitStack() as stack:
        optimizer = plan.configure_optimizers()
        if private is not None:
            optimizer = stack.enter_context(private.attach(plan.network, optimizer, seed=seed))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch >= 2.10
            fabric.setup_module(plan.network)  # on Fabric's device, in place
            optimizer = fabric.setup_optimizers(optimizer)
        stack.enter_context(use_key(key_material))
        for _ in range(epochs):
            for index, batch in enumerate(batches):
                if len(batch[0]) == 0:  # an empty Poisson batch (DP-SGD): skipped, not accounted
                    continue
                optimizer.zero_grad(set_to_none=True)
                with fabric.autocast():  # the precision Fabric's set-up module would run its forward in
                    loss = plan.training_step(fabric.to_device(batch), index)
                fabric.backward(loss)
                optimizer.step()
                steps += 1
    if private is not None:
        private.steps_taken += steps
    return plan.loss_sum / max(plan.n_seen, 1)


def fit_local(
    network: nn.Module,
    batches: Iterable,
    objective: Objective,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    key_material,
    private: PrivateTraining | None = None,
) -> float:
    """Train ``network`` in place on ``batches`` (a plan and a Fabric for this fit alone; see
    :func:`fit_plan`); return the mean training loss."""
    plan = TrainingPlan(network, objective, lr=lr, weight_decay=weight_decay, fused=private is None)
    return fit_plan(
        make_fabric(), plan, batches, epochs=epochs, seed=seed, key_material=key_material, private=private
    )


def _device(network: nn.Module) -> torch.device:
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(
    network: nn.Module, batches: Iterable, objective: Objective, *, key_material
) -> dict[str, float]:
    """Mean of each objective metric over ``batches`` (evaluation mode, on the network's device), plus the
    cell count ``n``."""
    network.eval()
    device = _device(network)
    sums: dict[str, float] = {}
    n = 0
    with use_key(key_material):
        for x, y in batches:
            x, y = move_data_to_device((x, y), device)
            for name, value in objective.metric_sums(network(x), x, y).items():
                sums[name] = sums.get(name, 0.0) + value
            n += len(x)
    return {name: value / n for name, value in sums.items()} | {"n": float(n)} if n else {"n": 0.0}


@torch.no_grad()
def infer(network: nn.Module, batches: Iterable, *, key_material) -> tuple[np.ndarray, np.ndarray]:
    """Network outputs and embeddings (``features``) for every batch, in order, as CPU arrays."""
    network.eval()
    device = _device(network)
    if isinstance(network, HardenedNetwork) and isinstance(key_material, HardenedKey):
        # The same function, at a plain network's cost: a throwaway network holds the plain-basis weights.
        plain = network.plain_copy(key_material)
        network, key_material = plain, None
    outputs, embeddings = [], []
    with use_key(key_material):
        for x, _ in batches:
            x = move_data_to_device(x, device)
            if isinstance(network, KeyedModule):
                features = network.call("features", x)
                out = network.call("head", features)
            else:
                features = network.features(x)
                out = network.head(features)
            outputs.append(out.cpu().numpy())
            embeddings.append(features.cpu().numpy())
    return np.concatenate(outputs), np.concatenate(embeddings)


def copy_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A detached copy of a state dict on the CPU, so a site's later training cannot change what it sent."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}
