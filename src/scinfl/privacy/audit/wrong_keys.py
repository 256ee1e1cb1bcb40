"""The utility family: what the aggregated weights are worth with the right key, wrong keys from the same
generator, one-bit flips of the right key and no key, against chance (and, for a model without classes,
against the input profiles themselves)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...nn import KeyedModule
from ..metrics import (
    pearson,
)
from ..utility import (
    knn_labels,
    scores,
)
from .core import (
    AuditContext,
    Collector,
    Family,
    material_of,
    perturbation_changes,
    predicted_profiles,
    register_family,
    wrong_key,
)


def _utility(ctx: AuditContext, out: Collector, seed: int) -> None:
    y = ctx.data.public_y.numpy()
    net = ctx.network
    name = "accuracy" if ctx.classifier else "kNN label transfer"
    if not isinstance(net, KeyedModule):
        out.add("utility", name, "server", scores(y, ctx.predict(None)))
    else:
        out.add("utility", name, "right key", scores(y, ctx.predict(ctx.right)))
        out.add("utility", name, "no key", scores(y, ctx.predict(None)))
        for i in range(ctx.options("utility").n_wrong_keys):
            guess = material_of(wrong_key(ctx.key, seed, i), net)
            out.add("utility", name, "wrong key", scores(y, ctx.predict(guess)))
            bit = int(np.random.default_rng([seed, i]).integers(0, 256))
            flipped = material_of(ctx.key.with_bit_flipped(bit), net)
            out.add("utility", name, "one-bit flip", scores(y, ctx.predict(flipped)))
    if not ctx.classifier:
        # What the labelled cells give without any model: label transfer on the input profiles themselves.
        raw = knn_labels(ctx.data.members_x.numpy(), ctx.data.members_y.numpy(), ctx.data.public_x.numpy())
        out.add("utility", name, "input profiles (no model)", scores(y, raw))
    counts = np.bincount(y)
    out.add(
        "utility",
        name,
        "chance",
        {"accuracy": counts.max() / counts.sum(), "balanced_accuracy": 1.0 / np.count_nonzero(counts)},
    )


def _perturbation_utility(ctx: AuditContext, out: Collector, seed: int) -> None:
    """Pearson delta of the public cells' conditions under each key view, and without a model."""
    x, y = ctx.data.public_x, ctx.data.public_y
    name = "Pearson delta"

    def add(view: str, material) -> None:
        for observed, predicted in perturbation_changes(ctx, x, y, predicted_profiles(ctx, x, material)):
            out.add("utility", name, view, {"pearson_delta": pearson(predicted, observed)})

    if not isinstance(ctx.network, KeyedModule):
        add("server", None)
    else:
        add("right key", ctx.right)
        add("no key", None)
        for i in range(ctx.options("utility").n_wrong_keys):
            add("wrong key", material_of(wrong_key(ctx.key, seed, i), ctx.network))
            bit = int(np.random.default_rng([seed, i]).integers(0, 256))
            add("one-bit flip", material_of(ctx.key.with_bit_flipped(bit), ctx.network))
    # Without a model: the mean change of the trained-on cells' perturbed conditions, for every condition.
    members = perturbation_changes(ctx, ctx.data.members_x, ctx.data.members_y, None)
    mean_change = np.mean([observed for observed, _ in members], axis=0)
    for observed, _ in perturbation_changes(ctx, x, y, None):
        out.add("utility", name, "mean change (no model)", {"pearson_delta": pearson(mean_change, observed)})


@dataclass(frozen=True)
class UtilitySettings:
    """``n_wrong_keys``: wrong keys drawn per seed (each beside a one-bit flip of the right key)."""

    n_wrong_keys: int = 10


FAMILY = register_family(
    Family(
        "utility",
        runs={"classes": _utility, "embedding": _utility, "profile": _perturbation_utility},
        panel=("accuracy", "accuracy on never-trained cells"),
        settings=UtilitySettings,
    )
)
