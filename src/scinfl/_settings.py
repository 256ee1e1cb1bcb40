"""Package settings and the logger (``logging.getLogger("scinfl")``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from threadpoolctl import threadpool_limits

__all__ = ["Settings", "settings", "torch_threads"]

logger = logging.getLogger("scinfl")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("scinfl %(levelname)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@dataclass
class Settings:
    """Global settings.

    Attributes
    ----------
    torch_threads
        Threads torch and numpy's BLAS may use while scinfl trains, predicts or audits (restored
        afterwards). Small networks on
        few cores run fastest on one thread (see docs/benchmarks.md); None leaves torch's own setting.
    progress
        Show a progress bar over federated rounds (in a notebook or a terminal; never in a log file).
    accelerator
        Where sites train and models predict (:func:`scinfl.train.resolve_device`): ``"auto"`` (a CUDA
        GPU when torch sees one, else Apple's MPS, else the CPU), ``"cpu"``, ``"gpu"``/``"cuda"``,
        ``"cuda:1"`` or ``"mps"``.
    precision
        ``"32"`` (float32 throughout, the default) or ``"bf16-mixed"``: sites' forward passes (training,
        validation, prediction) run under ``torch.autocast`` in bfloat16, where matrix products take
        half the memory traffic and GPUs (and CPUs with AVX-512 BF16 or AMX) compute them faster.
        Weights, gradients, optimiser state, losses, the hardened key's conversions and everything a
        site sends stay float32. Not with DP-SGD. Accuracy and speed: docs/benchmarks.md. Applied by
        Lightning Fabric's precision plugin (:func:`scinfl.train.site_fabric`).
    devices
        How many devices (GPUs, or CPU processes) one site's local fit runs on. Above 1 the fit is
        data-parallel inside the site (DDP through Lightning Fabric, ``strategy``): each process takes
        its share of every batch and the gradients are averaged, so the federation still sees one update
        per site (:func:`scinfl.train.fit_plan`).
    strategy
        Lightning Fabric's strategy for ``devices > 1``: ``"ddp_spawn"`` (the default for ``"auto"``:
        processes started for each fit, safe in notebooks and with CUDA) or ``"ddp_fork"`` (forked,
        CPU only, no start-up imports).
    logger
        A Lightning logger (``lightning.pytorch.loggers.CSVLogger``, TensorBoard, W&B, MLflow, or
        ``lightning.fabric.loggers``'s), or None. Each site's training loss and validation metrics of
        every round land there, named ``<site>/<metric>``, at step = the site's round.
    """

    torch_threads: int | None = 1
    progress: bool = True
    accelerator: str = "auto"
    precision: str = "32"
    devices: int = 1
    strategy: str = "auto"
    logger: Any = None


settings = Settings()


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and ``n`` BLAS threads for numpy and scipy,
    restoring both after.

    BLAS too: on 2 shared cores a multithreaded OpenBLAS made the privacy audit's SVDs and DP-SGD's
    accounting several times slower (tutorial 02).
    """
    previous = torch.get_num_threads()
    if n is None:
        yield
        return
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(previous)
