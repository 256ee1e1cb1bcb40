"""Audit a trained model's privacy with the attacks of :mod:`scinfl.privacy`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._settings import settings as scinfl_settings
from .._settings import torch_threads
from ..data import label_codes
from ..key import FederationKey, as_key
from ..model import FederatedModel
from ..privacy.audit import AuditData, AuditSettings, attacks_for, check_attacks, run_audit
from ..privacy.gradients import PrivateGradient
from ._federated import _h5ad_safe

__all__ = ["privacy_audit"]

_MAX_CELLS = 2000  # per role: enough for every attack; keeps dense audit matrices small


def _inputs(model: FederatedModel, data, role: str):
    """``data`` as the network reads it, as in training (a site's inputs come from all its cells, e.g. its
    control profiles)."""
    try:
        return model.inputs(data, site=role, min_overlap=1.0)
    except ValueError as error:
        raise ValueError(f"{error} The audit needs data with the model's full feature set.") from None


def _cells(inputs, labels: np.ndarray, rows: np.ndarray, role: str, rng: np.random.Generator):
    """Up to ``_MAX_CELLS`` of ``rows`` of ``inputs``, with their labels, as tensors."""
    if len(rows) < 2:
        raise ValueError(f"The {role} cells: {len(rows)} cell(s); the audit needs at least 2.")
    index = np.sort(rng.choice(rows, size=min(len(rows), _MAX_CELLS), replace=False))
    return torch.from_numpy(inputs.rows(index)), torch.from_numpy(labels[index])


def _labels(model: FederatedModel, cells: dict[str, AnnData], label_key: str | None) -> dict[str, np.ndarray]:
    """Each role's label codes: the model's categories, or for ``label_key`` (a model without classes, or
    other labels) the categories found in the cells."""
    if label_key is None:
        if model.schema.label_key is None:
            raise ValueError(
                "This model was trained without labels: pass label_key= naming an .obs column of both the "
                "trained-on and the public cells (the audit's utility check and cell-type priors use it)."
            )
        return {role: label_codes(adata, model.schema, role) for role, adata in cells.items()}
    for role, adata in cells.items():
        if label_key not in adata.obs or adata.obs[label_key].isna().any():
            raise ValueError(
                f"The {role} cells: .obs[{label_key!r}] is missing or has cells without a label."
            )
    categories = sorted(set().union(*(adata.obs[label_key].astype(str) for adata in cells.values())))
    return {
        role: pd.Categorical(adata.obs[label_key].astype(str), categories=categories).codes.astype(np.int64)
        for role, adata in cells.items()
    }


def privacy_audit(
    model: FederatedModel,
    adata: AnnData,
    *,
    key: FederationKey | str | os.PathLike[str] | None,
    public: AnnData,
    site: str | None = None,
    nonmembers: AnnData | None = None,
    attacks: Sequence[str] | None = None,
    label_key: str | None = None,
    settings: AuditSettings | Mapping[str, Any] | None = None,
    key_added: str = "scinfl",
) -> pd.DataFrame:
    """Measure what an attacker learns from the model and from the sites' updates.

    Simulates the threat model of :mod:`scinfl.privacy`: a server (or eavesdropper) that knows the code,
    the architecture, the key-generation procedure and every aggregated weight, and sees each client's
    gradient or update, but not the key. Attacks that run under a key view (utility, key recovery's
    reference, gradient inversion) also run with the right key as a positive control. The analytic attacks
    read what the server receives with no key at all; their positive control is the same audit of a plain
    model (trained with ``key=None``), whose single-cell gradients they invert exactly.
    For a model trained with ``dp=``, the simulated clients clip and noise what they send as DP-SGD does
    (with the smallest noise multiplier of any site).

    Parameters
    ----------
    model
        The trained model.
    adata
        Cells the model was trained on (a site's data): the victims and the members.
    key
        The model's key, or its file's path (None for a plain model): the audit simulates the clients,
        who hold it.
    public
        Cells of the same kind never used in training: the attacker's public cohort, its labelled
        auxiliary data and the utility test set (and membership inference's non-members when the site
        gives none of its own).
    site
        The name ``adata`` trained under. The run's validation cells of that site
        (:meth:`scinfl.FederatedModel.validation_mask`), never trained on, are then left out of the
        members and become non-members of membership inference. ``adata`` must be the site's data as
        trained (same cells, same order).
    nonmembers
        More cells of the same site held out from training (non-members of membership inference).
        Membership inference compares like with like only when its non-members come from the members'
        own site: with neither ``site`` nor ``nonmembers`` they are public cells, and the model-free rows
        (view ``"no model"``: label frequency, an untrained network, a nearest-neighbour test of the
        values) show how far apart the two groups are before any model is looked at; the audit warns
        when they leave 0.5. Members and non-members are matched by label.
    attacks
        Attack families (default: all that apply to the model's task). ``"utility"`` (wrong keys,
        one-bit flips, no key; for an embedding model, kNN label transfer in the embedding of each key
        view, from the labelled trained-on cells to the public ones), ``"key_recovery"``,
        ``"analytic"`` (first-layer inversion and calibration, and known plaintext), ``"inversion"``
        (gradient and update inversion, label recovery), ``"membership"``, ``"geometry"``. Against
        ``scheme="hardened"`` the key recovery fits the scheme's continuous relaxation, and the inversion
        family adds joint inversion with that relaxation and label frequency analysis
        (:mod:`scinfl.privacy.hardened`). ``"geometry"`` matches the first-layer leaks of many cells
        together to the public cohort (entropic Gromov-Wasserstein, :mod:`scinfl.privacy.geometry`) in
        two server views: one site's single-cell gradients (the worst case without secure aggregation,
        and the positive control), and what the server decodes with secure aggregation, each round's
        sum after a real local fit at the audited site and ``min_cohort - 1`` stand-in sites drawn from
        half of ``public`` (the other half is then the attacker's cohort). Its rows: the victims' cell
        types against the majority class, reconstruction (mean-subtracted Pearson, re-identification),
        linkage to the victim's own cell in a pool against a random ranking.
        An embedding model (``task="embedding"``) is audited with ``"utility"``, ``"analytic"`` and
        ``"geometry"``; its clients' gradients are of the reconstruction loss. A perturbation model
        (``task="perturbation"``) is audited with ``"utility"`` and ``"analytic"``: its utility is the Pearson delta of the public cells' conditions under
        each key view (beside the mean change of the trained-on cells, without a model), and its analytic
        attacks read a cell's perturbation from the first layer's gradient and its profile from the output
        layer's bias gradient (the prediction residual), also after aligning a secret output order by
        variance ranks over the leaked residuals. Each site computes control profiles from its own
        cells, so ``adata`` and ``public`` each need control cells. A multi-omics mosaic model
        (``task="mosaic"``; ``adata`` and ``public`` are then MuData or one-modality AnnData): its analytic
        attacks run on the first layer of every modality's encoder (attack names end in ``[modality]``),
        measured against the values that layer reads (``log1p`` or CLR of counts).
    label_key
        ``.obs`` column of labels in both ``adata`` and ``public``: needed for a model trained without
        labels (embedding); default: the model's own label column.
    settings
        The audit's sizes (:class:`~scinfl.privacy.audit.AuditSettings`, or a dict): ``n_victims`` per seed
        for the analytic attacks (32), the ``seeds`` of victim draws, wrong keys and attack
        initialisations ((0, 1, 2)), and each family's own settings by its name, e.g.
        ``{"n_victims": 8, "seeds": (0,), "utility": {"n_wrong_keys": 3}, "inversion": {"victims": 4,
        "steps": 50, "batches": (8,)}, "geometry": {"victims": 100}}`` (the families' settings:
        :mod:`scinfl.privacy.audit`). How the model trained (its fit, its secure cohort, DP-SGD's clipping
        and noise) is taken from the model.
    key_added
        Prefix of the ``.uns`` keys written.

    Returns
    -------
    A tidy DataFrame: ``family, attack, view, metric, mean, ci_low, ci_high, n``. Also sets

    ``adata.uns[f"{key_added}_privacy"]``
        The same table.
    ``adata.uns[f"{key_added}_privacy_examples"]``
        ``"truth"`` (one victim's profile) and, per ``"attack | view"``, its reconstruction (for
        :func:`scinfl.pl.reconstruction`). A ``/`` in a name is written ``∕`` (U+2215) there, so that the
        AnnData can be written to ``.h5ad``.
    """
    if not isinstance(model, FederatedModel):
        raise TypeError(f"model must be a scinfl.FederatedModel, got {type(model).__name__}.")
    key = as_key(key)
    model.check_key(key)
    view = model.task.audit_view(model.config)
    sizes = AuditSettings.from_mapping(settings)  # before any data is read
    if attacks is not None:
        check_attacks(view, attacks)
    wants_membership = "membership" in (attacks_for(view) if attacks is None else attacks)
    held_out = np.zeros(adata.n_obs, bool) if site is None else model.validation_mask(adata, site=site)
    rng = np.random.default_rng(0)
    roles = {"trained-on": adata, "public": public}
    if nonmembers is not None and wants_membership:
        roles["held-out"] = nonmembers
    labels = _labels(model, roles, label_key)
    inputs = {role: _inputs(model, data, role) for role, data in roles.items()}
    trained_on = (inputs["trained-on"], labels["trained-on"])
    members_x, members_y = _cells(*trained_on, np.flatnonzero(~held_out), "trained-on", rng)
    public_x, public_y = _cells(inputs["public"], labels["public"], np.arange(public.n_obs), "public", rng)
    outside = []  # the site's cells never trained on: its validation cells and ``nonmembers``
    if wants_membership and held_out.sum() >= 2:
        outside.append(_cells(*trained_on, np.flatnonzero(held_out), "validation", rng))
    if "held-out" in roles:
        outside.append(
            _cells(inputs["held-out"], labels["held-out"], np.arange(nonmembers.n_obs), "held-out", rng)
        )
    nonmembers_x, nonmembers_y = (
        (torch.cat([x for x, _ in outside]), torch.cat([y for _, y in outside])) if outside else (None, None)
    )
    dp = model.params.get("dp")
    # A DP-SGD model's clients clip and noise what they send; the least noisy site is the attacker's best.
    private = (
        PrivateGradient(float(dp["max_grad_norm"]), float(min(dp["noise_multiplier"].values())))
        if dp
        else None
    )
    audit_settings = dataclasses.replace(
        sizes, private=private, fit=model.spec.fit, cohort=model.spec.min_cohort, seeds=tuple(sizes.seeds)
    )
    with torch_threads(scinfl_settings.torch_threads):
        table = run_audit(
            model.network,
            model.config,
            AuditData(members_x, members_y, public_x, public_y, nonmembers_x, nonmembers_y),
            key=key,
            attacks=None if attacks is None else tuple(attacks),
            settings=audit_settings,
        )
    adata.uns[f"{key_added}_privacy"] = table
    adata.uns[f"{key_added}_privacy_examples"] = _h5ad_safe(table.attrs.get("examples", {}))
    return table
