"""The site side of every engine: what a site publishes, the one builder of its trainer, its answers.

The in-process transport and Flower's ClientApp call the same functions here, so a site computes the
same thing whichever engine drives it. The key is an argument of these functions, held by the caller at
the site; what they return (descriptions, weights, counts, metrics, fingerprints, DP accounting) holds no
key material.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._settings import settings
from ..data import SiteDataset, stratified_split
from ..key import FederationKey
from ..nn import HardenedNetwork
from ..tasks import ModelConfig, build_network
from ..train import LocalFitResult, SiteTrainer, copy_state, key_material
from .identity import Roster, SiteIdentity, SiteRefusal, SiteSecrets, check_cohort
from .secure import MaskedUpdate, MaskingKey, SecureRound, mask_update, run_digest
from .spec import RunSpec

__all__ = [
    "Hello",
    "Instruction",
    "Reply",
    "answer",
    "build_site",
    "hello",
    "initial_weights",
    "site_secrets",
    "site_split",
]

logger = logging.getLogger("scinfl")


@dataclass(frozen=True)
class Hello:
    """A site's answer to the first exchange: its description (:meth:`scinfl.tasks.Task.describe`), the
    fingerprint of the key it holds (None without a key) and, for a run with secure aggregation, the
    public half of its masking key for the run (:class:`~scinfl.federation.secure.MaskingKey`), signed by
    its identity (:mod:`scinfl.federation.identity`)."""

    description: dict[str, Any]
    key_fingerprint: str | None
    masking_key: bytes | None = None
    masking_signature: bytes | None = None  # the site's identity signature of its masking key for the run


@dataclass(frozen=True)
class Instruction:
    """What the round loop asks of one site in one exchange.

    ``evaluate``: validation metrics of the weights sent (the previous round's aggregate); ``train``:
    then train on them with ``fit_seed``; ``restore``: the site's running state to continue from (after a
    resume), as its :meth:`~scinfl.train.SiteTrainer.local_state` gave it; ``secure``: send the update
    masked for this cohort (:mod:`scinfl.federation.secure`), not in the clear. ``round_index``: the
    round this exchange belongs to (the site's logger files its metrics under it).
    """

    train: bool
    evaluate: bool
    fit_seed: int = 0
    round_index: int = 0
    restore: Mapping[str, Any] | None = None
    secure: SecureRound | None = None


@dataclass
class Reply:
    """A site's answer to an :class:`Instruction`: its update in the clear, or masked in a secure round."""

    n_train: int
    key_fingerprint: str | None
    update: LocalFitResult | MaskedUpdate | None = None
    evaluation: dict[str, float] | None = None
    local_state: dict[str, Any] = field(default_factory=dict)


def hello(
    spec: RunSpec, data, site: str, key: FederationKey | None, secrets: SiteSecrets | None = None
) -> Hello:
    """What ``site`` publishes before training: names and counts, its key's fingerprint, and for a run
    with secure aggregation the public half of its masking key, signed (``secrets``: what the site holds
    for the run's masks, :func:`site_secrets`)."""
    return Hello(
        spec.task.describe(data, site),
        None if key is None else key.fingerprint,
        None if secrets is None else secrets.masking_key.public,
        None if secrets is None else secrets.signature,
    )


def site_secrets(spec: RunSpec, site: str, identity: SiteIdentity, roster: Roster) -> SiteSecrets:
    """A fresh masking key for ``spec``'s run at ``site``, with the identity that signs it, the roster the
    site checks its cohorts against, and the run it is for (a digest of the spec the site was shown)."""
    return SiteSecrets(site, MaskingKey.generate(), identity, roster, run_digest(spec.to_json()))


def initial_weights(config: ModelConfig, seed: int, key: FederationKey | None = None) -> dict[str, Tensor]:
    """The run's initial global weights, drawn from ``seed``.

    A hardened network starts as the plain network's initialisation carried to the shared basis, so that
    training is plain FedAvg's. That initialisation is drawn from a seed derived from the key and ``seed``:
    the server, which knows ``seed``, must not hold both the plain weights and their keyed form. Only a key
    holder computes it (in a deployment, the first site). Other networks need no key.
    """
    with torch.random.fork_rng(devices=[]):
        hardened = config.scheme == "hardened"
        if hardened and key is None:
            raise ValueError("The initial weights of a hardened network are computed where the key is.")
        draw = int.from_bytes(key.derive(f"initial-weights/{int(seed)}", 8), "little") if hardened else seed
        torch.manual_seed(draw)
        network = build_network(config)
    state = network.state_dict()
    if hardened:
        assert isinstance(network, HardenedNetwork)
        with torch.no_grad():
            # Freshly built, the hardened network holds the plain network's initialisation, draw for draw.
            state = network.from_plain(state, key_material(key, network))
    return copy_state(state)


def site_split(spec: RunSpec, site: str, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``site``'s training and validation cells (sorted indices), as every engine draws them: stratified
    by ``labels`` (rare classes kept for training), seeded by the run's seed and the site's position in
    the roster. The validation cells are never trained on; they only select the best round."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0x5EED, spec.sites.index(site)]))
    return stratified_split(labels, spec.validation_fraction, rng)


def build_site(
    spec: RunSpec,
    config: ModelConfig,
    data,
    site: str,
    key: FederationKey | None,
    *,
    trained: Set[str] | None = None,
) -> SiteTrainer:
    """The one builder of a site's trainer, for every engine: its inputs (the task's), its training and
    validation split (seeded by the run's seed and the site's position), its copy of the network, its key
    material, its DP-SGD state. ``trained``: the ``state_dict`` entries it trains and sends (default: the
    task's :meth:`~scinfl.tasks.Task.trained_parameters`)."""
    task = config.task
    inputs = task.inputs(data, site, config.schema)
    labels = task.labels(data, site, config.schema)
    train_index, validation_index = site_split(spec, site, labels)
    train = SiteDataset(inputs, train_index, labels)
    validation = SiteDataset(inputs, validation_index, labels)
    with torch.random.fork_rng(devices=[]):  # the weights are the global model's: no draw of the caller's
        network = build_network(config)
    private = None
    if spec.dp is not None:
        from ..train.dp import PrivateTraining

        private = PrivateTraining(
            spec.dp,
            n_train=len(train),
            batch_size=spec.fit.batch_size,
            epochs=spec.rounds * spec.fit.local_epochs,
        )
        if spec.dp.delta * len(train) > 1:
            logger.warning(
                "Site %r: delta=%g is not below 1/n_train (%d training cells); a meaningful guarantee needs "
                "delta << 1/n.",
                site,
                spec.dp.delta,
                len(train),
            )
    return SiteTrainer(
        site,
        train,
        validation,
        network,
        task.objective(config, inputs.measured),
        key_material=None if config.scheme is None else key_material(key, network),
        key_fingerprint=None if key is None else key.fingerprint,
        settings=spec.fit,
        private=private,
        trained=task.trained_parameters(network, inputs) if trained is None else trained,
    )


def answer(
    trainer: SiteTrainer,
    state: Mapping[str, Tensor],
    instruction: Instruction,
    secrets: SiteSecrets | None = None,
) -> Reply:
    """Carry out ``instruction``: evaluate the received weights, then train on them, as asked; in a
    secure round, check the cohort against the site's roster and its members' signatures
    (:func:`~scinfl.federation.identity.check_cohort`), then mask the update with the site's masking key
    (``secrets``, from its hello)."""
    secure = instruction.secure
    if secure is not None:  # before anything is computed: a refused round costs the site nothing
        if secrets is None:
            raise SiteRefusal(
                f"Site {trainer.name!r} was asked for a masked update but holds no masking key for the run."
            )
        if secure.run != secrets.run:
            raise SiteRefusal(
                f"Site {trainer.name!r} refuses to mask for run {secure.run!r}: it joined run {secrets.run!r}."
            )
        check_cohort(secure.cohort, secure.public_keys, secure.signatures, secrets)
    if instruction.restore is not None:
        trainer.restore_local_state(instruction.restore)
    evaluation = trainer.evaluate(state) if instruction.evaluate else None
    update = trainer.fit(state, seed=instruction.fit_seed) if instruction.train else None
    log_site_metrics(trainer.name, instruction.round_index, evaluation, update)
    if update is not None and secure is not None:
        update = _masked(trainer.name, update, state, secure, secrets.masking_key)
    return Reply(
        n_train=trainer.n_train,
        key_fingerprint=trainer.key_fingerprint,
        update=update,
        evaluation=evaluation,
        local_state=trainer.local_state(),
    )


def log_site_metrics(
    site: str, round_index: int, evaluation: Mapping[str, float] | None, update: LocalFitResult | None
) -> None:
    """Send one exchange's metrics to the site's Lightning logger (``scinfl.settings.logger``), if it has
    one: validation metrics of the weights it received, at the step of the round that made them
    (``round_index - 1``, as the run's history files them), as ``<site>/val_<metric>``; its training
    metrics at ``round_index``, as ``<site>/<metric>``. The logger is the site's: in a deployment, its
    own process's settings."""
    logger = settings.logger
    if logger is None:
        return
    if evaluation is not None and evaluation.get("n", 0.0):
        values = {f"{site}/val_{name}": float(value) for name, value in evaluation.items() if name != "n"}
        logger.log_metrics(values, step=max(round_index - 1, 0))
    if update is not None:
        logger.log_metrics(
            {f"{site}/{name}": float(v) for name, v in update.metrics.items()}, step=round_index
        )
    logger.save()


def _masked(
    site: str,
    update: LocalFitResult,
    state: Mapping[str, Tensor],
    secure: SecureRound,
    masking_key: MaskingKey,
) -> MaskedUpdate:
    """``update`` as a secure round sends it. A non-finite update is not masked: the site says so, and
    the round loop stops naming it."""
    finite = all(bool(torch.isfinite(t).all()) for t in update.state.values())
    finite = finite and bool(np.isfinite(update.metrics.get("train_loss", 0.0)))
    return MaskedUpdate(
        masked=mask_update(update.state, update.n_obs, state, secure, site, masking_key) if finite else None,
        n_obs=update.n_obs,
        key_fingerprint=update.key_fingerprint,
        metrics=dict(update.metrics),
        finite=finite,
    )
