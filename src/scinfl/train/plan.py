"""The training plan: a :class:`lightning.pytorch.LightningModule` around a task network and its objective.

A plan owns what a task is trained and evaluated on (the objective's loss and metric sums), the optimiser
(Adam) and the network; local fits, evaluations and predictions call its step methods
(:mod:`scinfl.train.local`, on Lightning Fabric), and a user can hand it to their own ``lightning.Trainer``
(:meth:`scinfl.FederatedModel.lightning_module`).

The key is never an attribute of a plan or its network: it enters only through :func:`scinfl.nn.use_key`
around the call (``with model.keyed(): trainer.predict(plan, loader)``).

Importing Lightning costs a process about 1.8 s of CPU beyond what a site's training imports anyway
(torchmetrics and the scipy modules it loads; ``torch._dynamo`` comes with the first optimiser step either
way), so this module is imported only where a site trains or a model predicts: a Flower ClientApp answering
a hello or a statistics request never loads it (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from ..nn import KeyedModule
from .device import full_precision

__all__ = ["TrainingPlan"]


class TrainingPlan(LightningModule):
    """Loss, metrics and optimiser around a task network (Adam; every local fit starts a new Adam's state).

    Parameters
    ----------
    network
        The task network (:func:`scinfl.tasks.build_network`), a keyed one included. It is the plan's only
        submodule, so the plan's ``state_dict`` is the network's under the prefix ``network.``.
    objective
        The task's loss and metric sums (:class:`scinfl.train.Objective`); None for a plan that only
        predicts.
    lr, weight_decay
        Adam's learning rate and (L2) weight decay.
    fused
        Adam's fused kernel (a step of the paper's classifier about a quarter faster on a CPU). DP-SGD uses
        the unfused one: Opacus's ``DPOptimizer`` wraps it, writes the clipped, noised gradient into each
        ``p.grad`` and calls its ``step``; a DP step's time goes to per-sample gradients (about 65 ms
        against 4 ms for a non-private step of 128 cells, hidden 64), so it does not depend on the kernel.
    predict_outputs
        Whether :meth:`predict_step` computes the head's outputs as well as the embedding (an
        autoencoder's head is its decoder, as wide as the input: skipped where only the embedding is read).

    Notes
    -----
    Precision is Lightning's: under ``"bf16-mixed"`` the step runs in the precision plugin's autocast
    (Fabric's, or a ``Trainer``'s); losses and metrics are computed from the float32 cast of the output,
    outside the autocast.
    """

    def __init__(
        self,
        network: nn.Module,
        objective: Any = None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        fused: bool = True,
        predict_outputs: bool = True,
    ) -> None:
        super().__init__()
        self.network = network
        self.objective = objective
        self.lr = lr
        self.weight_decay = weight_decay
        self.fused = fused
        self.predict_outputs = predict_outputs
        self._loss_sum: Tensor | float = 0.0
        self.n_seen = 0
        self._metric_sums: dict[str, float] = {}
        self.n_validated = 0
        self._optimizer: torch.optim.Optimizer | None = None

    # ---- training -------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Any:
        return self.network(x)

    def reset(self) -> None:
        """Start a new fit's running loss."""
        self._loss_sum, self.n_seen = 0.0, 0

    @property
    def mean_loss(self) -> float:
        """The mean training loss per cell since :meth:`reset` (one copy from the device)."""
        return float(self._loss_sum) / max(self.n_seen, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        step_loss = getattr(self.objective, "step_loss", None)
        if step_loss is not None:  # an objective that runs the network itself (a user's LightningModule)
            loss = full_precision(step_loss(self.network, batch, batch_idx))
        else:
            output = self.network(x)
            with torch.autocast(x.device.type, enabled=False):
                loss = self.objective.loss(full_precision(output), x, y)
        # Summed on the device, in float64 as a Python float would: reading each step's loss on the CPU
        # would wait for the GPU at every step.
        weighted = loss.detach().to(torch.float32 if loss.device.type == "mps" else torch.float64) * len(x)
        self._loss_sum = self._loss_sum + weighted
        self.n_seen += len(x)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
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

    # ---- validation -----------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._metric_sums, self.n_validated = {}, 0

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        step_metric_sums = getattr(self.objective, "step_metric_sums", None)
        if step_metric_sums is not None:
            sums = step_metric_sums(self.network, batch, batch_idx)
        else:
            output = self.network(x)
            with torch.autocast(x.device.type, enabled=False):
                sums = self.objective.metric_sums(full_precision(output), x, y)
        for name, value in sums.items():
            self._metric_sums[name] = self._metric_sums.get(name, 0.0) + value
        self.n_validated += len(x)

    @property
    def validation_metrics(self) -> dict[str, float]:
        """The mean of each metric over the cells validated since the epoch started, and their count
        ``n``."""
        n = self.n_validated
        if not n:
            return {"n": 0.0}
        return {name: value / n for name, value in self._metric_sums.items()} | {"n": float(n)}

    # ---- prediction -----------------------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int = 0) -> tuple[Tensor, Tensor | None]:
        """The batch's embeddings (``features``) and, with :attr:`predict_outputs`, the head's outputs,
        in float32 (a batch is ``(x, y)`` or ``x``)."""
        x = batch[0] if isinstance(batch, tuple | list) else batch
        network = self.network
        if isinstance(network, KeyedModule):
            features = network.call("features", x)
            outputs = network.call("head", features) if self.predict_outputs else None
        else:
            features = network.features(x)
            outputs = network.head(features) if self.predict_outputs else None
        return full_precision(features), full_precision(outputs)
