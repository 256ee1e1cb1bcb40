"""The inversion family: gradient inversion (DLG-style L2, inverting-gradients cosine) of single cells,
batches and multi-step updates, as the keyless server, with a wrong key and with the right key (the
positive control); label recovery from the last bias."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ...nn import HardenedNetwork
from ..gradients import client_gradient, client_update
from ..hardened import (
    RelaxedHardenedKey,
    invert_gradient_joint,
    labels_by_frequency,
)
from ..inversion import invert_gradient, invert_update, recover_labels
from .core import (
    AuditContext,
    Collector,
    Family,
    attacker_views,
    labels_in_view,
    matched,
    register_family,
    victims_of,
)


def _hardened_inversion(
    ctx: AuditContext, out: Collector, seed: int, single: dict[int, dict[str, Tensor]]
) -> None:
    """Adaptive attacks on single-cell gradients that only make sense against ``scheme="hardened"``."""
    o = ctx.options("inversion")
    last_bias = f"{ctx.last_layer}.bias"
    positions = np.array([int(recover_labels(g[last_bias], 1)[0]) for g in single.values()])
    truth = ctx.data.members_y[list(single)].numpy()
    # The output units are relabelled by the key: the attacker maps positions to labels by class frequency.
    guessed = labels_by_frequency(positions, ctx.data.public_y.numpy(), ctx.network.layout.n_outputs)
    for correct in guessed == truth:
        out.add("inversion", "label by frequency analysis", "server", {"label_recovered": float(correct)})
    init = RelaxedHardenedKey.identity(ctx.network)
    for (victim, grads), position in zip(single.items(), positions, strict=True):
        rec = invert_gradient_joint(
            ctx.network,
            grads,
            labels=torch.tensor([position]),
            init=init,
            prior_mean=torch.from_numpy(ctx.public_mean),
            steps=o.steps,
            seed=seed,
        )
        out.add(
            "inversion",
            "gradient, 1 cell, joint with key maps",
            "server",
            ctx.metrics(rec[0].cpu().numpy(), victim),
        )


def _inversion(ctx: AuditContext, out: Collector, seed: int) -> None:
    s, o = ctx.settings, ctx.options("inversion")
    common = {
        "n_features": ctx.data.n_features,
        "steps": o.steps,
        "restarts": o.restarts,
        "prior_mean": torch.from_numpy(ctx.public_mean),
        "seed": seed,
    }
    last_bias = f"{ctx.last_layer}.bias"
    victims = victims_of(ctx, seed, max([o.victims, o.update_batch, *o.batches]))
    single = {}
    for victim in victims[: o.victims]:
        x, y = ctx.data.members_x[victim : victim + 1], ctx.data.members_y[victim : victim + 1]
        single[int(victim)] = client_gradient(ctx.network, x, y, key_material=ctx.right, private=s.private)
    if isinstance(ctx.network, HardenedNetwork):
        _hardened_inversion(ctx, out, seed, single)
    for view, guess in attacker_views(ctx.network, ctx.key, seed).items():
        for victim in victims[: o.victims]:
            x, y = ctx.data.members_x[victim : victim + 1], ctx.data.members_y[victim : victim + 1]
            grads = single[int(victim)]
            labels = labels_in_view(recover_labels(grads[last_bias], 1), guess)
            out.add(
                "inversion",
                "label from last bias (iDLG)",
                view,
                {"label_recovered": float(labels[0] == y[0])},
            )
            rec = invert_gradient(
                ctx.network, grads, n_samples=1, labels=labels, key_material=guess, **common
            )
            rec = rec.cpu()
            out.add("inversion", "gradient, 1 cell", view, ctx.metrics(rec[0].numpy(), int(victim)))
            out.example("gradient, 1 cell", view, x[0].numpy(), rec[0].numpy())
        for size in o.batches:
            batch = victims[:size]
            x, y = ctx.data.members_x[batch], ctx.data.members_y[batch]
            grads = client_gradient(ctx.network, x, y, key_material=ctx.right, private=ctx.settings.private)
            labels = labels_in_view(recover_labels(grads[last_bias], size), guess)
            rec = invert_gradient(
                ctx.network, grads, n_samples=size, labels=labels, key_material=guess, **common
            )
            for victim, row in matched(ctx, rec, batch):
                out.add("inversion", f"gradient, batch of {size}", view, ctx.metrics(row, victim))
        batch = victims[: o.update_batch]
        x, y = ctx.data.members_x[batch], ctx.data.members_y[batch]
        update = client_update(
            ctx.network,
            x,
            y,
            key_material=ctx.right,
            steps=o.update_local_steps,
            lr=o.update_lr,
            private=s.private,
        )
        mean_gradient = -update[last_bias] / (o.update_local_steps * o.update_lr)
        labels = labels_in_view(recover_labels(mean_gradient, len(batch)), guess)
        rec = invert_update(
            ctx.network,
            update,
            n_samples=len(batch),
            labels=labels,
            key_material=guess,
            steps_local=o.update_local_steps,
            lr_local=o.update_lr,
            **common,
        )
        attack = f"update, {o.update_local_steps} local steps, batch of {len(batch)}"
        for victim, row in matched(ctx, rec, batch):
            out.add("inversion", attack, view, ctx.metrics(row, victim))


@dataclass(frozen=True)
class InversionSettings:
    """Victims attacked per seed, the batch sizes of batch inversion, optimisation steps and restarts of
    each inversion; the simulated client's update (batch, plain SGD steps and their learning rate: at 0.1
    its local training diverges and the update carries nothing, 0.001 is stable for every network)."""

    victims: int = 8
    batches: Sequence[int] = (8, 32)
    steps: int = 300
    restarts: int = 2
    update_batch: int = 4
    update_local_steps: int = 3
    update_lr: float = 0.001


FAMILY = register_family(
    Family(
        "inversion",
        runs={"classes": _inversion},
        panel=("pearson_minus_mean", "Pearson (minus public mean) with the victim"),
        settings=InversionSettings,
    )
)
