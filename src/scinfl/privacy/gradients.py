"""What a client sends to the server: its gradient on a batch, or its update after a few local SGD steps.

The server that attacks a client sees exactly these payloads, so the inversion attacks
(:mod:`scinfl.privacy.inversion`) reproduce them with the same code: :func:`loss_gradients` and
:func:`sgd_update` are the one implementation of "the gradient of the loss" and "K local steps", used both
for the client's true payload and, differentiably, for the attacker's dummy data.

Evaluation mode
---------------
Every payload here is computed with the network in evaluation mode: BatchNorm normalises with its running
statistics and dropout is off. This is a deliberate choice of the *most favourable* setting for the
attacker, so that a measured failure of an attack is not an artefact of our simulation:

- in training mode BatchNorm normalises each sample by statistics of its batch, so a single-sample gradient
  does not even exist (``BatchNorm1d`` refuses a batch of one), and in a batch every sample's gradient
  depends on all the others, which hides each sample behind its batch mates;
- dropout masks are drawn at random by the client and are unknown to the server, which would otherwise
  have to guess them;
- in evaluation mode the network is a fixed, per-sample function, known exactly to the attacker (who holds
  the global weights and running statistics), and a batch gradient is the plain mean of per-sample
  gradients.

Key views
---------
The ``key_material`` argument of each function says who computes: the client passes its right key (the
true payload); an attacker passes ``None`` (the keyless server, which runs the keyed network on its
unmodulated weights), a wrong key, or the right key (an insider, the positive control). A network without
keyed modules (plain FedAvg) ignores the key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..nn import use_key

if TYPE_CHECKING:
    from ..train import Objective

__all__ = [
    "PrivateGradient",
    "client_gradient",
    "client_update",
    "evaluation_mode",
    "loss_gradients",
    "sgd_update",
    "trainable_parameters",
]


def trainable_parameters(network: nn.Module) -> dict[str, Tensor]:
    """Every parameter the clients train (``requires_grad``), by name, as in ``named_parameters()``."""
    return {name: p for name, p in network.named_parameters() if p.requires_grad}


@contextmanager
def evaluation_mode(network: nn.Module) -> Iterator[None]:
    """Run the block with every submodule in evaluation mode, restoring each module's own flag after."""
    flags = [(module, module.training) for module in network.modules()]
    network.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def loss_gradients(
    network: nn.Module,
    x: Tensor,
    y: Tensor,
    parameters: Mapping[str, Tensor],
    *,
    key_material: Tensor | None,
    create_graph: bool = False,
    task: Objective | None = None,
) -> dict[str, Tensor]:
    """Gradient of the mean loss on ``(x, y)`` at ``parameters``, under one key view.

    The loss is the cross-entropy, or ``task``'s own training loss when given (e.g. an embedding model's
    reconstruction loss, whose target is ``x`` itself).

    The network runs with ``parameters`` substituted for its own (:func:`torch.func.functional_call`), in
    whatever mode it is in (callers use :func:`evaluation_mode`). Parameters the loss does not reach (the
    key heads and key encoder when ``key_material`` is None) get an all-zero gradient, so the result
    always has every name of ``parameters``.

    Parameters
    ----------
    network
        The (plain or keyed) network.
    x
        Inputs, shape ``(n_samples, n_features)``.
    y
        Integer labels ``(n_samples,)`` or class probabilities ``(n_samples, n_classes)``.
    parameters
        Name to tensor, each requiring grad; names as in ``network.named_parameters()``.
    key_material
        The key view: the client's key, or an attacker's (None: keyless; wrong key; right key).
    create_graph
        Keep the graph so that the gradients can be differentiated again (gradient matching).
    task
        The model's objective (:meth:`scinfl.tasks.Task.objective`); None: a classifier's cross-entropy.
    """
    device = next(iter(parameters.values())).device
    x, y = x.to(device), y.to(device)  # the cells where the network is (differentiable: x may be a variable)
    with use_key(key_material):
        output = functional_call(network, dict(parameters), (x,))
    # Integer labels, or class probabilities (the attacker's soft labels when it optimises them too).
    loss = F.cross_entropy(output, y) if task is None else task.loss(output, x, y)
    names = list(parameters)
    grads = torch.autograd.grad(
        loss, [parameters[name] for name in names], create_graph=create_graph, allow_unused=True
    )
    return {
        name: torch.zeros_like(parameters[name]) if grad is None else grad
        for name, grad in zip(names, grads, strict=True)
    }


def sgd_update(
    network: nn.Module,
    x: Tensor,
    y: Tensor,
    parameters: Mapping[str, Tensor],
    *,
    key_material: Tensor | None,
    steps: int,
    lr: float,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    """``theta_K - theta_0`` after ``steps`` plain SGD steps on the full batch ``(x, y)``, from ``parameters``.

    The network's own weights are never touched: each step is computed functionally from the previous
    parameters. With ``create_graph=True`` the whole unrolled trajectory stays differentiable with respect
    to ``x`` (and soft ``y``), which is what :func:`scinfl.privacy.inversion.invert_update` needs.

    Parameters are as for :func:`loss_gradients`, plus the number of local ``steps`` and learning rate
    ``lr``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    start = dict(parameters)
    current = dict(parameters)
    for _ in range(steps):
        grads = loss_gradients(network, x, y, current, key_material=key_material, create_graph=create_graph)
        current = {name: current[name] - lr * grads[name] for name in current}
        if not create_graph:
            # Nothing will differentiate through the trajectory: cut it so the graph does not grow.
            current = {name: p.detach().requires_grad_(True) for name, p in current.items()}
    return {name: current[name] - start[name] for name in start}


@dataclass(frozen=True)
class PrivateGradient:
    """What a DP-SGD client (``tl.train_federated(dp=...)``) does to a gradient before it leaves the site.

    Each cell's gradient is clipped to ``max_grad_norm`` (over all parameters), the clipped gradients are
    summed, Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` is added to every
    coordinate, and the sum is divided by the batch size (Opacus with ``loss_reduction="mean"``).
    """

    max_grad_norm: float
    noise_multiplier: float
    seed: int = 0


def _private_gradient(
    network: nn.Module,
    x: Tensor,
    y: Tensor,
    parameters: Mapping[str, Tensor],
    *,
    key_material: Tensor | None,
    private: PrivateGradient,
    generator: torch.Generator,
    task: Objective | None = None,
) -> dict[str, Tensor]:
    total = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for i in range(len(x)):  # per-cell gradients, as Opacus computes them
        grads = loss_gradients(
            network, x[i : i + 1], y[i : i + 1], parameters, key_material=key_material, task=task
        )
        norm = torch.sqrt(sum(g.detach().pow(2).sum() for g in grads.values()))
        factor = min(1.0, private.max_grad_norm / (float(norm) + 1e-6))
        for name, g in grads.items():
            total[name] += g.detach() * factor
    std = private.noise_multiplier * private.max_grad_norm
    return {
        name: (t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype)) / len(x)
        for name, t in total.items()
    }


def _detached_leaves(network: nn.Module) -> dict[str, Tensor]:
    # Fresh leaves that share storage with the weights but not their autograd history or .grad.
    return {name: p.detach().requires_grad_(True) for name, p in trainable_parameters(network).items()}


def client_gradient(
    network: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    key_material: Tensor | None,
    private: PrivateGradient | None = None,
    task: Objective | None = None,
) -> dict[str, Tensor]:
    """The gradient a client sends: its mean training loss on its batch, w.r.t. every trainable parameter.

    Computed in evaluation mode (see the module docstring: the setting most favourable to the attacker)
    and inside ``use_key(key_material)``. The network's weights and ``.grad`` fields are left unchanged.

    Parameters
    ----------
    network
        The global network the client received (plain or keyed).
    x
        The client's batch, ``(n_samples, n_features)``.
    y
        Its integer labels, ``(n_samples,)``.
    key_material
        The client's key (the right key). Passing another view here computes what that view would send,
        which is how an attacker simulates a gradient.
    private
        For a DP-SGD client: clip each cell's gradient and add noise (:class:`PrivateGradient`).
    task
        The model's objective (:meth:`scinfl.tasks.Task.objective`); None: a classifier's cross-entropy.

    Returns
    -------
    Name (as in ``named_parameters()``) to the detached gradient.
    """
    with evaluation_mode(network):
        if private is not None:
            generator = torch.Generator().manual_seed(private.seed)
            grads = _private_gradient(
                network,
                x,
                y,
                _detached_leaves(network),
                key_material=key_material,
                private=private,
                generator=generator,
                task=task,
            )
        else:
            grads = loss_gradients(
                network, x, y, _detached_leaves(network), key_material=key_material, task=task
            )
    return {name: g.detach() for name, g in grads.items()}


def client_update(
    network: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    key_material: Tensor | None,
    steps: int,
    lr: float,
    private: PrivateGradient | None = None,
) -> dict[str, Tensor]:
    """The update a client sends after ``steps`` plain SGD steps on its whole batch: ``theta_K - theta_0``.

    Evaluation mode and ``use_key(key_material)`` as in :func:`client_gradient`; the network's own
    weights are left unchanged (the steps run on functional copies).

    Parameters
    ----------
    network, x, y, key_material
        As for :func:`client_gradient`.
    steps
        Local SGD steps (each on the full batch).
    lr
        Local learning rate.
    private
        For a DP-SGD client: every step's gradient is clipped per cell and noised (:class:`PrivateGradient`).

    Returns
    -------
    Name (as in ``named_parameters()``) to the detached change of that parameter.
    """
    with evaluation_mode(network):
        if private is None:
            update = sgd_update(
                network, x, y, _detached_leaves(network), key_material=key_material, steps=steps, lr=lr
            )
        else:
            generator = torch.Generator().manual_seed(private.seed)
            start = _detached_leaves(network)
            current = dict(start)
            for _ in range(steps):
                grads = _private_gradient(
                    network,
                    x,
                    y,
                    current,
                    key_material=key_material,
                    private=private,
                    generator=generator,
                )
                current = {n: (current[n] - lr * grads[n]).detach().requires_grad_(True) for n in current}
            update = {name: current[name] - start[name] for name in start}
    return {name: u.detach() for name, u in update.items()}
