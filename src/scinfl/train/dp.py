"""Differentially private local training (DP-SGD with Opacus): the baseline INFL is compared against.

Each site runs DP-SGD on its own training cells (Abadi et al. 2016): every cell joins a batch independently
with probability ``q = batch_size / n_train`` (Poisson sampling), per-cell gradients are clipped to
``max_grad_norm``, and Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` is added to
their sum before the optimiser step. What the server sees of a site (its weights after each round, FedAvg,
the final model) is post-processing of these noisy steps.

Accounting. Before training, each site calibrates its noise multiplier with Opacus's RDP accountant so
that its *planned* steps -- ``rounds x local_epochs x ceil(1/q)``, those of a site sampled in every round --
spend the target ``(epsilon, delta)``. The site keeps one :class:`~opacus.accountants.RDPAccountant` across
all rounds and records only the steps it actually takes, so its reported (spent) epsilon is at most the
target: lower when the site sat out rounds (``fraction < 1``) or skipped empty batches. The target is thus
an upper bound calibrated for the busiest possible site.

The guarantee is per site and per training cell (example-level DP with respect to one cell of that site).
It does not cover a site's validation cells, which select the best round and are reported without noise.

Three choices to know about:

- An empty Poisson batch is skipped: no update, no accounting. It happens with probability ``(1 - q)^n``
  per step (below 1e-30 for 200 cells and q = 0.3). Strictly, the subsampled Gaussian analysis covers a
  noise-only step there (what Opacus's own data loader does); skipping reveals that the batch was empty,
  an event of that negligible probability.
- Plain networks only. Opacus computes per-sample gradients with per-layer rules that assume
  ``y = x Wᵀ + b``; keyed layers compute ``(x Wᵀ) * scale + shift`` with ``scale`` and ``shift`` from the
  key encoder and key heads, shared by every cell of the batch, so per-sample gradients (hence the clipping
  and the guarantee) would be wrong. BatchNorm mixes the cells of a batch and is rejected as well:
  networks trained with DP use LayerNorm (``ModelConfig(norm="layer")``).
- Noise and sampling come from torch's seeded generators (the same fit seed gives the same model), not
  from a cryptographically secure source (Opacus's ``secure_mode``): right for a reproducible baseline
  and audit, not for a production deployment.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import SiteDataset
from ..nn import HardenedLinear, KeyedLinear, KeyedModule
from .device import module_device, seeded_generator
from .settings import DPSettings

try:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from opacus.validators import ModuleValidator
except ImportError as error:  # an optional dependency: scinfl works without it
    raise ImportError("DP-SGD (dp=...) needs Opacus: pip install 'scinfl[dp]'.") from error

__all__ = ["DPSettings", "PrivateTraining", "calibrate_noise", "check_private_network", "spent_epsilon"]

# get_noise_multiplier's binary search stops within this much below the target epsilon.
EPSILON_TOLERANCE = 0.01


def check_private_network(network: nn.Module) -> None:
    """Raise a ValueError unless DP-SGD can compute exact per-sample gradients of ``network``."""
    if any(isinstance(m, KeyedModule | KeyedLinear | HardenedLinear) for m in network.modules()):
        raise ValueError(
            "DP-SGD (dp=...) is available for plain models only (key=None). Opacus computes per-sample "
            "gradients with per-layer rules that assume y = x W^T + b; keyed layers compute "
            "(x W^T) * scale + shift with a key-dependent scale and shift shared by the whole batch, so their "
            "per-sample gradients, and with them the clipping and the privacy guarantee, would be wrong."
        )
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        raise ValueError(
            "DP-SGD needs per-cell gradients, which BatchNorm mixes across a batch: build the network "
            "with norm='layer' (train_federated does so when dp is given)."
        )
    errors = ModuleValidator.validate(network, strict=False)
    if errors:
        raise ValueError(f"Opacus cannot train this network privately: {errors}")


class PrivateTraining:
    """One site's DP-SGD across all rounds: its sampling rate, noise multiplier and RDP accountant.

    Build it once per site before training; :func:`scinfl.train.fit_local` uses it in every round.

    Parameters
    ----------
    settings
        The privacy target.
    n_train
        The site's training cells.
    batch_size
        Expected Poisson batch size (the sample rate is ``min(1, batch_size / n_train)``).
    epochs
        Local epochs the site runs if sampled in every round: ``rounds * local_epochs``.

    Attributes
    ----------
    sample_rate
        ``q``, the probability that a cell joins a batch.
    steps_per_epoch
        ``ceil(1 / q)`` Poisson batches per local epoch.
    planned_steps
        ``epochs * steps_per_epoch``: the steps the noise multiplier is calibrated for.
    noise_multiplier
        Noise standard deviation relative to ``max_grad_norm``.
    accountant
        The site's RDP accountant; every step taken is recorded in it.
    steps_taken
        Optimiser steps taken so far, counted by the training loop (independently of the accountant).
    """

    def __init__(self, settings: DPSettings, *, n_train: int, batch_size: int, epochs: int) -> None:
        if n_train < 1:
            raise ValueError("DP-SGD needs at least one training cell.")
        self.settings = settings
        self.n_train = int(n_train)
        self.sample_rate = min(1.0, batch_size / n_train)
        self.steps_per_epoch = -(-self.n_train // int(batch_size))  # ceil(1/q), in exact integers
        self.planned_steps = int(epochs) * self.steps_per_epoch
        self.expected_batch_size = min(int(batch_size), self.n_train)
        self.noise_multiplier = calibrate_noise(
            settings.epsilon, settings.delta, self.sample_rate, self.planned_steps
        )
        self.accountant = RDPAccountant()
        self.steps_taken = 0

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the target delta (0 before the first step): the accountant's
        ``get_epsilon(delta)``, computed from a cached single-step RDP curve (the same numbers, without
        re-deriving the curve every round)."""
        return spent_epsilon(self.accountant, self.settings.delta)

    def loader(self, dataset: SiteDataset, *, seed: int) -> DataLoader:
        """Poisson-sampled batches of ``dataset`` (``steps_per_epoch`` per pass), reproducible from ``seed``."""
        if len(dataset) != self.n_train:
            raise ValueError(
                f"The sample rate was set for {self.n_train} cells, the dataset has {len(dataset)}."
            )
        sampler = UniformWithReplacementSampler(
            num_samples=len(dataset),
            sample_rate=self.sample_rate,
            generator=torch.Generator().manual_seed(_derived_seed(seed, "sampling")),
            steps=self.steps_per_epoch,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)

    @contextmanager
    def attach(
        self, network: nn.Module, optimizer: torch.optim.Optimizer, *, seed: int
    ) -> Iterator[DPOptimizer]:
        """Make one local fit private: per-sample gradient hooks on ``network``, a :class:`DPOptimizer`
        around ``optimizer`` (noise seeded from ``seed``) that reports every step to the accountant.

        The network is not wrapped (no ``_module.`` prefix in its state dict); the hooks and Opacus's
        per-parameter attributes are removed on exit.
        """
        check_private_network(network)
        hooks = GradSampleHooks(network, batch_first=True, loss_reduction="mean", strict=True)
        hooks.forbid_grad_accumulation()  # Poisson sampling: exactly one forward/backward per step
        try:
            private = DPOptimizer(
                optimizer,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.settings.max_grad_norm,
                expected_batch_size=self.expected_batch_size,
                loss_reduction="mean",
                # Opacus draws the noise where the gradients are, with this generator: a CPU generator
                # for a GPU's gradients is an error.
                generator=seeded_generator(_derived_seed(seed, "noise"), module_device(network)),
            )
            private.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
            with warnings.catch_warnings():
                # The first layer's input needs no gradient; Opacus's backward hook still sees its output.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield private
        finally:
            hooks.cleanup()
            for parameter in network.parameters():
                if hasattr(parameter, "summed_grad"):
                    del parameter.summed_grad

    def report(self) -> dict[str, float | int]:
        """What the site spent: noise multiplier, sample rate, planned and taken steps, and the epsilon
        of its accountant (``get_epsilon(delta)``)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "steps": self.steps_taken,
            "epsilon": float(self.accountant.get_epsilon(delta=self.settings.delta))
            if self.accountant.history
            else 0.0,
        }


@functools.lru_cache(maxsize=256)
def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier for which ``steps`` steps at ``sample_rate`` spend ``(epsilon, delta)``.

    Opacus's binary search with the RDP accountant (``get_noise_multiplier``), which stops within
    :data:`EPSILON_TOLERANCE` below the target. It takes seconds for large epsilons, so results are
    cached: they depend on these four numbers only.
    """
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=EPSILON_TOLERANCE,
            )
        )
    except ValueError as error:
        raise ValueError(
            f"No noise level reaches epsilon={epsilon} over {steps} steps at sample rate "
            f"{sample_rate:.3g} ({error}); raise epsilon or train fewer steps."
        ) from None


@functools.lru_cache(maxsize=256)
def _step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at the accountant's default orders."""
    rdp = compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    rdp.flags.writeable = False
    return rdp


def spent_epsilon(accountant: RDPAccountant, delta: float) -> float:
    """``accountant.get_epsilon(delta)`` (0 without steps), reusing each ``(noise, rate)``'s RDP curve.

    RDP composes by addition, so ``n`` steps cost ``n`` times one step's RDP: the sum below is the one
    ``RDPAccountant.get_privacy_spent`` forms, and the conversion to epsilon is Opacus's own.
    """
    if not accountant.history:
        return 0.0
    rdp = sum(_step_rdp(sigma, rate) * steps for sigma, rate, steps in accountant.history)
    epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


_STREAMS = {"sampling": 0x5A3F, "noise": 0x4015}


def _derived_seed(seed: int, purpose: str) -> int:
    """An independent seed for one use (batch sampling, noise) of a local fit's seed."""
    return int(np.random.SeedSequence([int(seed), _STREAMS[purpose]]).generate_state(1)[0])
