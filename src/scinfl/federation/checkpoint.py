"""Round checkpoints of a federation, shared by every engine: written atomically, read back for resuming.

A checkpoint holds what the server holds (the round loop's :class:`~scinfl.federation.rounds.LoopState`:
global weights, the best round so far, the history, the sampling generator) and, for the in-process
engine, each site's own running state (a DP-SGD site's accountant). Never a key: models and states are key-free by construction (``docs/architecture.md``).

The file is readable by its owner only (0600: it holds weights), and carries the SHA-256 of its content,
checked when it is read: a damaged checkpoint is refused by name, never half-loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT",
    "CheckpointError",
    "checkpoint_path",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT = "checkpoint.pt"
_MAGIC = b"SCINFLC1"  # then the SHA-256 of the content, then the content (torch.save's bytes)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back as written (truncated, altered, not a checkpoint)."""


def checkpoint_path(directory: str | os.PathLike[str]) -> Path:
    """Where a run that checkpoints into ``directory`` keeps its checkpoint."""
    return Path(directory) / CHECKPOINT


def save_checkpoint(content: Mapping[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``content`` as the checkpoint of ``directory``, replacing the previous one atomically.

    The file is written beside the target (0600), flushed to disk, then renamed over it: a crash at any
    moment leaves the previous checkpoint or the new one, never half of one. Temporary files that a
    killed writer left behind are removed first.
    """
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_torn(path)
    buffer = io.BytesIO()
    torch.save(dict(content), buffer)
    payload = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as fh:
        fh.write(_MAGIC + hashlib.sha256(payload).digest() + payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _remove_torn(path: Path) -> None:
    """Remove the temporary files of writers that died mid-write (one run writes a directory at a time:
    a checkpoint directory in use by another run is refused)."""
    for torn in path.parent.glob(f".{path.name}.*.tmp"):
        torn.unlink(missing_ok=True)


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The last checkpoint written into ``directory`` (loaded with ``weights_only``: data, no code).

    Raises :class:`CheckpointError`, naming the file, when its checksum does not match its content.
    """
    path = checkpoint_path(directory)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: nothing to resume.")
    data = path.read_bytes()
    if data.startswith(_MAGIC):
        digest, payload = data[len(_MAGIC) : len(_MAGIC) + 32], data[len(_MAGIC) + 32 :]
        if hashlib.sha256(payload).digest() != digest:
            raise CheckpointError(
                f"{path} is truncated or altered (its SHA-256 does not match its content): it cannot be "
                "resumed. Restore it from a backup, or start the run again in an empty directory."
            )
    else:  # written before checkpoints carried a checksum
        payload = data
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable scinfl checkpoint ({type(err).__name__}: {err})."
        ) from err
