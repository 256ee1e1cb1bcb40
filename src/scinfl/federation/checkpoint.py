"""Round checkpoints of a federation, shared by both engines: written atomically, read back for resuming.

A checkpoint holds what the server holds (global weights, the best round so far, the history, the
sampling generator) and, for the in-process engine, each site's own running state (a DP-SGD site's
accountant). Never a key: models and states are key-free by construction (``docs/architecture.md``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT", "checkpoint_path", "load_checkpoint", "round_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint.pt"


def checkpoint_path(directory: str | os.PathLike[str]) -> Path:
    """Where a run that checkpoints into ``directory`` keeps its checkpoint."""
    return Path(directory) / CHECKPOINT


def round_checkpoint(
    round_index: int,
    *,
    state: Mapping[str, torch.Tensor],
    best_state: Mapping[str, torch.Tensor],
    best_round: int,
    best_loss: float,
    rows: list[dict],
    rng: np.random.Generator,
    **extra: Any,
) -> dict[str, Any]:
    """What the server holds after ``round_index`` (the part both engines share), plus an engine's
    ``extra`` entries: the content of a checkpoint."""
    return {
        "round": round_index,
        "state": state,
        "best_state": best_state,
        "best_round": best_round,
        "best_loss": best_loss,
        "rows": rows,
        "rng": rng.bit_generator.state,
        **extra,
    }


def save_checkpoint(content: Mapping[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``content`` as the checkpoint of ``directory``, replacing the previous one atomically.

    The file is written beside the target, flushed to disk, then renamed over it: a crash at any moment
    leaves the previous checkpoint or the new one, never half of one.
    """
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(dict(content), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The last checkpoint written into ``directory`` (loaded with ``weights_only``: data, no code)."""
    path = checkpoint_path(directory)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: nothing to resume.")
    return torch.load(path, weights_only=True)
