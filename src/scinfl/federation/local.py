"""The in-process transport (``engine="local"``, the default): every site in this process, called directly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from ..data.statistics import StatisticRequest
from ..key import FederationKey
from ..tasks import ModelConfig
from ..train import SiteTrainer
from .engines import Engine
from .identity import Roster, SiteIdentity, SiteSecrets
from .preprocessing import PreprocessingResult, run_recipe
from .rounds import FederationRun, federate
from .secure import SecureRound
from .site import Hello, Instruction, Reply, answer, build_site, hello, initial_weights, site_secrets
from .spec import RunSpec
from .statistics import (
    SiteProfile,
    StatisticsExchange,
    StatisticsSpec,
    answer_statistic,
    profile_of,
    statistics_secrets,
)

__all__ = ["ENGINE", "InProcess"]


class InProcess:
    """Sites held in this process (:class:`~scinfl.federation.Transport`, and
    :class:`~scinfl.federation.statistics.StatisticsTransport` for federated preprocessing).

    Each site's trainer is built on the first exchange (:func:`~scinfl.federation.site.build_site`) and
    lives as long as the transport, so a DP-SGD site's accountant spans every round. Errors at a site
    raise at once, naming it.

    Parameters
    ----------
    sites
        Site name -> its data (AnnData, MuData, backed AnnData).
    keys
        Site name -> the key that site holds (None: no key; sites not named hold none).
    identities
        Site name -> its identity (:class:`~scinfl.federation.identity.SiteIdentity`); default: one made
        here for each site. The roster every site checks its cohorts against is theirs.
    """

    remote = False

    def __init__(
        self,
        sites: Mapping[str, Any],
        keys: Mapping[str, FederationKey | None],
        identities: Mapping[str, SiteIdentity] | None = None,
    ) -> None:
        self.sites = dict(sites)
        self.keys = dict(keys)
        # Each site's identity (made here, as each site would make its own) and the consortium's roster of
        # their public keys, which every site holds: what lets a site refuse a masking key the server made.
        self.identities = (
            dict(identities) if identities is not None else {s: SiteIdentity.generate() for s in sites}
        )
        self.roster = Roster.of(self.identities)
        self.trainers: dict[str, SiteTrainer] = {}
        self.secrets: dict[str, SiteSecrets] = {}  # each site's, for a run with secure aggregation

    def connect(self, spec: RunSpec) -> dict[str, Hello | str]:
        self.secrets = {}
        if spec.secure_aggregation:
            self.secrets = {s: site_secrets(spec, s, self.identities[s], self.roster) for s in spec.sites}
        return {
            site: hello(spec, self.sites[site], site, self.keys.get(site), self.secrets.get(site))
            for site in spec.sites
        }

    def initial_state(self, site: str, spec: RunSpec, config: ModelConfig) -> dict[str, Tensor]:
        return initial_weights(config, spec.seed, self.keys.get(site))

    def trainer(self, site: str, spec: RunSpec, config: ModelConfig) -> SiteTrainer:
        if site not in self.trainers:
            self.trainers[site] = build_site(spec, config, self.sites[site], site, self.keys.get(site))
        return self.trainers[site]

    def exchange(
        self,
        round_index: int,
        state: Mapping[str, Tensor],
        spec: RunSpec,
        config: ModelConfig,
        instructions: Mapping[str, Instruction],
    ) -> dict[str, Reply | str]:
        return {
            site: answer(self.trainer(site, spec, config), state, instruction, self.secrets.get(site))
            for site, instruction in instructions.items()
        }

    def profiles(self, spec: StatisticsSpec) -> dict[str, SiteProfile | str]:
        self.secrets = {}
        if spec.secure_aggregation:
            self.secrets = {
                s: statistics_secrets(spec, s, self.identities[s], self.roster) for s in spec.sites
            }
        return {site: profile_of(self.sites[site], site, spec, self.secrets.get(site)) for site in spec.sites}

    def statistics(
        self, spec: StatisticsSpec, request: StatisticRequest, secure: SecureRound | None
    ) -> dict[str, np.ndarray | str]:
        return {
            site: answer_statistic(self.sites[site], site, spec, request, secure, self.secrets.get(site))
            for site in spec.sites
        }


def train(
    sites: Mapping[str, Any],
    keys: Mapping[str, FederationKey | None],
    spec: RunSpec,
    *,
    progress: bool = False,
    **options: Any,
) -> FederationRun:
    """The round loop over the sites of this process (:attr:`scinfl.federation.Engine.train`)."""
    return federate(InProcess(sites, keys), spec, progress=progress, **options)


def statistics(
    sites: Mapping[str, Any], spec: StatisticsSpec, step: str, options: Mapping[str, Any]
) -> PreprocessingResult:
    """A preprocessing recipe over the sites of this process (:attr:`scinfl.federation.Engine.statistics`)."""
    return run_recipe(StatisticsExchange(InProcess(sites, {}), spec), step, options)


ENGINE = Engine("local", train, statistics)
