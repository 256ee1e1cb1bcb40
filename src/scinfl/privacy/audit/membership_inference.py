"""The membership family: loss-threshold and reference-model (LiRA/RMIA-style) membership inference on the
released model, beside model-free scores that show how far members and non-members differ before any
model is looked at."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..._warnings import warn
from ...nn import use_key
from ...tasks import build_network
from ...train import key_on, module_device, to_device
from ..membership import reference_model_scores, split_inclusion, true_label_confidence
from ..metrics import (
    membership_metrics,
)
from ..utility import (
    train_fresh_model,
)
from .core import (
    AuditContext,
    Collector,
    Family,
    attacker_views,
    register_family,
)

# Candidates per side (members, non-members) for membership inference.
MEMBERSHIP_CANDIDATES = 250


# Below this many label-matched candidates per side, membership falls back to unmatched draws (the
# model-free label row then shows the difference in label mix).
MIN_MATCHED_CANDIDATES = 20


def membership_candidates(
    members_y: np.ndarray, nonmembers_y: np.ndarray, rng: np.random.Generator, *, cap: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Members and non-members with the same number of cells of every label (at most ``cap`` a side).

    Each label gets the smaller of its two counts, scaled down together to fit ``cap``. When fewer than
    :data:`MIN_MATCHED_CANDIDATES` a side can be matched, the draw is unmatched (``matched=False``).

    Returns
    -------
    (member indices, non-member indices, matched)
    """
    labels = np.intersect1d(members_y, nonmembers_y)
    counts = np.array([min(np.sum(members_y == c), np.sum(nonmembers_y == c)) for c in labels], dtype=int)
    if counts.sum() >= MIN_MATCHED_CANDIDATES:
        counts = np.floor(counts * min(1.0, cap / counts.sum())).astype(int)
        members, nonmembers = [], []
        for label, k in zip(labels, counts, strict=True):
            members.append(rng.choice(np.flatnonzero(members_y == label), size=k, replace=False))
            nonmembers.append(rng.choice(np.flatnonzero(nonmembers_y == label), size=k, replace=False))
        return np.concatenate(members), np.concatenate(nonmembers), True
    n = min(len(members_y), len(nonmembers_y), cap)
    return (
        rng.choice(len(members_y), size=n, replace=False),
        rng.choice(len(nonmembers_y), size=n, replace=False),
        False,
    )


def two_sample_scores(
    x: np.ndarray,
    is_member: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    k: int = 10,
    n_components: int = 20,
) -> np.ndarray:
    """Membership scores from the cells' values alone: how much closer a candidate lies to its ``k``
    nearest members than to its ``k`` nearest non-members (mean Euclidean distances between the
    candidates' first ``n_components`` principal components).

    A two-sample test, not an attack: it needs the answer. Both pools leave out one cell of the
    candidate's label (itself, and a random cell of the other group; of any label if the other group has
    none), so that when membership is unrelated to the values, members and non-members score alike: the
    AUC is then 0.5 up to noise, as when both are label-matched cells of one site.
    """
    rng = np.random.default_rng([seed, 0x2A])
    # Distances between whole profiles are dominated by noise in thousands of features: compare the
    # candidates' principal components instead.
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    u, singular, _ = np.linalg.svd(x, full_matrices=False)
    x = u[:, :n_components] * singular[:n_components]
    squared = (x**2).sum(1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * x @ x.T, 0.0))
    rows = np.arange(len(x))
    distances[rows, rows] = np.inf
    for i in rows:  # drop a random cell of the other group, of the candidate's label where there is one
        others = np.flatnonzero(is_member != is_member[i])
        alike = others[labels[others] == labels[i]]
        distances[i, rng.choice(alike if len(alike) else others)] = np.inf

    def nearest(columns: np.ndarray) -> np.ndarray:
        near = min(k, len(columns) - 1)
        return np.partition(distances[:, columns], near - 1, axis=1)[:, :near].mean(axis=1)

    return nearest(np.flatnonzero(~is_member)) - nearest(np.flatnonzero(is_member))


def class_probabilities(network: nn.Module, key_material: Tensor | None) -> Callable[[Tensor], Tensor]:
    """Class probabilities of a batch, computed where the network is (reference models are trained on
    the accelerator) and returned there."""
    device = module_device(network)
    key_material = key_on(key_material, device)

    def predict_proba(x: Tensor) -> Tensor:
        network.eval()
        with use_key(key_material):
            return torch.softmax(network(to_device(x, device)), dim=1)

    return predict_proba


def _membership(ctx: AuditContext, out: Collector, seed: int) -> None:
    """Loss threshold and reference-model attacks (LiRA, RMIA) on the released global model, beside three
    model-free scores that must sit at AUC 0.5.

    Candidates: trained-on cells and never-trained ones (the site's held-out cells when given, else public
    cells), the same number of each label on both sides (at most 250 a side). Reference models are plain
    networks of the same architecture trained by the attacker on random halves of the candidates; the
    attacker cannot train keyed ones under the right key, so this is the strongest attack it can run.
    The model-free scores look at no model: the frequency of a candidate's label among the site's
    trained-on cells, the confidence of an untrained network of the same architecture (it reads the
    cell's values but learned nothing), and a nearest-neighbour two-sample test of the values
    (:func:`two_sample_scores`). Above 0.5 they measure a difference between the two groups that any
    attack would also pick up.
    """
    o = ctx.options("membership")
    data = ctx.data
    rng = np.random.default_rng([seed, 0x313])
    outside_x, outside_y = (
        (data.public_x, data.public_y)
        if data.nonmembers_x is None
        else (data.nonmembers_x, data.nonmembers_y)
    )
    members, nonmembers, matched = membership_candidates(
        data.members_y.numpy(), outside_y.numpy(), rng, cap=MEMBERSHIP_CANDIDATES
    )
    x = torch.cat([data.members_x[members], outside_x[nonmembers]])
    y = torch.cat([data.members_y[members], outside_y[nonmembers]])
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]

    def add(attack: str, view: str, values: np.ndarray) -> dict[str, float]:
        metrics = membership_metrics(values[is_member], values[~is_member])
        out.add("membership", attack, view, metrics)
        return metrics

    frequency = np.bincount(data.members_y.numpy(), minlength=int(y.max()) + 1) / len(data.members_y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + 0x313)
        untrained = build_network(dataclasses.replace(ctx.config, scheme=None)).eval()
    model_free = {
        "label frequency": frequency[y.numpy()],
        "untrained network": true_label_confidence(class_probabilities(untrained, None), x, y),
        "values alone (nearest neighbours)": two_sample_scores(x.numpy(), is_member, y.numpy(), seed=seed),
    }
    for attack, values in model_free.items():
        auc = add(attack, "no model", values)["auc"]
        ctx.model_free.append(
            (attack if matched else f"{attack}, labels unmatched", auc, len(members), len(nonmembers))
        )

    included = split_inclusion(o.reference_models, len(x), seed=seed)
    reference = []
    for k in range(o.reference_models):
        chosen = torch.from_numpy(included[k])
        model = train_fresh_model(
            ctx.config, x[chosen], y[chosen], epochs=o.reference_epochs, seed=seed * 1000 + k
        )
        reference.append(true_label_confidence(class_probabilities(model, None), x, y))
    reference = np.stack(reference)
    names = {"lira_online": "LiRA (online)", "lira_offline": "LiRA (offline)", "rmia": "RMIA"}
    for view, guess in attacker_views(ctx.network, ctx.key, seed).items():
        target = true_label_confidence(class_probabilities(ctx.network, guess), x, y)
        scored = {"loss threshold": np.log(np.maximum(target, np.finfo(np.float64).tiny))}
        scored |= {names[k]: v for k, v in reference_model_scores(target, reference, included).items()}
        for attack, values in scored.items():
            add(attack, view, values)


def _warn_unless_model_free_at_chance(ctx: AuditContext) -> None:
    """Warn when a model-free membership score separates members from non-members beyond chance: more
    than 4 standard errors of an AUC under no difference (Mann-Whitney; the nearest-neighbour score varies
    up to 1.4 times more), averaged over seeds."""
    by_attack: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for attack, auc, n_members, n_nonmembers in ctx.model_free:
        by_attack[attack].append((auc, n_members, n_nonmembers))
    for attack, rows in by_attack.items():
        auc, n1, n2 = (float(np.mean(column)) for column in zip(*rows, strict=True))
        standard_error = np.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
        if abs(auc - 0.5) > 4 * standard_error:
            cause = (
                "labels could not be matched between members and non-members"
                if "unmatched" in attack
                else "the non-members are not cells of the trained-on site"
                if ctx.data.nonmembers_x is None
                else "the held-out cells differ from the trained-on ones (another batch, another split)"
            )
            warn(
                f"Membership inference: the model-free score '{attack}' separates members from "
                f"non-members at AUC {auc:.2f} (0.5 expected, standard error {standard_error:.2f}), so the "
                f"membership rows measure that difference as well as the model. Likely cause: {cause}. "
                "Pass the site's held-out cells (scinfl.tl.privacy_audit(..., site=) or nonmembers=)."
            )


@dataclass(frozen=True)
class MembershipSettings:
    """Reference models trained per seed (on random halves of the candidates) and their epochs."""

    reference_models: int = 4
    reference_epochs: int = 30


FAMILY = register_family(
    Family(
        "membership",
        runs={"classes": _membership},
        panel=("auc", "membership AUC"),
        settings=MembershipSettings,
        after=_warn_unless_model_free_at_chance,
    )
)
