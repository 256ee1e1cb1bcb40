"""Key rotation: move a trained model to a new key version."""

from __future__ import annotations

import copy as copy_module
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from anndata import AnnData

from ..key import FederationKey, as_key
from ..model import FederatedModel
from ..nn import HardenedNetwork
from ..train import key_material
from ._federated import train_federated


def rekey(
    model: FederatedModel,
    sites: Mapping[str, AnnData] | Sequence[AnnData] | None = None,
    *,
    old_key: FederationKey,
    new_key: FederationKey,
    method: Literal["finetune", "convert"] = "finetune",
    rounds: int = 10,
    **train_options: Any,
) -> FederatedModel:
    """A copy of ``model`` that works under ``new_key``; the aggregator then accepts only the new key version.

    After a rotation, updates made under the old key's fingerprint are rejected by the aggregator
    (:func:`scinfl.federation.aggregate`) and :meth:`FederatedModel.predict` refuses the old key.

    Parameters
    ----------
    model
        A keyed model trained under ``old_key``.
    sites
        The sites' AnnData, for ``method="finetune"`` (and for ``method="convert"`` with ``rounds > 0``).
    old_key
        The key the model was trained under (checked against the model's fingerprint).
    new_key
        The new key, of the same scheme.
    method
        ``"finetune"``: federated training under the new key for ``rounds`` rounds, starting from the old
        weights (under the new key they compute nothing useful, so they are no warm start: plan the rounds
        of a training from scratch). ``"convert"`` (``scheme="hardened"`` only): carry the weights exactly
        to the new key's basis (no training; the model computes the same function under the new key),
        optionally followed by ``rounds`` rounds of fine-tuning. The two versions of the weights are then
        related exactly through both keys, so anyone who holds the old key and sees both versions can work
        out most of the new key. The privacy audit does not measure either method against such an
        attacker.
    rounds
        Federated rounds under the new key.
    train_options
        Passed to :func:`scinfl.tl.train_federated` (e.g. ``seed``, ``copy``).

    Returns
    -------
    The re-keyed :class:`~scinfl.FederatedModel` (the original is left unchanged).
    """
    if model.config.scheme is None:
        raise ValueError("This model has no key (plain FedAvg); there is nothing to re-key.")
    old_key, new_key = as_key(old_key, name="old_key"), as_key(new_key, name="new_key")
    for name, key in (("old_key", old_key), ("new_key", new_key)):
        if key is None:
            raise TypeError(f"{name} must be a scinfl.FederationKey or the path of a key file, got None.")
    if old_key.fingerprint != model.key_fingerprint:
        raise ValueError(
            f"old_key (fingerprint {old_key.fingerprint}) is not the key this model was trained under "
            f"({model.key_fingerprint})."
        )
    if new_key.scheme != model.config.scheme:
        raise ValueError(f"new_key is for scheme {new_key.scheme!r}; the model uses {model.config.scheme!r}.")
    if new_key == old_key:
        raise ValueError("new_key is the old key.")
    if method not in ("finetune", "convert"):
        raise ValueError(f"method must be 'finetune' or 'convert', got {method!r}.")
    start = model
    if method == "convert":
        if not isinstance(model.network, HardenedNetwork):
            raise ValueError("method='convert' needs a scheme='hardened' model; use method='finetune'.")
        network = copy_module.deepcopy(model.network)
        with torch.no_grad():
            plain = network.to_plain(network.state_dict(), key_material(old_key, network))
            network.load_state_dict(network.from_plain(plain, key_material(new_key, network)))
        start = FederatedModel(
            network,
            model.config,
            model.spec.replace(key_fingerprint=new_key.fingerprint),
            history=model.history,
            params={**model.params, "rekeyed_from": model.key_fingerprint},
        )
        if rounds == 0:
            return start
    if sites is None:
        raise ValueError(f"method={method!r} with rounds > 0 needs the sites' data to train on.")
    trained = train_federated(sites, key=new_key, init=start, rounds=rounds, **train_options)
    trained.params["rekeyed_from"] = model.key_fingerprint
    return trained
