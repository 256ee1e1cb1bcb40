"""scinfl.tasks._base: task options as data (to_dict / from_dict, run configs), get_task, ModelConfig, and
the write-back that replaces another task's outputs."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

import scinfl as si
from helpers import FAST
from scinfl.data import FederationSchema
from scinfl.federation import RunSpec
from scinfl.tasks import TASKS, ModelConfig, Task, build_network, get_task

# One task of every registered kind, each with options away from its defaults.
EXAMPLES = {
    "classification": si.tasks.Classification(label_key="cell_type", hidden=32, dropout=0.2),
    "embedding": si.tasks.Embedding(
        n_latent=8,
        likelihood="poisson",
        spatial_key="spatial",
        spatial_neighbors=4,
        label_key="domain",
        hidden=48,
    ),
    "perturbation": si.tasks.Perturbation(
        perturbation_key="guide", control="NT", covariate_keys=("condition", "donor"), hidden=64, dropout=0.0
    ),
    "mosaic": si.tasks.Mosaic(
        n_latent=12, likelihood={"rna": "poisson", "prot": "clr"}, modality_dropout=0.25, alignment=2.0
    ),
    "lightning": si.tasks.Lightning(
        module="user_modules:CellTypeMLP", options={"hidden": 16}, label_key="cell_type"
    ),
}
# Options a task has no default for.
REQUIRED = {
    "perturbation": {"perturbation_key": "guide"},
    "lightning": {"module": "user_modules:CellTypeMLP"},
}


def test_every_registered_task_has_an_example():
    assert set(EXAMPLES) == set(TASKS)  # a newly registered task needs its round-trip example here
    for name, task in EXAMPLES.items():
        assert type(task) is TASKS[name]
        assert task != type(task)(**REQUIRED.get(name, {}))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_task_options_round_trip_through_json(name):
    task = EXAMPLES[name]
    data = task.to_dict()
    assert data["name"] == name
    assert data["hidden"] == task.hidden
    text = json.dumps(data)  # JSON-able as it is (a saved model's model.json, .uns)
    again = Task.from_dict(json.loads(text))
    assert again == task
    assert type(again) is type(task)
    assert hash(again) == hash(task)  # frozen and hashable, mapping options included
    # Flower spells the keys with hyphens
    assert Task.from_dict({k.replace("_", "-"): v for k, v in data.items()}) == task
    # and a run config carries them flat, nested keys joined by dots
    spec = RunSpec(task=task, sites=("a", "b"), min_cohort=2)
    config = spec.to_run_config()
    assert config["task.name"] == name
    assert RunSpec.from_run_config(config).task == task


def test_defaults_round_trip_and_a_name_gives_the_defaults():
    for name, cls in TASKS.items():
        if name in REQUIRED:
            continue  # no default perturbation column, no default module
        task = get_task(name)
        assert task == cls()
        assert Task.from_dict({"name": name}) == task
        assert Task.from_dict(task.to_dict()) == task


def test_mosaic_likelihood_mapping_is_stored_as_data():
    task = EXAMPLES["mosaic"]
    # a mapping is kept as sorted pairs (hashable, order-free) and written back as a dict
    assert task.likelihood == (("prot", "clr"), ("rna", "poisson"))
    assert task == si.tasks.Mosaic(
        n_latent=12, likelihood={"prot": "clr", "rna": "poisson"}, modality_dropout=0.25, alignment=2.0
    )
    assert task.to_dict()["likelihood"] == {"prot": "clr", "rna": "poisson"}
    schema = FederationSchema(
        var_names=("rna:a", "prot:p", "atac:c"),
        categories=(),
        label_key=None,
        layer=None,
        use_raw=False,
        join="inner",
        modalities=(("rna", 1), ("prot", 1), ("atac", 1)),
    )
    loaded = Task.from_dict(json.loads(json.dumps(task.to_dict())))
    assert loaded.likelihoods(schema) == {"rna": "poisson", "prot": "clr", "atac": "gaussian"}
    assert si.tasks.Mosaic(likelihood="clr").likelihoods(schema) == dict.fromkeys(
        ("rna", "prot", "atac"), "clr"
    )
    with pytest.raises(ValueError, match="likelihood must be one of .* got 'nb'"):
        Task.from_dict({"name": "mosaic", "likelihood": {"rna": "nb"}})


def test_mosaic_likelihood_keeps_modality_names_through_a_run_config():
    task = si.tasks.Mosaic(likelihood={"gene_expr": "poisson", "prot": "clr"})
    config = RunSpec(task=task, sites=("a", "b"), min_cohort=2).to_run_config()
    assert config["task.likelihood.gene_expr"] == "poisson"  # a modality's name is data: kept as spelt
    assert RunSpec.from_run_config(config).task == task
    # what a flat run config cannot carry is refused, not silently changed
    with pytest.raises(ValueError, match="'site,b' cannot be written to a Flower run config"):
        RunSpec(task=task, sites=("a", "site,b"), min_cohort=2).to_run_config()
    with pytest.raises(ValueError, match="name with '.' cannot be written"):
        RunSpec(
            task=si.tasks.Mosaic(likelihood={"rna.v2": "poisson"}), sites=("a",), secure_aggregation=False
        ).to_run_config()


def test_perturbation_covariates_from_a_flower_run_config():
    # A Flower run config holds flat values: lists as comma-separated text, None as "".
    task = Task.from_dict(
        {
            "name": "perturbation",
            "perturbation-key": "guide",
            "control": "NT",
            "covariate-keys": "condition, donor",
            "hidden": "64",
            "dropout": "0",
        }
    )
    assert task == EXAMPLES["perturbation"]
    assert task.covariate_keys == ("condition", "donor")
    single = Task.from_dict(
        {"name": "perturbation", "perturbation-key": "guide", "covariate-keys": "condition"}
    )
    assert single.covariate_keys == ("condition",)
    none = Task.from_dict({"name": "perturbation", "perturbation-key": "guide", "covariate-keys": ""})
    assert none.covariate_keys == ()
    # the flat config RunSpec writes for Flower spells them so too
    config = RunSpec(task=EXAMPLES["perturbation"], sites=("a", "b"), min_cohort=2).to_run_config()
    assert config["task.covariate-keys"] == "condition,donor"
    # a string given to the task itself is one column, not a list to split
    assert si.tasks.Perturbation(perturbation_key="guide", covariate_keys="condition").covariate_keys == (
        "condition",
    )
    # "" is None for an optional option
    assert Task.from_dict({"name": "embedding", "spatial-key": "", "label-key": ""}) == si.tasks.Embedding()


def test_from_dict_errors_name_the_task_and_the_option():
    with pytest.raises(ValueError, match="Unknown task 'umap'; available: classification, embedding"):
        Task.from_dict({"name": "umap"})
    with pytest.raises(ValueError, match="Task 'embedding' has no option 'n_latnt'; its options: .*n_latent"):
        Task.from_dict({"name": "embedding", "n-latnt": 8})
    with pytest.raises(ValueError, match="Task option 'hidden' must be a int, got 'wide'"):
        Task.from_dict({"name": "classification", "hidden": "wide"})
    with pytest.raises(ValueError, match="needs perturbation_key"):
        Task.from_dict({"name": "perturbation"})
    with pytest.raises(ValueError, match="cannot also be a covariate"):
        Task.from_dict({"name": "perturbation", "perturbation_key": "guide", "covariate_keys": "guide,dose"})
    with pytest.raises(ValueError, match="hidden must be an integer of at least 2"):
        si.tasks.Classification(hidden=1)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        si.tasks.Embedding(dropout=1.0)
    with pytest.raises(TypeError):
        si.tasks.Embedding(16)  # keyword-only options
    with pytest.raises(AttributeError):
        EXAMPLES["embedding"].n_latent = 4  # frozen
    assert EXAMPLES["embedding"].replace(n_latent=4).n_latent == 4


# --- get_task and the label_key shortcut ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Unlabelled(Task):
    """A task without a label column option (not registered)."""

    name: ClassVar[str] = "unlabelled"


def test_get_task_names_objects_and_the_label_key_shortcut():
    assert get_task("classification") == si.tasks.Classification()
    assert get_task("classification", label_key="bulk_labels") == si.tasks.Classification(
        label_key="bulk_labels"
    )
    task = si.tasks.Classification(label_key="bulk_labels", hidden=64)
    assert get_task(task) is task
    assert get_task(task, label_key="bulk_labels") == task  # the same column twice is fine
    assert get_task("embedding", label_key="domain") == si.tasks.Embedding(label_key="domain")
    assert get_task(si.tasks.Mosaic(n_latent=4), label_key="cell_type") == si.tasks.Mosaic(
        n_latent=4, label_key="cell_type"
    )
    # a perturbation's labels are its perturbations
    perturbation = si.tasks.Perturbation(perturbation_key="guide")
    assert perturbation.label_key == "guide"
    assert get_task(perturbation, label_key="guide") == perturbation


def test_get_task_errors():
    with pytest.raises(
        ValueError, match="label_key='cell_type' and the task's label column 'bulk_labels' differ"
    ):
        get_task(si.tasks.Classification(label_key="bulk_labels"), label_key="cell_type")
    with pytest.raises(ValueError, match="label_key='phase' and the task's label column 'guide' differ"):
        get_task(si.tasks.Perturbation(perturbation_key="guide"), label_key="phase")
    with pytest.raises(
        ValueError, match="task='unlabelled' has no label column option: leave label_key= out"
    ):
        get_task(_Unlabelled(), label_key="bulk_labels")
    assert get_task(_Unlabelled()) == _Unlabelled()
    with pytest.raises(ValueError, match="Unknown task 'cluster'; available: classification"):
        get_task("cluster")
    with pytest.raises(TypeError, match="task must be a task name .* or a scinfl.tasks object, got dict"):
        get_task({"name": "embedding"})
    with pytest.raises(ValueError, match="needs perturbation_key"):
        get_task("perturbation")


def test_label_key_shortcut_reaches_the_run(pbmc_sites, key):
    model = si.tl.train_federated(
        pbmc_sites, key=key, task=si.tasks.Classification(hidden=16), label_key="bulk_labels", rounds=1
    )
    assert model.task == si.tasks.Classification(hidden=16, label_key="bulk_labels")
    assert model.spec.task == model.task
    assert model.schema.label_key == "bulk_labels"
    assert model.schema.n_classes == pbmc_sites["site_0"].obs["bulk_labels"].cat.categories.size
    with pytest.raises(ValueError, match="differ: give it once"):
        si.tl.train_federated(pbmc_sites, key=key, task=FAST["task"], label_key="louvain", rounds=1)
    with pytest.raises(ValueError, match="task='classification' needs labels"):
        si.tl.train_federated(pbmc_sites, key=key, task="classification", rounds=1)


# --- ModelConfig ----------------------------------------------------------------------------------------


def _schemas() -> dict[str, FederationSchema]:
    genes = tuple(f"g{i}" for i in range(12))
    plain = FederationSchema(genes, ("B", "T"), "cell_type", None, True, "outer")
    return {
        "classification": plain,
        "lightning": plain,
        "embedding": FederationSchema(genes, (), None, "counts", False, "inner"),
        "perturbation": FederationSchema(
            genes,
            ("NT", "KO1", "KO2"),
            "guide",
            None,
            False,
            "inner",
            covariates=(("condition", ("ctrl", "stim")), ("donor", ("d1", "d2", "d3"))),
        ),
        "mosaic": FederationSchema(
            (*(f"rna:{g}" for g in genes), "prot:CD3", "prot:CD19"),
            (),
            None,
            None,
            False,
            "inner",
            modalities=(("rna", 12), ("prot", 2)),
        ),
    }


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("scheme", [None, "infl", "hardened"])
def test_model_config_round_trips_and_rebuilds_the_network(name, scheme):
    task, schema = EXAMPLES[name], _schemas()[name]
    config = ModelConfig(
        task=task,
        schema=schema,
        norm="layer",
        scheme=scheme,
        key_strength=0.5,
        key_dim=8,
        encoder_hidden=16,
        n_key_points=32,
        mixing_block=4,
    )
    assert (config.hidden, config.dropout) == (task.hidden, task.dropout)
    assert (config.n_features, config.n_classes) == (schema.n_features, schema.n_classes)
    data = config.to_dict()
    assert data["task"] == task.to_dict()
    assert data["schema"] == schema.to_dict()
    again = ModelConfig.from_dict(json.loads(json.dumps(data)))  # as model.json stores it
    assert again == config
    torch.manual_seed(0)
    network = build_network(config)
    torch.manual_seed(0)
    rebuilt = build_network(again)
    assert type(rebuilt) is type(network)
    for (a, x), (b, y) in zip(network.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert a == b
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_model_config_refuses_an_unknown_scheme():
    config = ModelConfig(task=EXAMPLES["classification"], schema=_schemas()["classification"], scheme="rot13")
    with pytest.raises(ValueError, match="Unknown key scheme 'rot13'"):
        build_network(config)


# --- write-back: a task's outputs replace another task's under the same key_added ------------------------


def _removals(caught) -> list[str]:
    return [str(w.message) for w in caught if "an earlier model's outputs" in str(w.message)]


def test_write_back_removes_another_tasks_outputs_with_a_warning(pbmc_sites, key):
    site = pbmc_sites["site_0"]
    registration = dict(site.uns["scinfl"]["registration"])
    si.tl.train_federated(pbmc_sites, key=key, **FAST)
    assert {"scinfl_prediction", "scinfl_confidence"} <= set(site.obs)
    assert {"scinfl_probabilities", "X_scinfl"} <= set(site.obsm)
    assert site.uns["scinfl"]["params"]["task"]["name"] == "classification"

    embedding = si.tasks.Embedding(hidden=32, n_latent=6)
    with pytest.warns(UserWarning, match="an earlier model's outputs under key_added='scinfl'") as caught:
        si.tl.train_federated(pbmc_sites, key=key, task=embedding, rounds=1)
    message = _removals(caught)
    assert len(message) == len(pbmc_sites)  # one warning per site
    for name in (".obs['scinfl_prediction']", ".obs['scinfl_confidence']", ".obsm['scinfl_probabilities']"):
        assert name in message[0]
    assert "X_scinfl" not in message[0]  # the embedding writes it itself
    for adata in pbmc_sites.values():
        assert not {"scinfl_prediction", "scinfl_confidence"} & set(adata.obs)
        assert "scinfl_probabilities" not in adata.obsm
        assert adata.obsm["X_scinfl"].shape == (adata.n_obs, 6)
        entry = adata.uns["scinfl"]
        assert entry["registration"] == registration  # the registration survives
        assert entry["params"]["task"]["name"] == "embedding"
        assert entry["params"]["task"]["n_latent"] == 6
        assert list(entry["categories"]) == []  # the classifier's categories went with its entry
    # the same task again, or another key_added, removes nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = si.tl.train_federated(pbmc_sites, key=key, task=embedding, rounds=1)
        si.tl.predict(site, model, key=key, key_added="other")
    assert not _removals(caught)
    assert site.obsm["X_other"].shape == (site.n_obs, 6)
    np.testing.assert_array_equal(site.obsm["X_other"], site.obsm["X_scinfl"])
