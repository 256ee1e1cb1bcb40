"""Local training at one site: fits, evaluations and predictions of a training plan, on Lightning Fabric.

The plan is a LightningModule (:class:`scinfl.train.TrainingPlan`, loaded on first use); these functions
run its ``training_step``, ``validation_step`` and ``predict_step`` on the Fabric of the site's device
(:func:`site_fabric`): Fabric's precision plugin gives the autocast of ``scinfl.settings.precision``, its
``backward`` and its optimiser wrapper step the plan's Adam. A federation makes hundreds of short fits, so
a site keeps one plan for the whole federation (:class:`~scinfl.train.SiteTrainer`) and a fit is Fabric's
own loop, not a ``Trainer`` per fit (which cost more than the training itself on small sites:
docs/benchmarks.md). The same loop runs DP-SGD when given a site's private-training state
(:mod:`scinfl.train.dp`): Opacus then wraps the optimiser the plan configures.

The key enters only through :func:`scinfl.nn.use_key` around the call; neither the plan nor the network
stores it.

What a task contributes is an *objective*: ``loss(output, x, y)`` (the mean loss of a batch) and
``metric_sums(output, x, y)`` (per-batch sums of each metric), where ``x, y`` are the batch's rows and
labels (:meth:`scinfl.tasks.Task.objective`).
"""

from __future__ import annotations

import copy
import functools
import logging
import multiprocessing
import pickle
import threading
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .._settings import settings
from ..nn import HardenedKey, HardenedNetwork, use_key
from .device import manual_seed, module_device, resolve_device, resolve_precision, to_device

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from lightning.fabric import Fabric

    from .dp import PrivateTraining
    from .plan import TrainingPlan

__all__ = [
    "LocalFitResult",
    "Objective",
    "copy_state",
    "evaluate",
    "fit_local",
    "fit_plan",
    "infer",
    "key_on",
    "site_fabric",
    "training_plan",
]


class Objective(Protocol):
    """What a task network is trained and evaluated on (see the module docstring). An objective may
    instead compute from the network and the batch, ``step_loss(network, batch, batch_idx)`` and
    ``step_metric_sums(network, batch, batch_idx)``: a user's own LightningModule's ``training_step``
    (:class:`scinfl.tasks.Lightning`)."""

    def loss(self, output, x: Tensor, y: Tensor) -> Tensor: ...

    def metric_sums(self, output, x: Tensor, y: Tensor) -> dict[str, float]: ...


@dataclass
class LocalFitResult:
    """What a site returns after local training: its weights, its training size, metrics, key version."""

    state: dict[str, Tensor]
    n_obs: int
    key_fingerprint: str | None
    metrics: dict[str, float] = field(default_factory=dict)


# Fabric's precision strings for scinfl.settings.precision's.
_FABRIC_PRECISION = {"32": "32-true", "bf16-mixed": "bf16-mixed"}


def site_fabric(device: torch.device | None = None, precision: str | None = None) -> Fabric:
    """The Lightning Fabric a site computes with on ``device`` (default: ``scinfl.settings.accelerator``'s)
    at ``precision`` (default ``scinfl.settings.precision``): one device, its precision plugin.

    Built once per device and precision in a process (building one takes about 12 ms); Fabric holds no
    data, weights or key. scinfl moves networks and batches itself (:func:`~scinfl.train.to_device`: a
    sparse batch crosses to a GPU at its stored size), so Fabric is not asked to.
    """
    device = resolve_device() if device is None else device
    return _fabric(device.type, device.index, _FABRIC_PRECISION[resolve_precision(precision)])


@functools.cache
def _fabric(device_type: str, index: int | None, precision: str) -> Fabric:
    from lightning.fabric import Fabric

    # Fabric announces its precision at INFO when built; a site says nothing (the user's own Lightning
    # logging is left as it was).
    announcer = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # Fabric's too, in this package
    level = announcer.level
    announcer.setLevel(logging.WARNING)
    try:
        devices = [index] if device_type == "cuda" and index is not None else 1
        return Fabric(accelerator=device_type, devices=devices, precision=precision)
    finally:
        announcer.setLevel(level)


def training_plan(network: nn.Module, objective=None, **options) -> TrainingPlan:
    """A :class:`~scinfl.train.TrainingPlan` (imports Lightning on first use: ``scinfl.train.plan``)."""
    from .plan import TrainingPlan

    return TrainingPlan(network, objective, **options)


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

    The fit runs on the device the network is on, with that device's Fabric (:func:`site_fabric`); every
    batch is moved there (:func:`~scinfl.train.to_device`). With ``private`` (one site's
    :class:`~scinfl.train.dp.PrivateTraining`), the fit is DP-SGD: the optimiser the plan configures
    (unfused Adam) is wrapped by Opacus to clip per-cell gradients and add noise, every step is recorded in
    the site's accountant, and ``private.steps_taken`` counts the steps. ``batches`` should then be
    ``private.loader(...)``; its empty Poisson batches are skipped. Keyed networks cannot be trained
    privately (see :mod:`scinfl.train.dp`).

    With ``scinfl.settings.devices > 1`` the fit is data-parallel inside the site: Fabric launches that
    many processes (``scinfl.settings.strategy``), each takes its contiguous share of every batch, DDP
    averages their gradients (each share's loss weighted by its size, so the step is the whole batch's),
    and the network gets rank 0's weights. It gives the one-process update up to float rounding when
    nothing in the network draws random numbers per cell and no layer mixes the cells of a batch:
    dropout masks are drawn per process, and BatchNorm becomes SyncBatchNorm on CUDA (torch runs
    SyncBatchNorm on CUDA only, so a BatchNorm network is refused on CPU processes). DP-SGD trains on
    one device per site.
    """
    if settings.devices > 1:
        return _fit_data_parallel(
            plan, batches, epochs=epochs, seed=seed, key_material=key_material, private=private
        )
    device = module_device(plan.network)
    fabric = site_fabric(device)
    manual_seed(seed, device)
    plan.reset()
    plan.network.train()
    steps = 0
    with ExitStack() as stack:
        optimizer = plan.fresh_optimizer()
        if private is not None:
            optimizer = stack.enter_context(private.attach(plan.network, optimizer, seed=seed))
        optimizer = fabric.setup_optimizers(optimizer)
        stack.enter_context(use_key(key_material))
        for _ in range(epochs):
            for index, batch in enumerate(batches):
                if len(batch[0]) == 0:  # an empty Poisson batch (DP-SGD): skipped, not accounted
                    continue
                optimizer.zero_grad(set_to_none=True)
                with fabric.autocast():
                    loss = plan.training_step(to_device(batch, device), index)
                fabric.backward(loss)
                optimizer.step()
                steps += 1
    if private is not None:
        private.steps_taken += steps
    return plan.mean_loss


# Fabric's launchers that start processes from inside a running program; "ddp" re-runs the script.
_DATA_PARALLEL = {
    "auto": "ddp_spawn",
    "ddp_spawn": "ddp_spawn",
    "ddp_fork": "ddp_fork",
    "ddp_notebook": "ddp_notebook",
}


def _fit_data_parallel(
    plan: TrainingPlan, batches: Iterable, *, epochs: int, seed: int, key_material, private
) -> float:
    """:func:`fit_plan` on ``scinfl.settings.devices`` processes (see its docstring)."""
    from lightning.fabric import Fabric

    devices, strategy = int(settings.devices), str(settings.strategy).strip().lower()
    if strategy not in _DATA_PARALLEL:
        raise ValueError(
            f"scinfl.settings.strategy is {settings.strategy!r}: with devices={devices} use 'auto', "
            "'ddp_spawn', 'ddp_fork' or 'ddp_notebook' (Fabric's 'ddp' re-runs the calling script)."
        )
    if private is not None:
        raise ValueError("DP-SGD trains on one device per site: set scinfl.settings.devices = 1.")
    device = module_device(plan.network)
    if device.type != "cuda" and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plan.network.modules()
    ):
        raise ValueError(
            f"scinfl.settings.devices = {devices} on {device.type} processes cannot train a BatchNorm network as "
            "one process would: torch runs SyncBatchNorm on CUDA only, and each process's BatchNorm would "
            "normalise with its share of the batch. Build the network with ModelConfig(norm='layer')."
        )
    fabric = Fabric(
        accelerator=device.type,
        devices=devices,
        strategy=_DATA_PARALLEL[strategy],
        precision=_FABRIC_PRECISION[resolve_precision()],
    )
    threads = settings.torch_threads or torch.get_num_threads()
    # In as one pickle, not as arguments: torch.multiprocessing would pass each tensor through a
    # shared-memory file. Out through a pipe read while the processes run: Fabric's own return queue is
    # read only after they exit, so a result larger than a pipe's buffer would block rank 0 forever.
    work = pickle.dumps((plan, batches, key_material))
    reader, writer = multiprocessing.get_context("spawn").Pipe(duplex=False)
    received: list[bytes] = []
    receiving = threading.Thread(target=lambda: received.append(reader.recv_bytes()), daemon=True)
    receiving.start()
    try:
        fabric.launch(_fit_share, work, writer, epochs, seed, threads)
    finally:
        writer.close()  # a failed launch ends the reader with EOFError
        receiving.join()
        reader.close()
    state, mean_loss = pickle.loads(received[0])
    with torch.no_grad():
        for name, tensor in plan.network.state_dict(keep_vars=True).items():
            tensor.copy_(state[name])
    return mean_loss


def _fit_share(fabric: Fabric, work: bytes, result: Connection, epochs: int, seed: int, threads: int) -> None:
    """One process of :func:`_fit_data_parallel`: its share of every batch; rank 0 sends the weights and the
    mean training loss over every process's cells through ``result``."""
    torch.set_num_threads(threads)
    plan, batches, key_material = pickle.loads(work)
    device = fabric.device
    plan.network.to(device)
    if device.type == "cuda":
        plan.network = nn.SyncBatchNorm.convert_sync_batchnorm(plan.network)
    module = fabric.setup_module(plan, move_to_device=False)
    manual_seed(seed, device)
    plan.reset()
    plan.network.train()
    optimizer = fabric.setup_optimizers(plan.fresh_optimizer())
    rank, world = fabric.global_rank, fabric.world_size
    with use_key(key_on(key_material, device)):
        for _ in range(epochs):
            for index, batch in enumerate(batches):
                x, y = to_device(batch, device)
                n = len(x)
                if n < world:  # a last batch smaller than the processes: skipped by all of them alike
                    continue
                low, high = rank * n // world, (rank + 1) * n // world
                share = (x[low:high], y[low:high] if len(y) == n else y)
                optimizer.zero_grad(set_to_none=True)
                loss = module.training_step(share, index)  # through DDP's forward: its gradients are averaged
                fabric.backward(loss * ((high - low) * world / n))
                optimizer.step()
    totals = torch.tensor([float(plan._loss_sum), float(plan.n_seen)], dtype=torch.float64, device=device)
    totals = fabric.all_reduce(totals, reduce_op="sum")
    if rank == 0:
        mean_loss = float(totals[0] / max(float(totals[1]), 1.0))
        result.send_bytes(pickle.dumps((copy_state(plan.network.state_dict()), mean_loss)))
    result.close()


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
    plan = training_plan(network, objective, lr=lr, weight_decay=weight_decay, fused=private is None)
    return fit_plan(
        plan, batches, epochs=epochs, seed=seed, key_material=key_on(key_material, device), private=private
    )


def key_on(key_material, device: torch.device):
    """``key_material`` (:func:`scinfl.train.key_material`'s) on ``device``, where a network computing with
    it runs."""
    return key_material.to(device) if isinstance(key_material, HardenedKey | Tensor) else key_material


@torch.no_grad()
def evaluate(plan: TrainingPlan, batches: Iterable, *, key_material) -> dict[str, float]:
    """Mean of each of the plan's objective metrics over ``batches`` (its ``validation_step``, in evaluation
    mode, on the network's device, at ``scinfl.settings.precision``), plus the cell count ``n``."""
    plan.network.eval()
    device = module_device(plan.network)
    fabric = site_fabric(device)
    plan.on_validation_epoch_start()
    with use_key(key_on(key_material, device)):
        for index, batch in enumerate(batches):
            with fabric.autocast():
                plan.validation_step(to_device(batch, device), index)
    return plan.validation_metrics


@torch.no_grad()
def infer(
    network: nn.Module, batches: Iterable, *, key_material, outputs: bool = True
) -> tuple[np.ndarray | None, np.ndarray]:
    """Network outputs (``head``; None with ``outputs=False``) and embeddings (``features``) for every batch,
    in order, as CPU arrays: a plan's ``predict_step`` (:class:`~scinfl.train.TrainingPlan`).

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
    plan = training_plan(network, predict_outputs=outputs)
    fabric = site_fabric(device)
    head, embeddings = [], []
    with use_key(key_on(key_material, device)):
        for index, (x, _) in enumerate(batches):
            with fabric.autocast():
                features, out = plan.predict_step(to_device(x, device), index)
            embeddings.append(_to_host(features))
            if outputs:
                head.append(_to_host(out))
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
