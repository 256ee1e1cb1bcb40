"""The key recovery family: the server fits the key's representation (the paper's key vector or
coordinates, the hardened key's dense relaxation) on a few labelled public cells with the weights frozen,
beside a fresh model trained on those cells alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...nn import HardenedNetwork, KeyedModule
from ..hardened import (
    RelaxedHardenedKey,
    recover_relaxed_key,
)
from ..utility import (
    fresh_model_accuracy,
    predict_labels,
    recover_coordinates,
    recover_key_vector,
    scores,
)
from .core import (
    AuditContext,
    Collector,
    Family,
    material_of,
    register_family,
    wrong_key,
)


def _key_recovery(ctx: AuditContext, out: Collector, seed: int) -> None:
    if not isinstance(ctx.network, KeyedModule):
        return
    rng = np.random.default_rng([seed, 0xA0C])
    x, y = ctx.data.public_x, ctx.data.public_y
    n_total = len(ctx.data.members_x) + len(x)
    n_aux = max(2, min(len(x) // 2, round(ctx.options("key_recovery").aux_fraction * n_total)))
    order = rng.permutation(len(x))
    aux, test = order[:n_aux], order[n_aux:]
    y_test = y[test].numpy()
    steps = ctx.options("key_recovery").steps
    start = material_of(wrong_key(ctx.key, seed, 20_000), ctx.network)
    if isinstance(ctx.network, HardenedNetwork):
        # The continuous relaxation holds the true key: a dense map before every layer and after the last.
        for name, init in (
            ("from identity", RelaxedHardenedKey.identity(ctx.network)),
            ("from a wrong key", RelaxedHardenedKey.from_key(ctx.network, start)),
        ):
            relaxed = recover_relaxed_key(ctx.network, x[aux], y[aux], init=init, steps=steps)
            out.add(
                "key recovery",
                f"fit dense key maps {name} ({n_aux} labelled cells)",
                "server",
                scores(y_test, predict_labels(ctx.network, x[test], key_material=relaxed)),
            )
    else:
        key_dim = ctx.network.key_encoder.key_dim
        k = recover_key_vector(ctx.network, x[aux], y[aux], init=torch.zeros(key_dim), steps=steps)
        out.add(
            "key recovery",
            f"fit key vector ({n_aux} labelled cells)",
            "server",
            scores(y_test, predict_labels(ctx.network, x[test], key_vector=k)),
        )
        coords = recover_coordinates(ctx.network, x[aux], y[aux], init=start, steps=steps)
        out.add(
            "key recovery",
            f"fit coordinates ({n_aux} labelled cells)",
            "server",
            scores(y_test, predict_labels(ctx.network, x[test], key_material=coords)),
        )
    acc, bal = fresh_model_accuracy(
        ctx.config,
        x[aux],
        y[aux],
        x[test],
        y_test,
        epochs=ctx.options("key_recovery").fresh_model_epochs,
        seed=seed,
    )
    out.add(
        "key recovery",
        f"fresh model on the same {n_aux} cells",
        "no weights",
        {"accuracy": acc, "balanced_accuracy": bal},
    )
    out.add(
        "key recovery",
        "right key (reference)",
        "right key (positive control)",
        scores(y_test, predict_labels(ctx.network, x[test], key_material=ctx.right)),
    )


@dataclass(frozen=True)
class KeyRecoverySettings:
    """``aux_fraction``: labelled cells the attacker holds (a fraction of all cells); ``steps``: its fit's
    optimisation steps; ``fresh_model_epochs``: the fresh model's epochs on the same cells."""

    aux_fraction: float = 0.1
    steps: int = 300
    fresh_model_epochs: int = 60


FAMILY = register_family(
    Family(
        "key_recovery",
        label="key recovery",
        runs={"classes": _key_recovery},
        panel=("accuracy", "accuracy on never-trained cells"),
        settings=KeyRecoverySettings,
    )
)
