"""``engine="flower"``: the round loop and the preprocessing recipes on Flower's simulation runtime (Ray)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...key import FederationKey
from ..engines import Engine
from ..preprocessing import PreprocessingResult
from ..rounds import FederationRun
from ..spec import RunSpec
from ..statistics import StatisticsSpec
from .simulation import simulate, simulate_statistics

__all__ = ["ENGINE"]


def train(
    sites: Mapping[str, Any],
    keys: Mapping[str, FederationKey | None],
    spec: RunSpec,
    *,
    progress: bool = False,
    **options: Any,
) -> FederationRun:
    """The round loop in a ServerApp of this process, each site's ClientApp in a Ray worker
    (:func:`~scinfl.federation.flower.simulate`). A site's data errors are raised here, naming it, rather
    than in a worker."""
    schema = spec.task.agree(
        {name: spec.task.describe(data, name) for name, data in sites.items()}, join=spec.join
    )
    for name, data in sites.items():
        spec.task.inputs(data, name, schema)
    run = simulate(sites, keys, spec, progress=progress, **options)
    if run.schema != schema:
        raise RuntimeError("The Flower run agreed another schema than the sites' descriptions give.")
    return run


def statistics(
    sites: Mapping[str, Any], spec: StatisticsSpec, step: str, options: Mapping[str, Any]
) -> PreprocessingResult:
    """A preprocessing recipe run as a deployment runs it (:func:`~scinfl.federation.flower.simulate_statistics`)."""
    return simulate_statistics(sites, spec, step, options)


ENGINE = Engine("flower", train, statistics)
