"""Statistics rounds: the aggregator learns the sum over the sites of a statistic, never one site's.

Federated preprocessing (:mod:`scinfl.pp`'s ``highly_variable_genes``, ``scale``, ``pca``) asks every site
for sufficient statistics (:class:`~scinfl.data.statistics.StatisticRequest`) and needs only their sum over
the sites: the pooled data's counts, sums, sums of squares and products. :class:`StatisticsExchange` runs
those rounds over a transport (the in-process sites, or Flower's Grid), the same way on both:

1. every site publishes a profile (feature names, cell count, its batches) and, under secure aggregation,
   the public half of a masking key drawn for the exchange (:class:`~scinfl.federation.secure.MaskingKey`);
2. for each statistic, every site sends its vector, masked with its pairwise masks over all the sites
   (:func:`~scinfl.federation.secure.mask_integers` over the wide fixed point of
   :func:`~scinfl.federation.secure.encode_wide`), and the aggregator adds them: the masks cancel and the
   pooled statistic is left, to 2^-40 per site.

Pooling means every site: a site that does not answer stops the exchange (a sum without it would not be
the pooled data's), naming it. A site with fewer than ``min_cells`` cells is refused before anything is
sent, and so is a batch of fewer cells (a batch's statistics are released per batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..data.statistics import StatisticRequest, site_profile, site_statistic, unpack_statistic
from .identity import Roster, SiteIdentity, SiteRefusal, SiteSecrets, check_cohort
from .secure import (
    MIN_COHORT,
    MaskingKey,
    SecureRound,
    decode_wide,
    encode_wide,
    mask_integers,
    run_digest,
    sum_integers,
)

__all__ = [
    "MIN_STATISTIC_CELLS",
    "SiteProfile",
    "StatisticsExchange",
    "StatisticsSpec",
    "StatisticsTransport",
    "answer_statistic",
]

logger = logging.getLogger("scinfl")

# A statistic over fewer cells than this is close to the cells themselves: no site or batch is summed below it.
MIN_STATISTIC_CELLS = 20


@dataclass(frozen=True)
class StatisticsSpec:
    """An exchange of statistics: the sites (in roster order), where their values are (``layer``), the
    batch column (``batch_key``; ``batches_are_sites``: each site is a batch), secure aggregation and its
    minimum cohort, the minimum cells per site and per batch, and the deadline of each exchange."""

    sites: tuple[str, ...]
    layer: str | None = None
    batch_key: str | None = None
    batches_are_sites: bool = False
    secure_aggregation: bool = True
    min_cohort: int = MIN_COHORT
    min_cells: int = MIN_STATISTIC_CELLS
    timeout: float = 600.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": list(self.sites),
            "layer": self.layer,
            "batch_key": self.batch_key,
            "batches_are_sites": self.batches_are_sites,
            "secure_aggregation": self.secure_aggregation,
            "min_cohort": self.min_cohort,
            "min_cells": self.min_cells,
            "timeout": self.timeout,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StatisticsSpec:
        return cls(**{**data, "sites": tuple(data["sites"])})


@dataclass(frozen=True)
class SiteProfile:
    """What a site publishes before the statistics: :func:`~scinfl.data.statistics.site_profile`'s names
    and counts, and the public half of its masking key for the exchange (secure aggregation), signed by the
    site's identity (:mod:`scinfl.federation.identity`)."""

    description: dict[str, Any]
    masking_key: bytes | None = None
    masking_signature: bytes | None = None  # the site's identity signature of its masking key


class StatisticsTransport(Protocol):
    """Delivers statistics requests to the sites (:class:`~scinfl.federation.local.InProcess`, or
    :class:`~scinfl.federation.flower.server.GridTransport`). A reply that did not come is a string saying why."""

    remote: bool

    def profiles(self, spec: StatisticsSpec) -> dict[str, SiteProfile | str]: ...

    def statistics(
        self, spec: StatisticsSpec, request: StatisticRequest, secure: SecureRound | None
    ) -> dict[str, np.ndarray | str]: ...


def answer_statistic(
    data,
    site: str,
    spec: StatisticsSpec,
    request: StatisticRequest,
    secure: SecureRound | None,
    secrets: SiteSecrets | None,
) -> np.ndarray:
    """A site's answer, for every transport: its statistic in the clear (float64), or in a secure
    exchange, once the cohort checks out against its roster (:func:`~scinfl.federation.identity.check_cohort`),
    its wide fixed-point encoding plus its pairwise masks (uint64), bound to the request: the site masks
    each round's context once, for one request (``SiteSecrets.record``), and the request's digest joins the
    masks' context."""
    if secure is None:
        return site_statistic(data, site, request)
    if secrets is None:
        raise SiteRefusal(f"Site {site!r} was asked for a masked statistic but holds no masking key.")
    check_cohort(secure.cohort, secure.public_keys, secure.signatures, secrets)
    digest = hashlib.sha256(request.to_json().encode() + _arrays_digest(request)).hexdigest()
    secrets.record(secure.context().decode(), digest)
    values = site_statistic(data, site, request)
    try:
        encoded = encode_wide(values)
    except OverflowError:
        raise ValueError(
            f"Site {site!r}: its statistics reach {np.abs(values).max():.3g}, beyond the secure sum's range "
            "(2^76): are the values what the function expects (log-normalised for flavor='seurat', raw counts "
            "for 'seurat_v3')?"
        ) from None
    return mask_integers(encoded, secure, site, secrets.masking_key, digest.encode())


def _arrays_digest(request: StatisticRequest) -> bytes:
    """The request's arrays (a PCA's basis, seurat_v3's clipping values), in a stable byte form."""
    out = hashlib.sha256()
    for name in sorted(request.arrays):
        array = np.ascontiguousarray(request.arrays[name], dtype=np.float64)
        out.update(name.encode() + str(array.shape).encode() + array.tobytes())
    return out.digest()


def statistics_secrets(
    spec: StatisticsSpec, site: str, identity: SiteIdentity, roster: Roster
) -> SiteSecrets:
    """A fresh masking key for one statistics exchange over ``spec`` at ``site``, signed for that spec."""
    return SiteSecrets(site, MaskingKey.generate(), identity, roster, run_digest(json.dumps(spec.to_dict())))


def profile_of(data, site: str, spec: StatisticsSpec, secrets: SiteSecrets | None) -> SiteProfile:
    """A site's :class:`SiteProfile` for ``spec`` (with its signed masking key in a secure exchange)."""
    batch_key = None if spec.batches_are_sites else spec.batch_key
    description = site_profile(data, site, layer=spec.layer, batch_key=batch_key)
    if secrets is None:
        return SiteProfile(description)
    return SiteProfile(description, secrets.masking_key.public, secrets.signature)


class StatisticsExchange:
    """Sums of statistics over the sites of ``spec``, through ``transport`` (see the module docstring).

    Construct it to collect the profiles (and check the cell counts); then :meth:`sum` each statistic.
    """

    def __init__(self, transport: StatisticsTransport, spec: StatisticsSpec) -> None:
        self.transport = transport
        self.spec = spec
        if len(set(spec.sites)) != len(spec.sites) or not spec.sites:
            raise ValueError(f"The sites must be distinct and at least one: {list(spec.sites)}.")
        if spec.secure_aggregation and len(spec.sites) < max(2, spec.min_cohort):
            raise ValueError(
                f"{len(spec.sites)} site(s), but secure aggregation sums at least min_cohort="
                f"{max(2, spec.min_cohort)} sites: a smaller sum hides too little. Pass secure_aggregation={{'min_cohort': 2}} for two "
                "sites (each then learns the other's statistics from the sum and its own), or "
                "secure_aggregation=False."
            )
        replies = transport.profiles(spec)
        failed = {
            s: replies.get(s, "no reply") for s in spec.sites if not isinstance(replies.get(s), SiteProfile)
        }
        if failed:
            raise RuntimeError(
                "Every site's statistics are needed for the pooled result, but "
                + "; ".join(f"site {s!r} did not answer ({why})" for s, why in failed.items())
                + "."
            )
        self.profiles: dict[str, SiteProfile] = {s: replies[s] for s in spec.sites}
        for site, profile in self.profiles.items():
            n_obs = int(profile.description["n_obs"])
            if n_obs < spec.min_cells:
                raise ValueError(
                    f"Site {site!r} has {n_obs} cells, fewer than min_cells={spec.min_cells}: statistics over so "
                    "few cells are close to the cells themselves. Leave the site out, or merge it with another."
                )
        small = {b: n for b, n in self.batch_cells().items() if n < spec.min_cells}
        if small and (spec.batch_key is not None or spec.batches_are_sites):
            raise ValueError(
                f"Batch(es) {', '.join(f'{b!r} ({n} cells)' for b, n in small.items())} of "
                f"{spec.batch_key or 'the sites'} hold fewer than min_cells={spec.min_cells} cells: statistics "
                "released per batch would be close to the cells themselves. Merge or leave out those cells."
            )
        self._exchange_id = secrets.token_hex(16)  # masks are bound to this exchange and each step
        self._step = 0

    @property
    def var_names(self) -> dict[str, list[str]]:
        return {site: profile.description["var_names"] for site, profile in self.profiles.items()}

    @property
    def batches(self) -> list[str]:
        """The batches in a stable order: the sites (``batches_are_sites``), or the sorted union of the
        sites' values of ``batch_key``; none without batches."""
        if self.spec.batches_are_sites:
            return list(self.spec.sites)
        if self.spec.batch_key is None:
            return []
        return sorted({b for p in self.profiles.values() for b in p.description["batches"]})

    def batch_cells(self) -> dict[str, int]:
        """Cells per batch, pooled over the sites (from the profiles)."""
        if self.spec.batches_are_sites:
            return {s: int(p.description["n_obs"]) for s, p in self.profiles.items()}
        cells: dict[str, int] = {}
        for profile in self.profiles.values():
            for batch, n in profile.description.get("batches", {}).items():
                cells[batch] = cells.get(batch, 0) + int(n)
        return cells

    def sum(self, request: StatisticRequest) -> dict[str, np.ndarray]:
        """The statistic summed over every site, unpacked (:func:`~scinfl.data.statistics.unpack_statistic`)."""
        self._step += 1
        secure = None
        if self.spec.secure_aggregation:
            secure = SecureRound(
                self._step,
                0,
                tuple(self.spec.sites),
                {s: self.profiles[s].masking_key for s in self.spec.sites},
                self._exchange_id,
                {s: self.profiles[s].masking_signature for s in self.spec.sites},
            )
        replies = self.transport.statistics(self.spec, request, secure)
        failed = {
            s: replies.get(s, "no reply") for s in self.spec.sites if isinstance(replies.get(s), str | None)
        }
        if failed:
            raise RuntimeError(
                f"The {request.kind} statistic needs every site, but "
                + "; ".join(f"site {s!r} did not answer ({why})" for s, why in failed.items())
                + "; nothing was aggregated."
            )
        vectors: Sequence[np.ndarray] = [np.asarray(replies[s]) for s in self.spec.sites]
        if secure is None:
            total = np.sum(np.stack([v.astype(np.float64) for v in vectors]), axis=0)
        else:
            total = decode_wide(sum_integers(vectors))
        return unpack_statistic(request, total)
