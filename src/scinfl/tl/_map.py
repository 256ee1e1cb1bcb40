"""A new site joins a trained site-aware model: query mapping, as scArches does for scvi-tools."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from anndata import AnnData

from .._settings import settings, torch_threads
from ..federation.site import build_site
from ..key import FederationKey, as_key
from ..model import FederatedModel
from ..tasks import build_network
from ..tasks.embedding import Embedding, batch_of
from ._federated import predict

__all__ = ["map_site"]


def map_site(
    adata: AnnData,
    model: FederatedModel,
    *,
    key: FederationKey | str | os.PathLike[str] | None,
    site: str,
    epochs: int = 20,
    seed: int = 0,
    key_added: str = "scinfl",
    copy: bool = False,
) -> FederatedModel | tuple[FederatedModel, AnnData]:
    """Map a site that was not in the federation into a site-aware model's latent, at the site.

    The site trains only its own batch parameters (:class:`scinfl.tasks.Embedding` with
    ``site_effects`` or ``batch_key``): the normalisation statistics of its cells
    (:class:`~scinfl.nn.BatchwiseNorm`) and its decoder shift, for ``epochs`` passes over its training
    cells, with the consortium's weights frozen, under the key. The new model is the old one with the
    site's batches added; every weight of the old one is unchanged, and the old model itself is not
    touched. The site's embedding and outputs are then written into ``adata``, as :func:`predict` does.

    Without mapping, :func:`predict` embeds a new site with the mean of the known sites' statistics.

    Parameters
    ----------
    adata
        The new site's cells, with the values the model was trained on.
    model
        A trained site-aware :class:`~scinfl.FederatedModel`.
    key
        The federation key, or its file's path (None for a plain model).
    site
        The new site's name (with ``batch_key``, its batches are its (site, category) pairs or categories).
    epochs
        Passes over the site's training cells.
    seed
        Seed of the site's training and validation split and of its batches' order.
    key_added
        Prefix of the output keys.
    copy
        Return ``(model, adata copy with the outputs)`` instead of writing into ``adata``.

    Returns
    -------
    The mapped model (with ``copy=True``, and the AnnData copy).
    """
    if not isinstance(model, FederatedModel):
        raise TypeError(f"model must be a scinfl.FederatedModel, got {type(model).__name__}.")
    task = model.task
    if not isinstance(task, Embedding) or not task.conditioned:
        raise ValueError(
            "map_site needs a site-aware model: si.tasks.Embedding(site_effects=True) or batch_key=; this "
            f"one is task={task.name!r} without batches. Use si.tl.predict to embed new cells."
        )
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    key = as_key(key)
    model.check_key(key)
    names = task.site_batches(adata, site)
    known = [name for name in names if name in task.batches(model.schema)]
    if known:
        raise ValueError(
            f"Site {site!r}: batch {known[0]!r} is already in the model (trained by the federation); "
            "name the new site differently, or embed its cells with si.tl.predict."
        )
    schema = task.with_batches(model.schema, names)
    config = dataclasses.replace(model.config, schema=schema)
    with torch.random.fork_rng(devices=[]):
        network = build_network(config)
    state = network.state_dict()
    state.update(model.network.state_dict())  # every old entry as it was; the new batches' from their init
    network.load_state_dict(state)
    fit = dataclasses.replace(model.spec.fit, local_epochs=1)  # one pass per step of the loop below
    spec = model.spec.replace(sites=(site,), seed=seed, rounds=epochs, secure_aggregation=False, fit=fit)
    position = {name: i for i, name in enumerate(task.batches(schema))}
    own = {position[name] for name in names}
    new_entries = frozenset(n for n in state if batch_of(n) in own)
    with torch_threads(settings.torch_threads):
        trainer = build_site(spec, config, adata, site, key, trained=new_entries)
        current = {name: tensor.clone() for name, tensor in network.state_dict().items()}
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            update = trainer.fit(current, seed=int(rng.integers(2**31)))
            current.update(update.state)
    network.load_state_dict(current)
    mapped = FederatedModel(
        network,
        config,
        model.spec,
        history=model.history,
        params={**model.params, "mapped": {**model.params.get("mapped", {}), site: epochs}},
    )
    out = adata.copy() if copy else adata
    predict(out, mapped, key=key, key_added=key_added, site=site)
    return (mapped, out) if copy else mapped
