"""Local training at one site: a Lightning training plan and plain functions any engine can call.

The key enters only through :func:`scinfl.nn.use_key` around the call; neither the plan nor the network
stores it. Local fits run the LightningModule through Lightning Fabric: a federation makes hundreds of
short fits, and a new ``Trainer`` per fit cost more than the training itself on small sites
(docs/benchmarks.md). The same loop runs DP-SGD when given a site's private-training state
(:mod:`scinfl.train.dp`): Opacus then wraps the optimiser the plan configures.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric import Fabric
from torch import Tensor, nn

from ..nn import HardenedKey, HardenedNetwork, KeyedModule, use_key
from .tasks import Task

if TYPE_CHECKING:
    from .dp import PrivateTraining

__all__ = ["LocalFitResult", "TrainingPlan", "evaluate", "fit_local", "infer"]

for _name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)


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
        self, network: nn.Module, task: Task, *, lr: float, weight_decay: float, fused: bool = True
    ) -> None:
        super().__init__()
        self.network = network
        self.task = task
        self.lr = lr
        self.weight_decay = weight_decay
        self.fused = fused
        self.loss_sum = 0.0
        self.n_seen = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.task.loss(self.network(x), self.task.target(x, y))
        self.loss_sum += float(loss.detach()) * len(x)
        self.n_seen += len(x)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The fused CPU kernel makes a step of the paper's classifier about a quarter faster.
        return torch.optim.Adam(
            self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=self.fused
        )


@functools.cache
def _fabric() -> Fabric:
    # Fabric keeps no per-fit state: one instance serves every local fit in the process.
    return Fabric(accelerator="cpu", devices=1)


def fit_local(
    network: nn.Module,
    batches: Iterable,
    task: Task,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    key_material: Tensor | None,
    private: PrivateTraining | None = None,
) -> float:
    """Train ``network`` in place on ``batches`` for ``epochs`` epochs; return the mean training loss.

    With ``private`` (one site's :class:`~scinfl.train.dp.PrivateTraining`), the fit is DP-SGD: the
    optimiser the plan configures (unfused Adam) is wrapped by Opacus to clip per-cell gradients and add
    noise, every step is recorded in the site's accountant, and ``private.steps_taken`` counts the steps.
    ``batches`` should then be ``private.loader(...)``; its empty Poisson batches are skipped. Keyed
    networks cannot be trained privately (see :mod:`scinfl.train.dp`).
    """
    torch.manual_seed(seed)
    network.train()
    plan = TrainingPlan(network, task, lr=lr, weight_decay=weight_decay, fused=private is None)
    fabric = _fabric()
    steps = 0
    with ExitStack() as stack:
        optimizer = plan.configure_optimizers()
        if private is not None:
            optimizer = stack.enter_context(private.attach(network, optimizer, seed=seed))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch >= 2.10
            module, optimizer = fabric.setup(plan, optimizer)
        # Fabric.setup registers the plan as a callback and never lets it go: the one cached Fabric would
        # keep every fit's plan alive (with its network: 0.5 GB per federation at 15,792 genes) and call
        # each of them at every later hook.
        stack.callback(_forget, fabric, plan)
        stack.enter_context(use_key(key_material))
        for _ in range(epochs):
            for index, batch in enumerate(batches):
                if len(batch[0]) == 0:  # an empty Poisson batch (DP-SGD): skipped, not accounted
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = module.training_step(batch, index)
                fabric.backward(loss)
                optimizer.step()
                steps += 1
    if private is not None:
        private.steps_taken += steps
    return plan.loss_sum / max(plan.n_seen, 1)


def _forget(fabric: Fabric, plan: TrainingPlan) -> None:
    fabric._callbacks[:] = [callback for callback in fabric._callbacks if callback is not plan]


@torch.no_grad()
def evaluate(
    network: nn.Module, batches: Iterable, task: Task, *, key_material: Tensor | None
) -> dict[str, float]:
    """Mean of each task metric over ``batches`` (evaluation mode), plus the cell count ``n``."""
    network.eval()
    sums: dict[str, float] = {}
    n = 0
    with use_key(key_material):
        for x, y in batches:
            for name, value in task.metric_sums(network(x), task.target(x, y)).items():
                sums[name] = sums.get(name, 0.0) + value
            n += len(x)
    return {name: value / n for name, value in sums.items()} | {"n": float(n)} if n else {"n": 0.0}


@torch.no_grad()
def infer(
    network: nn.Module, batches: Iterable, *, key_material: Tensor | None
) -> tuple[np.ndarray, np.ndarray]:
    """Network outputs and embeddings (``features``) for every batch, in order."""
    network.eval()
    if isinstance(network, HardenedNetwork) and isinstance(key_material, HardenedKey):
        # The same function, at a plain network's cost: a throwaway copy holds the plain-basis weights.
        plain = copy.deepcopy(network)
        plain.load_state_dict(network.to_plain(network.state_dict(), key_material))
        network, key_material = plain, None
    outputs, embeddings = [], []
    with use_key(key_material):
        for x, _ in batches:
            if isinstance(network, KeyedModule):
                features = network.call("features", x)
                out = network.call("head", features)
            else:
                features = network.features(x)
                out = network.head(features)
            outputs.append(out.numpy())
            embeddings.append(features.numpy())
    return np.concatenate(outputs), np.concatenate(embeddings)


def copy_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A detached copy of a state dict, so a site's later training cannot change what it sent."""
    return {name: tensor.detach().clone() for name, tensor in state.items()}
