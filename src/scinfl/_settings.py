"""Package settings and the logger (``logging.getLogger("scinfl")``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

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
        Threads torch may use while scinfl trains or predicts (restored afterwards). Small networks on
        few cores run fastest on one thread (see docs/benchmarks.md); None leaves torch's own setting.
    progress
        Show a progress bar over federated rounds.
    """

    torch_threads: int | None = 1
    progress: bool = True


settings = Settings()


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count after."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
