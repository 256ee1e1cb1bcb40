"""Engines by name: ``tl`` and ``pp`` ask the registry, so a transport of one's own is one ``Engine``."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import scinfl as si
from helpers import FAST
from scinfl.federation import Engine, InProcess, engine_names, federate, get_engine, register_engine
from scinfl.federation.engines import _REGISTERED
from scinfl.federation.preprocessing import run_recipe
from scinfl.federation.statistics import StatisticsExchange


class CountingSites(InProcess):
    """In-process sites that count the exchanges they answer: a stand-in for another transport."""

    exchanges = 0

    def exchange(self, *args, **kwargs):
        CountingSites.exchanges += 1
        return super().exchange(*args, **kwargs)

    def statistics(self, *args, **kwargs):
        CountingSites.exchanges += 1
        return super().statistics(*args, **kwargs)


def _train(sites, keys, spec, *, progress=False, **options):
    return federate(CountingSites(sites, keys), spec, progress=progress, **options)


def _statistics(sites, spec, step, options):
    return run_recipe(StatisticsExchange(CountingSites(sites, {}), spec), step, options)


@pytest.fixture
def counting_engine():
    register_engine(Engine("counting", _train, _statistics))
    CountingSites.exchanges = 0
    yield "counting"
    _REGISTERED.pop("counting")


def test_a_registered_engine_trains_and_preprocesses_as_the_built_in_one(pbmc_split, counting_engine):
    sites, _ = pbmc_split
    assert counting_engine in engine_names()
    model = si.tl.train_federated(
        sites, key=None, engine=counting_engine, **FAST, secure_aggregation={"min_cohort": 2}
    )
    assert CountingSites.exchanges == FAST["rounds"] + 1  # a round each and the final evaluation
    assert model.params["engine"] == "counting"
    local = si.tl.train_federated(sites, key=None, **FAST, secure_aggregation={"min_cohort": 2}, copy=True)
    for name, tensor in local.network.state_dict().items():  # the same round loop: the same weights
        assert np.array_equal(tensor.numpy(), model.network.state_dict()[name].numpy()), name
    before = CountingSites.exchanges
    labs = {name: site.raw.to_adata() for name, site in sites.items()}
    si.pp.highly_variable_genes(
        labs, n_top_genes=50, engine=counting_engine, secure_aggregation={"min_cohort": 3}
    )
    assert CountingSites.exchanges > before
    assert all(lab.var["highly_variable"].sum() == 50 for lab in labs.values())


def test_engines_are_refused_by_name_with_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match=r"Unknown engine 'grpc'; available: 'local', 'flower'"):
        get_engine("grpc")
    with pytest.raises(ValueError, match="built in"):
        register_engine(Engine("local", _train, _statistics))
    with pytest.raises(TypeError, match="Engine"):
        register_engine(_train)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install 'scinfl\[flower\]'"):
        get_engine("flower")
