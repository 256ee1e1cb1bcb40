"""Local training at one site: the training plan and plain functions any engine can call.

The key enters only through :func:`scinfl.nn.use_key` around the call; neither the plan nor the network
stores it. Local fits run on the device of ``scinfl.settings.accelerator``
(:func:`scinfl.train.resolve_device`). A federation makes hundreds of short fits, so a site keeps one plan
for the whole federation (:class:`~scinfl.train.SiteTrainer`) and a fit is a plain loop: a new Lightning
``Trainer`` per fit cost more than the training itself on small sites, and importing Lightning cost more
than a deployed round's training (docs/benchmarks.md). The same loop runs DP-SGD when given a site's
private-training state (:mod:`scinfl.train.dp`): Opacus then wraps the optimiser the plan configures.

What a task contributes is an *objective*: ``loss(output, x, y)`` (the mean loss of a batch) and
``metric_sums(output, x, y)`` (per-batch sums of each metric), where ``x, y`` are the batch's rows and
labels (:meth:`scinfl.tasks.Task.objective`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..nn import HardenedKey, HardenedNetwork, KeyedModule, use_key
from .device import (
    autocast,
    full_precision,
    manual_seed,
    module_device,
    resolve_device,
    resolve_precision,
    to_device,
)

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
    "key_on",
]


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


class TrainingPlan:
    """Loss and optimiser around a task network (Adam; a fresh optimiser each local fit).

    ``precision`` (default ``scinfl.settings.precision``): under ``"bf16-mixed"`` the forward pass runs
    under autocast to bfloat16 and the loss is computed from its float32 cast.

    Its two hooks are named as a LightningModule's: :meth:`training_step` (the loss of one batch) and
    :meth:`configure_optimizers`. ``fused=False`` gives the unfused Adam, which DP-SGD uses: Opacus's
    ``DPOptimizer`` wraps it, writes the clipped, noised gradient into each ``p.grad`` and calls its
    ``step``. Opacus 1.6 accepts the fused kernel too, but a DP step's time goes to per-sample gradients
    (about 65 ms against 4 ms for a non-private step of 128 cells, hidden 64, fused or not), so the DP path
    does not depend on it.
    """

    def __init__(
        self,
        network: nn.Module,
        objective: Objective,
        *,
        lr: float,
        weight_decay: float,
        fused: bool = True,
        precision: str | None = None,
    ) -> None:
        self.network = network
        self.objective = objective
        self.lr = lr
        self.weight_decay = weight_decay
        self.fused = fused
        self.precision = resolve_precision(precision)  # default: scinfl.settings.precision, read now
        self._loss_sum: Tensor | float = 0.0
        self.n_seen = 0
        self._optimizer: torch.optim.Optimizer | None = None

    def reset(self) -> None:
        """Start a new fit's running loss."""
        self._loss_sum, self.n_seen = 0.0, 0

    @property
    def mean_loss(self) -> float:
        """The mean training loss per cell since :meth:`reset` (one copy from the device)."""
        return float(self._loss_sum) / max(self.n_seen, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        with autocast(x.device, self.precision):
            output = self.network(x)
        loss = self.objective.loss(full_precision(output), x, y)
        # Summed on the device, in float64 as a Python float would: reading each step's loss on the CPU
        # would wait for the GPU at every step.
        weighted = loss.detach().to(torch.float32 if loss.device.type == "mps" else torch.float64) * len(x)
        self._loss_sum = self._loss_sum + weighted
        self.n_seen += len(x)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The fused kernel makes a step of the paper's classifier about a quarter faster on a CPU.
        return torch.optim.Adam(
            self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=self.fused
        )

    def fresh_optimizer(self) -> torch.optim.Optimizer:
        """The plan's optimiser with the state of a new one (every local fit starts Adam's moments and
        step count from zero, as FedAvg prescribes): built once by :meth:`configure_optimizers`, then its
        state zeroed in place, which gives the same numbers as a new optimiser. Building one per fit cost
        about 1 ms (docs/benchmarks.md), more than a small site's fit spends on some of its batches."""
        if self._optimizer is None:
            self._optimizer = self.configure_optimizers()
            return self._optimizer
        for state in self._optimizer.state.values():
            for value in state.values():
                if isinstance(value, Tensor):
                    value.zero_()
        return self._optimizer


def fit_plan(
    plan: TrainingPlan,
    batches: Iterable,
    *,
    epochs: int,
    seed: int,
    key_material,
    private: PrivateTraining | None = None,
) -> float:
    """Train ``plan``'s network in place for ``epochs`` epochs of ``batches``; return the mean training loss.

    The fit runs on the device the network is on; every batch is moved there
    (:func:`~scinfl.train.to_device`). With ``private`` (one site's :class:`~scinfl.train.dp.PrivateTraining`), the fit is
    DP-SGD: the optimiser the plan configures (unfused Adam) is wrapped by Opacus to clip per-cell gradients
    and add noise, every step is recorded in the site's accountant, and ``private.steps_taken`` counts the
    steps. ``batches`` should then be ``private.loader(...)``; its empty Poisson batches are skipped. Keyed
    networks cannot be trained privately (see :mod:`scinfl.train.dp`).
    """
    device = module_device(plan.network)
    manual_seed(seed, device)
    plan.reset()
    plan.network.train()
    steps = 0
    with ExitStack() as stack:
        optimizer = plan.fresh_optimizer()
        if private is not None:
            optimizer = stack.enter_context(private.attach(plan.network, optimizer, seed=seed))
        stack.enter_context(use_key(key_material))
        for _ in range(epochs):
            for index, batch in enumerate(batches):
                if len(batch[0]) == 0:  # an empty Poisson batch (DP-SGD): skipped, not accounted
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = plan.training_step(to_device(batch, device), index)
                loss.backward()
                optimizer.step()
                steps += 1
    if private is not None:
        private.steps_taken += steps
    return plan.mean_loss


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
    """Train ``network`` in place on ``batches``, on the device of ``scinfl.settings.accelerator`` (the
    network is moved there), with a plan for this fit alone (see :func:`fit_plan`); return the mean
    training loss."""
    device = resolve_device()
    network.to(device)
    plan = TrainingPlan(network, objective, lr=lr, weight_decay=weight_decay, fused=private is None)
    return fit_plan(
        plan, batches, epochs=epochs, seed=seed, key_material=key_on(key_material, device), private=private
    )


def key_on(key_material, device: torch.device):
    """``key_material`` (:func:`scinfl.train.key_material`'s) on ``device``, where a network computing with
    it runs."""
    return key_material.to(device) if isinstance(key_material, HardenedKey | Tensor) else key_material


@torch.no_grad()
def evaluate(
    network: nn.Module, batches: Iterable, objective: Objective, *, key_material
) -> dict[str, float]:
    """Mean of each objective metric over ``batches`` (evaluation mode, on the network's device, at
    ``scinfl.settings.precision``), plus the cell count ``n``."""
    network.eval()
    device = module_device(network)
    sums: dict[str, float] = {}
    n = 0
    with use_key(key_on(key_material, device)):
        for x, y in batches:
            x, y = to_device((x, y), device)
            with autocast(device):
                output = network(x)
            for name, value in objective.metric_sums(full_precision(output), x, y).items():
                sums[name] = sums.get(name, 0.0) + value
            n += len(x)
    return {name: value / n for name, value in sums.items()} | {"n": float(n)} if n else {"n": 0.0}


@torch.no_grad()
def infer(
    network: nn.Module, batches: Iterable, *, key_material, outputs: bool = True
) -> tuple[np.ndarray | None, np.ndarray]:
    """Network outputs (``head``; None with ``outputs=False``) and embeddings (``features``) for every batch,
    in order, as CPU arrays.

    Computed on the device of ``scinfl.settings.accelerator`` at ``scinfl.settings.precision`` (returned
    as float32); a network elsewhere is copied there for the call and stays where it is. Results come
    back without waiting for the device batch by batch (one synchronisation at the end).
    ``outputs=False`` skips the head where a task reads only the embedding: an autoencoder's head is its
    decoder, whose output has as many values per cell as the input.
    """
    network.eval()
    device = resolve_device()
    if isinstance(network, HardenedNetwork) and isinstance(key_material, HardenedKey):
        # The same function, at a plain network's cost: a throwaway network holds the plain-basis weights.
        plain = network.plain_copy(key_material)
        network, key_material = plain, None
    if module_device(network) != device:
        network = copy.deepcopy(network).to(device)
    head, embeddings = [], []
    with use_key(key_on(key_material, device)):
        for x, _ in batches:
            x = to_device(x, device)
            with autocast(device):
                if isinstance(network, KeyedModule):
                    features = network.call("features", x)
                    out = network.call("head", features) if outputs else None
                else:
                    features = network.features(x)
                    out = network.head(features) if outputs else None
            embeddings.append(_to_host(full_precision(features)))
            if outputs:
                head.append(_to_host(full_precision(out)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the copies above were queued without waiting
    embedding = np.concatenate([t.numpy() for t in embeddings])
    return (np.concatenate([t.numpy() for t in head]) if outputs else None), embedding


def _to_host(tensor: Tensor) -> Tensor:
    """``tensor`` on the CPU; from a CUDA device into pinned memory without waiting (read it after
    synchronising)."""
    return tensor.to("cpu", non_blocking=True) if tensor.device.type == "cuda" else tensor.cpu()


def copy_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A detached copy of a state dict on the CPU, so a site's later training cannot change what it sent."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}
