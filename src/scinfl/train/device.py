"""The device a site computes on: ``scinfl.settings.accelerator`` resolved to one torch device, batches
moved there, and ``scinfl.settings.precision`` checked (Lightning Fabric's precision plugin applies it:
:func:`scinfl.train.site_fabric`).

These are plain torch, so that the parts of a site that do not train (a Flower ClientApp answering a hello
or a statistics request) never import Lightning (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._settings import settings
from ..data import SparseRows

__all__ = [
    "full_precision",
    "manual_seed",
    "module_device",
    "resolve_device",
    "resolve_precision",
    "seeded_generator",
    "sparse_batches_on",
    "to_device",
]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(accelerator: str | torch.device | None = None) -> torch.device:
    """The torch device of ``accelerator`` (default ``scinfl.settings.accelerator``).

    ``"auto"`` is the first CUDA GPU when torch sees one, else Apple's MPS when available, else the CPU;
    ``"cpu"``; ``"gpu"`` or ``"cuda"`` (the current CUDA device); ``"cuda:1"``; ``"mps"``. Asking for a
    device torch cannot use is an error, not a silent fallback to the CPU.
    """
    value = settings.accelerator if accelerator is None else accelerator
    name = str(value).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "gpu":
        name = "cuda"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"scinfl.settings.accelerator is {value!r}: use 'auto', 'cpu', 'gpu' (or 'cuda', 'cuda:1') or 'mps'."
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"scinfl.settings.accelerator is {value!r}, but torch sees no CUDA GPU here (torch "
                f"{torch.__version__}): use 'auto' or 'cpu'."
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"scinfl.settings.accelerator is {value!r}, but torch sees {torch.cuda.device_count()} GPU(s)."
            )
    if device.type == "mps" and not _mps_available():
        raise RuntimeError(f"scinfl.settings.accelerator is {value!r}, but MPS is not available here.")
    return device


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for a module with neither)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def sparse_batches_on(device: torch.device) -> bool:
    """Whether a site computing on ``device`` reads sparse matrices as :class:`~scinfl.data.SparseRows`:
    on a CUDA GPU, where a batch crosses at its stored size and is densified there. On the CPU a batch
    is densified once, as it is read."""
    return device.type == "cuda"


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, :class:`~scinfl.data.SparseRows`, an object with ``.to(device)``, or a tuple or
    list of them) on ``device``.

    To a CUDA device, CPU tensors go through pinned memory with a non-blocking copy, so that the copy
    overlaps the work already queued on the GPU. Sparse rows move as their parts and become a dense tensor
    there.
    """
    if isinstance(batch, SparseRows):
        return batch.replace(*to_device(batch.parts, device)).dense()
    if isinstance(batch, Tensor):
        if batch.device == device:
            return batch
        if device.type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(item, device) for item in batch)
    to = getattr(batch, "to", None)
    return to(device) if callable(to) else batch


def manual_seed(seed: int, device: torch.device) -> None:
    """Seed the CPU's random generator and ``device``'s.

    As ``torch.manual_seed`` for the CPU and that device, without its queueing of a seed for every
    accelerator backend not yet started, which formats a stack trace each time: about 1 ms per local fit
    on a CPU, more than a small site's fit spends on some of its batches.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A random generator on ``device`` seeded with ``seed``, for random numbers drawn there (torch refuses
    a CPU generator for a GPU tensor)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def resolve_precision(precision: str | None = None) -> str:
    """``precision`` (default ``scinfl.settings.precision``), checked: ``"32"`` or ``"bf16-mixed"``."""
    value = settings.precision if precision is None else precision
    name = str(value).strip().lower()
    if name in ("32", "32-true", "float32"):
        return "32"
    if name in ("bf16-mixed", "bf16"):
        return "bf16-mixed"
    raise ValueError(f"scinfl.settings.precision is {value!r}: use '32' or 'bf16-mixed'.")


def full_precision(output: Any) -> Any:
    """``output`` (a tensor, or a tuple, list or dict of them) with low-precision floating tensors cast
    to float32: losses, metrics and results are computed from float32 values."""
    if isinstance(output, Tensor):
        return output.float() if output.dtype in (torch.bfloat16, torch.float16) else output
    if isinstance(output, tuple | list):
        return type(output)(full_precision(item) for item in output)
    if isinstance(output, dict):
        return {name: full_precision(item) for name, item in output.items()}
    return output
