"""The run spec: one serialisable description of a run, for train_federated, Flower's run config and models."""

from __future__ import annotations

import json

import pytest

import scinfl as si
from scinfl.federation import RunSpec
from scinfl.train import DPSettings, FitSettings

SPEC = RunSpec(
    task=si.tasks.Embedding(n_latent=8, likelihood="poisson", spatial_key="spatial", hidden=64),
    sites=("lab_a", "lab_b"),
    key_fingerprint="00ff00ff00ff00ff",
    scheme="hardened",
    rounds=7,
    fraction=0.5,
    fit=FitSettings(local_epochs=2, batch_size=64, lr=0.01, weight_decay=0.0),
    validation_fraction=0.2,
    join="outer",
    seed=3,
    min_sites=1,
    secure_aggregation=False,  # a cohort of one
    min_cohort=2,
)


def test_spec_round_trips_through_json_and_the_flower_run_config():
    assert RunSpec.from_json(SPEC.to_json()) == SPEC
    config = SPEC.to_run_config()
    # flat keys spelt as Flower's run config spells them, values TOML can hold
    assert config["task.name"] == "embedding"
    assert config["task.n-latent"] == 8
    assert config["task.label-key"] == ""  # None
    assert config["fit.batch-size"] == 64
    assert config["sites"] == "lab_a,lab_b"
    assert config["dp"] == ""
    assert config["secure-aggregation"] is False
    assert config["min-cohort"] == 2
    assert all(isinstance(v, bool | int | float | str) for v in config.values())
    assert RunSpec.from_run_config(config) == SPEC
    # `flwr run --run-config` overrides any key, with Flower's typed values or text
    changed = RunSpec.from_run_config({**config, "task.n-latent": "12", "rounds": 9, "fit.lr": 0.1})
    assert (changed.task.n_latent, changed.rounds, changed.fit.lr) == (12, 9, 0.1)
    # keys a run config leaves out take their defaults
    private = RunSpec.from_run_config(
        {
            "task.name": "classification",
            "task.hidden": 64,
            "sites": "a,b",
            "min-cohort": 2,
            "dp.epsilon": 3.0,
            "dp.delta": 1e-6,
        }
    )
    assert private.dp == DPSettings(epsilon=3.0, delta=1e-6)
    assert private.model_config(_schema()).norm == "layer"  # DP-SGD needs LayerNorm
    assert RunSpec.from_run_config(private.to_run_config()) == private


def _schema():
    return si.data.FederationSchema(
        var_names=("g1", "g2"), categories=("a", "b"), label_key="y", layer=None, use_raw=False, join="inner"
    )


def test_spec_refuses_what_no_run_can_do():
    task = si.tasks.Classification()
    with pytest.raises(ValueError, match="unique"):
        RunSpec(task=task, sites=("a", "a"))
    with pytest.raises(ValueError, match="site names"):
        RunSpec(task=task, sites=())
    with pytest.raises(ValueError, match="both the key's fingerprint and scheme"):
        RunSpec(task=task, sites=("a",), key_fingerprint="00ff")
    with pytest.raises(ValueError, match="Unknown key scheme"):
        RunSpec(task=task, sites=("a",), key_fingerprint="00ff", scheme="rot13")
    with pytest.raises(ValueError, match="plain models only"):
        RunSpec(task=task, sites=("a",), key_fingerprint="00ff", scheme="infl", dp={"epsilon": 8})
    with pytest.raises(NotImplementedError, match="mosaic"):
        RunSpec(task=si.tasks.Mosaic(), sites=("a",), dp={"epsilon": 8})
    with pytest.raises(ValueError, match="min_sites"):
        RunSpec(task=task, sites=("a",), min_sites=2)
    with pytest.raises(ValueError, match="fraction"):
        RunSpec(task=task, sites=("a",), fraction=0)
    with pytest.raises(ValueError, match="rounds"):
        RunSpec(task=task, sites=("a",), rounds=0)
    with pytest.raises(ValueError, match="Unknown run settings"):
        RunSpec.from_dict({"task": {"name": "classification"}, "sites": ["a"], "key": "secret"})
    with pytest.raises(ValueError, match="names no task"):
        RunSpec.from_run_config({"sites": "a"})


def test_secure_aggregation_refuses_a_cohort_smaller_than_min_cohort():
    task = si.tasks.Classification()
    assert RunSpec(task=task, sites=("a", "b", "c")).secure_aggregation  # the default
    with pytest.raises(
        ValueError,
        match=r"min_cohort=3 .* 2 site\(s\).*learn the other's.*Pass secure_aggregation=\{'min_cohort': 2\}",
    ):
        RunSpec(task=task, sites=("a", "b"))
    with pytest.raises(ValueError, match=r"samples 1 of 3 .*alone\. Raise fraction"):
        RunSpec(task=task, sites=("a", "b", "c"), fraction=0.3)
    with pytest.raises(ValueError, match="min_cohort must be a positive"):
        RunSpec(task=task, sites=("a", "b", "c"), min_cohort=0)
    with pytest.raises(ValueError, match="min_cohort=1: secure aggregation needs at least 2"):
        RunSpec(task=task, sites=("a", "b", "c"), min_cohort=1)
    with pytest.raises(ValueError, match="secure_aggregation must be True or False"):
        RunSpec(task=task, sites=("a", "b", "c"), secure_aggregation="yes")
    # chosen explicitly, a two-site sum or updates in the clear are accepted
    assert RunSpec(task=task, sites=("a", "b"), min_cohort=2).min_cohort == 2
    assert not RunSpec(task=task, sites=("a",), secure_aggregation=False).secure_aggregation
    # Flower's run config spells booleans as text or TOML booleans
    plain = RunSpec.from_run_config(
        {"task.name": "classification", "sites": "a", "secure-aggregation": "false"}
    )
    assert not plain.secure_aggregation


def test_signature_leaves_out_what_a_resumed_run_may_change():
    signature = SPEC.signature()
    assert "rounds" not in signature
    assert "round_timeout" not in signature
    assert "min_sites" not in signature
    assert signature["task"]["n_latent"] == 8
    assert signature["seed"] == 3
    assert SPEC.replace(rounds=20, min_sites=2, min_cohort=1).signature() == signature
    assert (
        SPEC.replace(secure_aggregation=True, fraction=1.0).signature()
        != SPEC.replace(fraction=1.0).signature()
    )
    assert SPEC.replace(seed=4).signature() != signature
    # DP-SGD's noise is calibrated to the planned rounds: they are part of a private run's signature
    private = RunSpec(
        task=si.tasks.Classification(), sites=("a",), dp={"epsilon": 8.0}, rounds=3, secure_aggregation=False
    )
    assert private.signature()["rounds"] == 3
    json.dumps(signature)  # it is what a checkpoint stores
