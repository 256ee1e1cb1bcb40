"""The geometry family: many leaked vectors read together, keyless, by matching their geometry to a public
cohort (:mod:`scinfl.privacy.geometry`), in one site's single-cell gradients and in the secure sums."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..analytic import (
    first_layer_rows,
    invert_first_layer,
)
from ..geometry import (
    infer_cell_types,
    linkage_ranks,
    match_geometry,
    reconstruct,
    reconstruction_similarity,
)
from ..gradients import client_gradient
from ..metrics import (
    nearest_reference,
)
from ..server_view import secure_round_changes
from .core import (
    AuditContext,
    Collector,
    Family,
    InputPart,
    add_priors,
    register_family,
    victims_of,
)

# The geometry family's two server views: one site's single-cell gradients (what a server that saw each
# update would read: the positive control) and what it receives with secure aggregation.
PER_SITE_VIEW = "server, one site's single-cell gradients"


SECURE_SUM_VIEW = "server, secure sum"


WITHOUT_SITE_VIEW = "server, secure sum without the site (control)"


def _linkage(rank: int | None, n_pool: int) -> dict[str, float]:
    """Linkage figures of one victim whose own cell ranked ``rank`` in a pool of ``n_pool`` cells, beside
    chance; ``rank=None`` gives a random ranking's expected values (the prior)."""
    chance_rr = float(np.sum(1.0 / np.arange(1, n_pool + 1)) / n_pool)
    top1, reciprocal = (1.0 / n_pool, chance_rr) if rank is None else (float(rank == 1), 1.0 / rank)
    return {
        "top1": top1,
        "top1_x_chance": top1 * n_pool,
        "reciprocal_rank": reciprocal,
        "mrr_x_chance": reciprocal / chance_rr,
    }


def _geometry(ctx: AuditContext, out: Collector, seed: int) -> None:
    """Geometry matching of many leaked vectors together, keyless (:mod:`scinfl.privacy.geometry`), in
    two server views of the same victims.

    The public cells are split at random in two halves: the attacker's cohort (what it matches against,
    its labels and mean profiles) and the stand-in sites, ``cohort - 1`` of them, that share the audited
    site's secure rounds.

    ``server, one site's single-cell gradients`` (the positive control: what a server reads when it sees
        each update, and the worst case of ``secure_aggregation=False``). Each victim's first-layer leak
        ``dW / db``; the set is coupled with the attacker's cohort by entropic Gromov-Wasserstein. Per
        victim: its inferred cell type, its reconstruction (the coupling-weighted public profiles), and
        the rank of its own cell in a pool of true profiles that holds it (members and the attacker's
        cohort), by the coupling of the leaked set with the pool.
    ``server, secure sum``
        What the server decodes with secure aggregation (:func:`~scinfl.privacy.server_view.secure_round_changes`):
        each round's change of the global weights, after a real local fit at the audited site (its
        audited cells) and the stand-ins, over ``secure_rounds`` rounds from the trained weights. Every
        active row of the first layer's change is a vector (a mixture of the round's cells); they are
        coupled with the attacker's cohort and with the pool. None belongs to one cell, so the attacker's
        guess for any victim is one for the whole site: the most frequent inferred cell type, and any of
        the reconstructions (its figures are their mean over the reconstructions); the pool is ranked by
        each cell's largest share of a vector's coupling. Beside
        them, an oracle that picks for each victim the best of all reconstructions (an upper bound),
        against the same oracle over the public cell-type means, and over the reconstructions of
        ``server, secure sum without the site (control)``: the same rounds with the stand-ins alone, sums
        that hold none of the victims (what a best of that many reconstructions reaches by chance).

    A DP-SGD model's per-site leaks are clipped and noised as its clients'; its secure rounds are not
    (an upper bound on what the sum reveals).
    """
    s, o = ctx.settings, ctx.options("geometry")
    n_public = len(ctx.data.public_x)
    n_stand_ins = max(s.cohort, 2) - 1
    if n_public < 2 * max(4, 2 * n_stand_ins):
        raise ValueError(
            f"The geometry attacks split the public cells between the attacker's cohort and "
            f"{n_stand_ins} stand-in site(s); {n_public} public cells are too few."
        )
    order = np.random.default_rng([seed, 0x6E0]).permutation(n_public)
    attacker, stand_in = np.sort(order[: n_public // 2]), np.sort(order[n_public // 2 :])
    cohort = [(ctx.data.members_x, ctx.data.members_y)] + [
        (ctx.data.public_x[rows], ctx.data.public_y[rows]) for rows in np.array_split(stand_in, n_stand_ins)
    ]
    # the rounds with the audited site, and the control's without it (a lone stand-in sums with itself)
    changes, without_site = (
        secure_round_changes(
            ctx.network,
            sites,
            objective=ctx.objective,
            fit=s.fit,
            key_material=ctx.right,
            rounds=o.secure_rounds,
            seed=seed,
        )
        for sites in (cohort, cohort[1:] if len(cohort) > 2 else cohort[1:] * 2)
    )
    victims = victims_of(ctx, seed, o.victims)
    for part in ctx.parts:
        _geometry_part(ctx, out, seed, part, attacker, changes, without_site, victims)


def _geometry_part(
    ctx: AuditContext,
    out: Collector,
    seed: int,
    part: InputPart,
    attacker: np.ndarray,
    changes: list[dict[str, Tensor]],
    without_site: list[dict[str, Tensor]],
    victims: np.ndarray,
) -> None:
    s, o = ctx.settings, ctx.options("geometry")
    suffix, single = part.suffix, len(ctx.parts) == 1
    public, public_y = part.public[attacker], ctx.data.public_y.numpy()[attacker]
    members_y = ctx.data.members_y.numpy()
    classes, counts = np.unique(public_y, return_counts=True)
    majority = classes[np.argmax(counts)]
    # The linkage pool: every victim, other members and the attacker's cohort (at most geometry_pool).
    rng = np.random.default_rng([seed, 0x9001])
    others = np.setdiff1d(np.arange(len(part.members)), victims)
    n_others = max(0, min(len(others), o.pool // 2 - len(victims)))
    in_pool = np.concatenate([victims, rng.choice(others, size=n_others, replace=False)])
    n_public_pool = min(len(public), o.pool - len(in_pool))
    pool = np.concatenate([part.members[in_pool], public[:n_public_pool]])
    pool_row = dict(zip(in_pool.tolist(), range(len(in_pool)), strict=True))
    public_mean = ctx.public_mean if single else part.public_mean
    reference = ctx.reference if single else part.reference  # members first: victim v is row v
    weight, bias = f"{part.layer}.weight", f"{part.layer}.bias"

    def metrics(estimate: np.ndarray, victim: int) -> dict[str, float]:
        return ctx.metrics(estimate, victim, part=None if single else part)

    for victim in victims:
        add_priors(ctx, out, int(victim), part)
        out.add(
            "prior", f"majority class{suffix}", "free", {"accuracy": float(members_y[victim] == majority)}
        )
        out.add("prior", f"random ranking of the pool{suffix}", "free", _linkage(None, len(pool)))
        out.add("prior", f"a random reference cell{suffix}", "free", {"reidentified": 1.0 / len(reference)})

    view = PER_SITE_VIEW
    leaked, leaked_victims = [], []
    for victim in victims:
        x, y = ctx.data.members_x[victim : victim + 1], ctx.data.members_y[victim : victim + 1]
        grads = client_gradient(
            ctx.network, x, y, key_material=ctx.right, private=s.private, task=ctx.objective
        )
        if torch.any(grads[bias]):  # else no unit was active: nothing leaks from this layer for the cell
            leaked.append(invert_first_layer(grads[weight], grads[bias]))
            leaked_victims.append(int(victim))
    if len(leaked) >= 3:
        leaked = np.stack(leaked)
        coupling = match_geometry(leaked, public, seed=seed)
        predicted, _, _ = infer_cell_types(coupling, public_y)
        estimates = reconstruct(coupling, public)
        ranks = linkage_ranks(match_geometry(leaked, pool, seed=seed), [pool_row[v] for v in leaked_victims])
        for victim, label, estimate, rank in zip(leaked_victims, predicted, estimates, ranks, strict=True):
            out.add("geometry", f"cell type{suffix}", view, {"accuracy": float(label == members_y[victim])})
            out.add("geometry", f"reconstruction{suffix}", view, metrics(estimate, victim))
            out.add("geometry", f"linkage{suffix}", view, _linkage(int(rank), len(pool)))
            out.example(f"geometry{suffix}", view, part.members[victim], estimate)

    view = SECURE_SUM_VIEW
    vectors = np.concatenate([first_layer_rows(change[weight], change[bias]) for change in changes])
    if len(vectors) < 3:
        return
    coupling = match_geometry(vectors, public, seed=seed)
    # No vector is one cell's, so the attacker's guess for any victim is one for the whole site: the most
    # frequent cell type of the vectors (each by its largest coupling mass; the mass summed over vectors
    # is the public composition, fixed by the coupling's marginals), and any of the reconstructions.
    predicted, _, _ = infer_cell_types(coupling, public_y)
    labels, votes = np.unique(predicted, return_counts=True)
    guess = labels[np.argmax(votes)]
    estimates = reconstruct(coupling, public)
    similarity = reconstruction_similarity(estimates, part.members[victims], public_mean)
    nearest = nearest_reference(estimates, reference)
    by_pool = match_geometry(vectors, pool, seed=seed)
    pool_scores = (by_pool / by_pool.sum(axis=1, keepdims=True)).max(axis=0)
    ranks = linkage_ranks(
        np.broadcast_to(pool_scores, (len(victims), len(pool))), [pool_row[int(v)] for v in victims]
    )
    type_means = np.stack([public[public_y == c].mean(axis=0) for c in classes])
    oracle_prior = reconstruction_similarity(type_means, part.members[victims], public_mean).max(axis=0)
    # The oracle's control: the same attack on sums that hold none of the victims (the stand-ins alone).
    control = np.concatenate([first_layer_rows(change[weight], change[bias]) for change in without_site])
    oracle_control = reconstruction_similarity(
        reconstruct(match_geometry(control, public, seed=seed), public), part.members[victims], public_mean
    ).max(axis=0)
    for column, (victim, rank) in enumerate(zip(victims, ranks, strict=True)):
        victim = int(victim)
        out.add("geometry", f"cell type{suffix}", view, {"accuracy": float(guess == members_y[victim])})
        out.add(
            "geometry",
            f"reconstruction{suffix}",
            view,
            {
                "pearson_minus_mean": float(similarity[:, column].mean()),
                "reidentified": float(np.mean(nearest == victim)),
            },
        )
        out.add("geometry", f"linkage{suffix}", view, _linkage(int(rank), len(pool)))
        out.add(
            "geometry",
            f"best of all reconstructions (oracle){suffix}",
            view,
            {"pearson_minus_mean": float(similarity[:, column].max())},
        )
        out.add(
            "prior",
            f"best of the cell-type mean profiles (oracle){suffix}",
            "free",
            {"pearson_minus_mean": float(oracle_prior[column])},
        )
        out.add(
            "geometry",
            f"best of all reconstructions (oracle){suffix}",
            WITHOUT_SITE_VIEW,
            {"pearson_minus_mean": float(oracle_control[column])},
        )


@dataclass(frozen=True)
class GeometrySettings:
    """Victims per seed (the attack reads their leaks together), the pool of cells linkage ranks them in,
    and the consecutive secure rounds whose sums the server pools."""

    victims: int = 200
    pool: int = 1000
    secure_rounds: int = 3


FAMILY = register_family(
    Family(
        "geometry",
        runs={"classes": _geometry, "embedding": _geometry},
        panel=("mrr_x_chance", "linkage to the victim's own cell (reciprocal rank / chance)"),
        settings=GeometrySettings,
    )
)
