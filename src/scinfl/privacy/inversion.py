"""Gradient inversion: reconstruct a client's cells from the gradient or update it sends to the server.

Three attacks, all run by an honest-but-curious server that knows the code, the architecture and the
current global weights (including BatchNorm running statistics):

- :func:`recover_labels` (iDLG, Zhao et al. 2020, and its batch extension) reads the labels off the bias
  gradient of the last layer;
- :func:`invert_gradient` (DLG, Zhu et al. 2019, with the squared-L2 objective; inverting gradients, Geiping
  et al. 2020, with the cosine objective) optimises dummy cells so that their gradient matches the one
  observed, with restarts and a non-negativity prior for expression data;
- :func:`invert_update` does the same against the change of the weights after several local SGD steps, by
  unrolling those steps differentiably.

The attacker's key view
-----------------------
Every attack takes ``key_material``: the key the *attacker* runs the network with while simulating
gradients. ``None`` is the keyless server (the keyed network on its unmodulated weights), a key drawn from
the same generator (``FederationKey.generate()``) is the wrong-key attacker, and the client's own key is an
insider: the positive control that shows the attack works at all. Against plain FedAvg (a network without
keyed modules) the argument has no effect.

The client's payload is simulated by :mod:`scinfl.privacy.gradients` in evaluation mode, and the attacker
simulates its dummy gradients with the same functions, so that nothing but the key separates the two.

Cost and choices (measured on pbmc68k_reduced, 765 genes, one CPU thread)
-------------------------------------------------------------------------
A step is a forward pass, a backward pass with ``create_graph=True`` and a double backward: about 2-3 ms
for ``ResidualMLPClassifier(hidden=64)`` (300 steps: under a second), 4-6 ms at hidden 256, and twice as
much on a keyed network run with a key (its key encoder and key heads are differentiated twice too).
:func:`invert_update` costs about ``steps_local + 1`` times more per step. The cosine objective recovers
single cells in 300 steps; squared L2 needs about three times as many steps and fails more often (it is
drawn to inputs on which the model is confident, whose gradients are all small).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .gradients import evaluation_mode, loss_gradients, sgd_update, trainable_parameters

__all__ = ["gradient_distance", "invert_gradient", "invert_update", "recover_labels"]

Objective = Literal["cosine", "l2"]


def recover_labels(
    grad_last_bias: Tensor, n_samples: int, *, grad_last_weight: Tensor | None = None
) -> Tensor:
    """The labels of a batch, read off the output layer's gradient (iDLG and its batch extensions).

    With softmax cross-entropy, the bias gradient of the output layer is ``g = mean_i (p_i - onehot(y_i))``.
    For one sample the true class is its only negative entry (iDLG, Zhao et al. 2020): exact. For a batch,
    ``n * g_c = sum_i p_ic - n_c``, with ``n_c`` the number of samples of class ``c``:

    - a class with a negative entry is certainly in the batch (an absent class has ``n * g_c = sum p > 0``);
    - a class in the batch may still have a non-negative entry, when the model already gives it, summed
      over the batch, at least as much probability as it has samples (a confident model). The weight
      gradient of the output layer finds most of these: its row ``c`` is ``mean_i (p_ic - y_ic) h_i`` for
      the non-negative features ``h_i`` that feed the output layer (after a ReLU), so the row of an absent
      class has no negative entry, while a present class's own samples usually make some entry negative
      (Yin et al. 2021). This needs non-negative features and, for a keyed output layer, a positive row
      scaling ``1 + s*tanh(a)``, which holds for key strengths ``s <= 1``;
    - how often a class repeats is estimated, not read off: ``n_c = -n * g_c + sum_i p_ic``, where the
      probability mass the batch gives to a class it does not contain is estimated by the mean of
      ``n * g`` over the absent classes (Wainakh et al. 2022). Each present class gets one slot, and the
      remaining slots go, one at a time, to the class furthest below its estimated share. Counts are exact
      only when the model is unconfident; on a confident model repeated labels are the main source of error.

    The bias of a keyed output layer enters additively (``b + s*tanh(c(k))``), so its gradient is the same
    ``p - onehot`` whatever the key: labels leak to the server with or without the key.

    Parameters
    ----------
    grad_last_bias
        Gradient of the mean loss w.r.t. the output layer's bias, shape ``(n_classes,)``.
    n_samples
        Number of samples in the batch (the server knows it: FedAvg weights by it).
    grad_last_weight
        Optional gradient w.r.t. the output layer's weight, ``(n_classes, n_hidden)``; finds present classes
        the bias misses (see above). Use only when the output layer's inputs are non-negative.

    Returns
    -------
    Integer labels, shape ``(n_samples,)``, sorted by class; their order carries no information.
    """
    if grad_last_bias.ndim != 1:
        raise ValueError(f"grad_last_bias must be one-dimensional, got shape {tuple(grad_last_bias.shape)}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    scaled = grad_last_bias.detach().double() * n_samples
    present = scaled < 0
    if grad_last_weight is not None:
        if grad_last_weight.shape[0] != scaled.shape[0]:
            raise ValueError("grad_last_weight must have one row per class of grad_last_bias.")
        present |= (grad_last_weight.detach() < 0).any(dim=1)
    if not present.any():  # every class confidently predicted: the least positive entry is the best guess
        present[torch.argmin(scaled)] = True
    classes = torch.nonzero(present).flatten()
    # Most negative first: if (numerically) more classes look present than there are samples, keep those.
    classes = classes[torch.argsort(scaled[classes])][:n_samples]
    absent = ~present
    spill = scaled[absent].mean().clamp(min=0.0) if absent.any() else scaled.new_zeros(())
    share = (spill - scaled[classes]).clamp(min=1e-6)
    expected = n_samples * share / share.sum()
    counts = torch.ones(len(classes), dtype=torch.float64, device=scaled.device)
    for _ in range(n_samples - len(classes)):
        counts[torch.argmax(expected - counts)] += 1
    labels = torch.repeat_interleave(classes, counts.long())
    return torch.sort(labels).values


# Parameters at least this large are reduced in place; smaller ones are concatenated into one vector first.
# Both choices keep a step's time low: many small reductions cost more in overhead than one concatenation,
# while copying a large first-layer gradient costs more than reducing it where it is (measured: the
# hybrid is the fastest of the three for hidden widths 64 and 256).
_LARGE = 1 << 15


def _matcher(
    observed: Mapping[str, Tensor], objective: Objective
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """``distance(simulated)`` to the fixed ``observed`` gradients (see :func:`gradient_distance`)."""
    if objective not in ("cosine", "l2"):
        raise ValueError(f"Unknown objective {objective!r}; use 'cosine' or 'l2'.")
    large = [name for name, g in observed.items() if g.numel() >= _LARGE]
    small = [name for name, g in observed.items() if g.numel() < _LARGE]

    def parts(tensors: Mapping[str, Tensor]) -> list[Tensor]:
        flat = [tensors[name].reshape(-1) for name in large]
        if small:
            flat.append(torch.cat([tensors[name].reshape(-1) for name in small]))
        return flat

    observed_parts = [part.detach() for part in parts(observed)]
    observed_norm = torch.sqrt(sum(part.dot(part) for part in observed_parts))

    def distance(simulated: Mapping[str, Tensor]) -> Tensor:
        simulated_parts = parts(simulated)
        if objective == "l2":
            differences = [s - o for s, o in zip(simulated_parts, observed_parts, strict=True)]
            return sum(d.dot(d) for d in differences)
        dot = sum(s.dot(o) for s, o in zip(simulated_parts, observed_parts, strict=True))
        # The epsilon keeps the derivative finite when a dummy input makes every gradient vanish.
        simulated_norm = torch.sqrt(sum(s.dot(s) for s in simulated_parts) + 1e-30)
        return 1.0 - dot / (simulated_norm * observed_norm + 1e-12)

    return distance


def gradient_distance(
    simulated: Mapping[str, Tensor], observed: Mapping[str, Tensor], objective: Objective
) -> Tensor:
    """How far simulated gradients (or updates) are from the observed ones, over every parameter observed.

    ``"l2"`` is DLG's squared Euclidean distance summed over parameters. ``"cosine"`` is inverting
    gradients' ``1 - <s, o> / (|s| |o|)`` with the inner product and norms summed over all parameters (one
    cosine of the concatenated gradients, as in Geiping et al.'s reference code): it ignores the gradient's
    scale, which depends on how confident the model is, and keeps its direction, which carries the input.
    """
    return _matcher(observed, objective)(simulated)


def _attacked_parameters(network: nn.Module, observed: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # The attacker matches every parameter it observes; fresh leaves keep the network's .grad untouched.
    trainable = trainable_parameters(network)
    unknown = sorted(set(observed) - set(trainable))
    if unknown:
        raise ValueError(f"Observed gradients name parameters the network does not train: {unknown[:5]}.")
    return {name: trainable[name].detach().requires_grad_(True) for name in observed}


def _initial_inputs(
    restart: int,
    n_samples: int,
    prior_mean: Tensor,
    init_scale: float,
    nonnegative: bool,
    generator: torch.Generator,
) -> Tensor:
    # Even restarts start around the public mean profile (zero when the attacker has none), odd restarts
    # around zero: an informed and an uninformed start, so that restarts explore different basins. The
    # noise also breaks the symmetry between the samples of a batch.
    centre = prior_mean if restart % 2 == 0 else torch.zeros_like(prior_mean)
    noise = torch.randn(n_samples, prior_mean.numel(), generator=generator).to(prior_mean)
    x = centre + init_scale * noise
    return x.clamp_(min=0.0) if nonnegative else x


def _reconstruct(
    network: nn.Module,
    simulate: Callable[[Tensor, Tensor], dict[str, Tensor]],
    observed: Mapping[str, Tensor],
    *,
    n_samples: int,
    n_features: int,
    labels: Tensor | None,
    objective: Objective,
    steps: int,
    restarts: int,
    lr: float,
    nonnegative: bool,
    prior_mean: Tensor | None,
    prior_weight: float,
    init_scale: float,
    seed: int,
) -> Tensor:
    """Adam on dummy inputs (and soft labels) to match ``observed``; the best of ``restarts`` runs."""
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be at least 1, got {steps} and {restarts}.")
    if labels is not None and labels.shape != (n_samples,):
        raise ValueError(f"labels must have shape ({n_samples},), got {tuple(labels.shape)}.")
    match = _matcher(observed, objective)
    reference = next(iter(observed.values()))
    if prior_mean is None:
        centre = reference.new_zeros(n_features)
    else:
        centre = prior_mean.detach().reshape(-1).to(reference)
        if centre.numel() != n_features:
            raise ValueError(f"prior_mean has {centre.numel()} features, expected {n_features}.")
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        with torch.no_grad():
            n_classes = network(centre.reshape(1, -1)).shape[1]

    best_inputs, best_distance = None, float("inf")
    for restart in range(restarts):
        x = _initial_inputs(restart, n_samples, centre, init_scale, nonnegative, generator)
        x.requires_grad_(True)
        variables = [x]
        if labels is None:  # DLG: the labels are optimised too, as logits of soft labels
            label_logits = torch.randn(n_samples, n_classes, generator=generator).to(reference)
            label_logits.requires_grad_(True)
            variables.append(label_logits)
        optimiser = torch.optim.Adam(variables, lr=lr)
        # Geiping et al.'s schedule: divide the step size by 10 at 3/8, 5/8 and 7/8 of the run.
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimiser, milestones=[3 * steps // 8, 5 * steps // 8, 7 * steps // 8], gamma=0.1
        )
        for _ in range(steps):
            y = labels if labels is not None else label_logits.softmax(1)
            loss = match(simulate(x, y))
            if prior_weight > 0 and prior_mean is not None:
                loss = loss + prior_weight * (x - centre).pow(2).mean()
            grads = torch.autograd.grad(loss, variables)
            for variable, grad in zip(variables, grads, strict=True):
                variable.grad = grad
            optimiser.step()
            schedule.step()
            if nonnegative:
                with torch.no_grad():
                    x.clamp_(min=0.0)
        # Restarts compete on the matching objective alone, at the final (clamped) inputs.
        y = labels if labels is not None else label_logits.detach().softmax(1)
        x_final = x.detach()
        final_distance = match(simulate(x_final, y)).item()
        if np.isnan(final_distance):
            final_distance = float("inf")  # a diverged restart loses to any finite one, but still counts
        if best_inputs is None or final_distance < best_distance:
            best_inputs, best_distance = x_final.clone(), final_distance
    return best_inputs


def invert_gradient(
    network: nn.Module,
    target: Mapping[str, Tensor],
    *,
    n_samples: int,
    n_features: int,
    labels: Tensor | None,
    key_material: Tensor | None,
    objective: Objective = "cosine",
    steps: int = 300,
    restarts: int = 2,
    lr: float = 0.1,
    nonnegative: bool = True,
    prior_mean: Tensor | None = None,
    prior_weight: float = 0.0,
    init_scale: float = 0.5,
    seed: int = 0,
) -> Tensor:
    """Reconstruct a client's inputs from the gradient it sent (DLG / inverting gradients).

    Dummy inputs are optimised with Adam so that their gradient, computed exactly as the client's
    (:func:`scinfl.privacy.gradients.loss_gradients`, evaluation mode) but under the *attacker's* key view,
    matches ``target`` on every parameter it names. The run with the lowest final objective among
    ``restarts`` initialisations is returned.

    Parameters
    ----------
    network
        The global network, with the weights the client's gradient was computed at.
    target
        The observed gradient: parameter name (as in ``named_parameters()``) to tensor. Only the parameters
        named here are matched, so an attacker who observes part of the model passes that part.
    n_samples
        Number of samples in the client's batch.
    n_features
        Number of input features.
    labels
        The batch's labels, e.g. from :func:`recover_labels`; None optimises soft labels jointly (DLG).
    key_material
        The attacker's key view: None for the keyless server, a wrong key (same generator), or the right
        key (an insider, the positive control). No effect on a network without keyed modules.
    objective
        ``"cosine"`` (inverting gradients, the reliable default) or ``"l2"`` (DLG, slower to converge);
        see :func:`gradient_distance`.
    steps, restarts, lr
        Adam steps per restart, number of restarts, initial step size (divided by 10 at 3/8, 5/8 and 7/8).
    nonnegative
        Clamp the reconstruction to ``>= 0`` after every step (expression data are non-negative).
    prior_mean
        The public mean profile ``(n_features,)`` (a real attacker has one from public atlases): even
        restarts start around it, odd restarts around zero, and ``prior_weight`` pulls the reconstruction
        towards it.
    prior_weight
        Weight of a Gaussian prior ``mean((x - prior_mean)^2)``; 0 (default) disables it.
    init_scale
        Standard deviation of the Gaussian noise of the initialisations (before clamping to ``>= 0``).
    seed
        Seed of the initialisations.

    Returns
    -------
    The reconstructed inputs, ``(n_samples, n_features)``, detached.
    """
    parameters = _attacked_parameters(network, target)

    def simulate(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return loss_gradients(network, x, y, parameters, key_material=key_material, create_graph=True)

    with evaluation_mode(network):
        return _reconstruct(
            network,
            simulate,
            target,
            n_samples=n_samples,
            n_features=n_features,
            labels=labels,
            objective=objective,
            steps=steps,
            restarts=restarts,
            lr=lr,
            nonnegative=nonnegative,
            prior_mean=prior_mean,
            prior_weight=prior_weight,
            init_scale=init_scale,
            seed=seed,
        )


def invert_update(
    network: nn.Module,
    update: Mapping[str, Tensor],
    *,
    n_samples: int,
    n_features: int,
    labels: Tensor | None,
    key_material: Tensor | None,
    steps_local: int,
    lr_local: float,
    objective: Objective = "cosine",
    steps: int = 300,
    restarts: int = 2,
    lr: float = 0.1,
    nonnegative: bool = True,
    prior_mean: Tensor | None = None,
    prior_weight: float = 0.0,
    init_scale: float = 0.5,
    seed: int = 0,
) -> Tensor:
    """Reconstruct a client's inputs from its update after several local SGD steps (``theta_K - theta_0``).

    The attacker unrolls the ``steps_local`` full-batch SGD steps on the dummy data differentiably
    (:func:`scinfl.privacy.gradients.sgd_update` with ``create_graph=True``, under its own key view) and
    matches the simulated update to the observed one. After several steps the update is no longer a
    multiple of one gradient, so simulating the trajectory is what makes the attack exact in principle.
    It assumes a client whose local training is stable: at a learning rate at which local SGD diverges
    (0.1 for these networks on log-normalised expression), the update is chaotic in the inputs and the
    attack fails for that reason, which is no protection a deployment can rely on.

    Parameters
    ----------
    network
        The global network at the start of the client's local training (``theta_0``).
    update
        The observed update: parameter name to ``theta_K - theta_0``.
    steps_local, lr_local
        The client's number of local SGD steps and learning rate (part of the protocol, known to the
        server).
    key_material
        The attacker's key view: None (keyless server), a wrong key, or the right key (positive control).
    n_samples, n_features, labels
        As for :func:`invert_gradient`. ``labels`` may come from :func:`recover_labels` applied to
        ``-update / (steps_local * lr_local)`` of the output layer's bias (and weight): the mean gradient
        along the trajectory, whose signs tell the classes apart as a single gradient's do.
    objective, steps, restarts, lr, nonnegative, prior_mean, prior_weight, init_scale, seed
        As for :func:`invert_gradient`.

    Returns
    -------
    The reconstructed inputs, ``(n_samples, n_features)``, detached.
    """
    parameters = _attacked_parameters(network, update)

    def simulate(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return sgd_update(
            network,
            x,
            y,
            parameters,
            key_material=key_material,
            steps=steps_local,
            lr=lr_local,
            create_graph=True,
        )

    with evaluation_mode(network):
        return _reconstruct(
            network,
            simulate,
            update,
            n_samples=n_samples,
            n_features=n_features,
            labels=labels,
            objective=objective,
            steps=steps,
            restarts=restarts,
            lr=lr,
            nonnegative=nonnegative,
            prior_mean=prior_mean,
            prior_weight=prior_weight,
            init_scale=init_scale,
            seed=seed,
        )
