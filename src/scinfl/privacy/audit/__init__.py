"""The privacy audit: every attack, for every attacker view, on one trained network, as a tidy table.

The auditor is an insider who holds the key and simulates the attackers of the threat model (see the
package docstring): the keyless server, a server that guesses a key from the same generator, and, as the
positive control that proves each attack works, a key holder. Every figure is a mean over items (victims,
keys) and seeds with a percentile-bootstrap 95% confidence interval.

Each attack family is one module of this package that registers a :class:`Family` (its attacks for each
kind of model output, its settings, its plot panel): ``wrong_keys`` (utility), ``key_fitting`` (key
recovery), ``first_layer`` (analytic), ``gradient_inversion``, ``membership_inference`` and
``gradient_geometry``. A new family is a new module here (found by its name), or one registered from
outside with :func:`register_family`; ``core`` holds what they share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pandas as pd
from torch import nn

from ...key import FederationKey
from ...tasks import AuditView, ModelConfig
from .core import (
    COLUMNS,
    AuditContext,
    AuditData,
    AuditSettings,
    Collector,
    Family,
    family_names,
    get_family,
    register_family,
    wrong_key,
)
from .membership_inference import class_probabilities, membership_candidates, two_sample_scores

__all__ = [
    "COLUMNS",
    "AuditData",
    "AuditSettings",
    "Family",
    "attacks_for",
    "check_attacks",
    "class_probabilities",
    "family_names",
    "get_family",
    "membership_candidates",
    "register_family",
    "run_audit",
    "two_sample_scores",
    "wrong_key",
]

logger = logging.getLogger("scinfl")


def attacks_for(view: AuditView) -> tuple[str, ...]:
    """The attack families that apply to a model with this audit view."""
    return tuple(name for name in family_names() if view.output in get_family(name).runs)


def check_attacks(view: AuditView, attacks: Sequence[str]) -> None:
    """Raise unless every attack family exists and applies to the model (its audit view)."""
    unknown = set(attacks) - set(family_names())
    if unknown:
        raise ValueError(f"Unknown attacks {sorted(unknown)}; available: {', '.join(family_names())}.")
    applicable = attacks_for(view)
    if set(attacks) - set(applicable):
        raise ValueError(
            f"A model whose output is {view.output!r} is audited with {', '.join(map(repr, applicable))} only; "
            f"the other attacks read a classifier's outputs. Pass attacks={applicable!r}."
        )


def run_audit(
    network: nn.Module,
    config: ModelConfig,
    data: AuditData,
    *,
    key: FederationKey | None,
    attacks: Sequence[str] | None = None,
    settings: AuditSettings | None = None,
) -> pd.DataFrame:
    """Run the attacks on a trained network and return one row per (attack, view, metric).

    Parameters
    ----------
    network
        The aggregated network (plain or keyed), as the server holds it.
    config
        Its architecture; its task says what the audit attacks (:meth:`scinfl.tasks.Task.audit_view`).
    data
        Training cells (victims, members) and never-trained cells (public cohort, non-members, test set).
    key
        The federation key (None for a plain model): used to compute what the clients send, and as the
        positive-control view. Attackers other than the positive control never see it.
    attacks
        Attack families to run, among :func:`family_names` (default: every family that applies).
    settings
        Sizes of the audit.

    Returns
    -------
    pandas.DataFrame
        Columns ``family, attack, view, metric, mean, ci_low, ci_high, n`` (95% percentile bootstrap over
        items and seeds).
    """
    view = config.task.audit_view(config)
    attacks = attacks_for(view) if attacks is None else tuple(attacks)
    check_attacks(view, attacks)
    if (key is None) != (config.scheme is None):
        raise ValueError("Pass the model's key for a keyed model and key=None for a plain one.")
    settings = settings or AuditSettings()
    ctx = AuditContext(network, config, view, data, key, settings)
    out = Collector()
    was_training = network.training
    network.eval()
    ctx.network.eval()
    steps = [(seed, family) for seed in settings.seeds for family in attacks]
    try:
        for done, (seed, family) in enumerate(steps, start=1):
            started = time.monotonic()
            get_family(family).runs[view.output](ctx, out, seed)
            logger.info(
                "Audit %d of %d: %s, seed %d (%.1f s).",
                done,
                len(steps),
                family,
                seed,
                time.monotonic() - started,
            )
    finally:
        network.train(was_training)
    for family in dict.fromkeys(attacks):
        if get_family(family).after is not None:
            get_family(family).after(ctx)
    return out.table(settings.n_boot)
