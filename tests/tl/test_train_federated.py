"""End to end on real PBMCs: train_federated, write-back, predict, save/load, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import scinfl as si
from helpers import FAST, FAST_TASK, assert_no_secret, assert_same_weights, key_secrets, serialised
from scinfl.federation import RunSpec
from scinfl.model import KeyMismatchError
from scinfl.nn import KeyedNetwork


@pytest.fixture(scope="module")
def trained(pbmc_split, key):
    """A keyed model trained on three label-skewed sites, and the sites it wrote into."""
    sites, _ = pbmc_split
    model = si.tl.train_federated(sites, key=key, copy=True, **{**FAST, "rounds": 8})
    return model, model.sites


def _accuracy(adata, column="scinfl_prediction") -> float:
    return float((adata.obs[column].astype(str) == adata.obs["bulk_labels"].astype(str)).mean())


def test_keyed_model_learns_cell_types(trained, pbmc_split, key):
    model, _ = trained
    _, test = pbmc_split
    test = test.copy()
    si.tl.predict(test, model, key=key)
    majority = test.obs["bulk_labels"].value_counts(normalize=True).max()
    assert _accuracy(test) > majority + 0.2  # majority class is 0.34 on this test set


def test_write_back_follows_scanpy_conventions(trained, key):
    model, written = trained
    for adata in written.values():
        pred = adata.obs["scinfl_prediction"]
        assert isinstance(pred.dtype, pd.CategoricalDtype)
        assert list(pred.cat.categories) == list(model.schema.categories)
        probs = adata.obsm["scinfl_probabilities"]
        assert probs.shape == (adata.n_obs, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(adata.obs["scinfl_confidence"], probs.max(axis=1), rtol=1e-6)
        assert (np.asarray(model.schema.categories)[probs.argmax(axis=1)] == pred.astype(str)).all()
        assert adata.obsm["X_scinfl"].shape == (adata.n_obs, FAST_TASK.hidden // 2)
        uns = adata.uns["scinfl"]
        assert uns["key_fingerprint"] == key.fingerprint
        assert uns["params"]["rounds"] == 8
        assert uns["params"]["task"] == FAST_TASK.to_dict()
        assert uns["params"]["best_round"] == model.params["best_round"]
        assert uns["scheme"] == "infl"
        assert list(uns["categories"]) == list(model.schema.categories)
    assert isinstance(model.network, KeyedNetwork)
    assert set(model.history.columns) >= {"round", "site", "train_loss", "val_loss", "val_accuracy", "n_val"}
    assert len(model.history) == 8 * 3


def test_embedding_feeds_scanpy(trained):
    import scanpy as sc

    _, written = trained
    adata = written["site_1"]
    sc.pp.neighbors(adata, use_rep="X_scinfl", n_neighbors=10)
    sc.tl.umap(adata)
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)


def test_h5ad_round_trip(trained, tmp_path):
    import anndata as ad

    _, written = trained
    path = tmp_path / "site.h5ad"
    written["site_0"].write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(
        back.obsm["scinfl_probabilities"], written["site_0"].obsm["scinfl_probabilities"]
    )
    assert back.uns["scinfl"]["key_fingerprint"] == written["site_0"].uns["scinfl"]["key_fingerprint"]


def _unchanged(adata, before) -> None:
    """``adata`` holds exactly what ``before`` (a copy taken earlier) held."""
    assert (adata.raw.X != before.raw.X).nnz == 0
    assert (adata.X != before.X).sum() == 0
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    assert set(adata.obsm) == set(before.obsm)
    assert set(adata.layers) == set(before.layers)
    assert adata.uns["scinfl"] == before.uns["scinfl"]  # the registration only


def test_copy_true_leaves_the_callers_sites_alone_and_returns_the_copies(pbmc_sites, key):
    before = {n: a.copy() for n, a in pbmc_sites.items()}
    model = si.tl.train_federated(pbmc_sites, key=key, copy=True, **{**FAST, "rounds": 1})
    assert isinstance(model, si.FederatedModel)
    for name, adata in pbmc_sites.items():
        assert "scinfl_prediction" not in adata.obs
        assert "X_scinfl" not in adata.obsm
        _unchanged(adata, before[name])
    # the written copies are model.sites: the same cells, with the outputs, not the caller's objects
    assert list(model.sites) == list(pbmc_sites)
    for name, written in model.sites.items():
        assert written is not pbmc_sites[name]
        pd.testing.assert_index_equal(written.obs_names, pbmc_sites[name].obs_names)
        assert written.obs["scinfl_prediction"].notna().all()
        assert written.obsm["scinfl_probabilities"].shape == (written.n_obs, 10)
        assert written.obsm["X_scinfl"].shape == (written.n_obs, FAST_TASK.hidden // 2)
        assert written.uns["scinfl"]["key_fingerprint"] == key.fingerprint
        assert written.uns["scinfl"]["registration"] == pbmc_sites[name].uns["scinfl"]["registration"]
        pd.testing.assert_frame_equal(written.obs[before[name].obs.columns], before[name].obs)
        # the copies got what predicting with the model gives
        expected = model.predict(pbmc_sites[name], key=key, site=name).probabilities
        np.testing.assert_allclose(written.obsm["scinfl_probabilities"], expected, rtol=1e-6, atol=1e-7)


def test_copy_false_writes_in_place(pbmc_sites, key):
    before = {n: a.copy() for n, a in pbmc_sites.items()}
    result = si.tl.train_federated(pbmc_sites, key=key, **{**FAST, "rounds": 1})
    assert isinstance(result, si.FederatedModel)
    assert result.sites is None
    assert all("scinfl_prediction" in a.obs for a in pbmc_sites.values())
    # nothing else of the user's data changed
    for name, adata in pbmc_sites.items():
        assert (adata.raw.X != before[name].raw.X).nnz == 0
        pd.testing.assert_frame_equal(adata.obs[before[name].obs.columns], before[name].obs)
        assert adata.uns["scinfl"]["registration"] == before[name].uns["scinfl"]["registration"]


def test_same_seed_same_model_other_seed_other_model(pbmc_sites, key):
    def weights(seed):
        model = si.tl.train_federated(pbmc_sites, key=key, copy=True, **{**FAST, "rounds": 2, "seed": seed})
        return model.network.state_dict()

    a, b, c = weights(3), weights(3), weights(4)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_plain_fedavg_baseline_has_no_keyed_modules(pbmc_sites):
    model = si.tl.train_federated(pbmc_sites, key=None, copy=True, **{**FAST, "rounds": 1})
    written = model.sites
    assert model.key_fingerprint is None
    assert not any(isinstance(m, si.nn.KeyedLinear) for m in model.network.modules())
    assert written["site_0"].uns["scinfl"]["scheme"] == "plain"
    assert "key_fingerprint" not in written["site_0"].uns["scinfl"]


def test_predict_checks_the_key_version(trained, pbmc_split, key):
    model, _ = trained
    _, test = pbmc_split
    wrong = si.FederationKey.generate(scheme="infl")
    for bad in (wrong, None):
        with pytest.raises(KeyMismatchError, match=key.fingerprint):
            si.tl.predict(test.copy(), model, key=bad)
    right = si.tl.predict(test, model, key=key, copy=True)
    evaluated = si.tl.predict(test, model, key=wrong, check_key=False, copy=True)
    unkeyed = si.tl.predict(test, model, key=None, check_key=False, copy=True)
    assert "scinfl_prediction" not in test.obs  # copy=True left the input alone
    p = right.obsm["scinfl_probabilities"]
    assert np.abs(p - evaluated.obsm["scinfl_probabilities"]).max() > 1e-4
    assert np.abs(p - unkeyed.obsm["scinfl_probabilities"]).max() > 1e-3


def test_key_errors_say_what_to_pass(trained, pbmc_split, key, tmp_path):
    """A plain model given a key is told to take key=None; a keyed one given none or another, which key."""
    model, _ = trained
    _, test = pbmc_split
    plain = si.tl.train_federated(
        {"a": test[:70].copy(), "b": test[70:].copy()}, key=None, **FAST, secure_aggregation={"min_cohort": 2}
    )
    with pytest.raises(KeyMismatchError, match=r"plain model \(trained without a key\).*pass key=None"):
        si.tl.predict(test.copy(), plain, key=key)
    with pytest.raises(KeyMismatchError, match=f"trained under key {key.fingerprint}, but no key was given"):
        si.tl.predict(test.copy(), model, key=None)
    with pytest.raises(KeyMismatchError, match="FederationKey.load"):
        si.tl.predict(test.copy(), model, key=si.FederationKey.generate(scheme="infl"))


def test_a_key_files_path_is_loaded(trained, pbmc_split, key, tmp_path):
    model, _ = trained
    _, test = pbmc_split
    path = key.save(tmp_path / "consortium.key")
    by_path = si.tl.predict(test, model, key=str(path), copy=True)
    by_key = si.tl.predict(test, model, key=key, copy=True)
    np.testing.assert_array_equal(by_path.obsm["scinfl_probabilities"], by_key.obsm["scinfl_probabilities"])
    with pytest.raises(FileNotFoundError, match="names no key file"):
        si.tl.predict(test, model, key=str(tmp_path / "missing.key"), copy=True)
    with pytest.raises(
        TypeError, match=r"key must be a scinfl.FederationKey, the path of a key file.*FederationKey.load"
    ):
        si.tl.predict(test, model, key=key.fingerprint.encode(), copy=True)
    with pytest.raises(TypeError, match="the path of a key file"):
        si.tl.train_federated({"a": test[:70].copy(), "b": test[70:].copy()}, key=123, **FAST)


def test_predict_aligns_genes_by_name(trained, pbmc_split, key):
    model, _ = trained
    _, test = pbmc_split
    full = si.tl.predict(test, model, key=key, copy=True)
    # the same cells with genes in reverse order give the same predictions
    raw = test.raw.to_adata()
    reversed_ = raw[:, raw.var_names[::-1]].copy()
    reversed_.raw = reversed_
    si.tl.predict(reversed_, model, key=key)
    np.testing.assert_allclose(
        reversed_.obsm["scinfl_probabilities"], full.obsm["scinfl_probabilities"], rtol=1e-5, atol=1e-6
    )
    # 10% of genes missing: zero-filled with a warning that counts them
    n_drop = model.schema.n_features // 10
    partial = raw[:, raw.var_names[n_drop:]].copy()
    partial.raw = partial
    with pytest.warns(UserWarning, match=f"lacks {n_drop} of the model's {model.schema.n_features} features"):
        si.tl.predict(partial, model, key=key)
    # too few shared genes: an error naming the overlap
    sparse_panel = raw[:, raw.var_names[:100]].copy()
    sparse_panel.raw = sparse_panel
    with pytest.raises(ValueError, match="shares only 100 of the model's"):
        si.tl.predict(sparse_panel, model, key=key)


def test_save_load_round_trip_without_key_material(trained, pbmc_split, key, tmp_path):
    model, _ = trained
    _, test = pbmc_split
    path = model.save(tmp_path / "model")
    loaded = si.FederatedModel.load(path)
    assert loaded.key_fingerprint == key.fingerprint
    assert loaded.schema == model.schema
    assert loaded.config == model.config
    pd.testing.assert_frame_equal(loaded.history, model.history, check_dtype=False)
    a = model.predict(test, key=key).probabilities
    b = loaded.predict(test, key=key).probabilities
    np.testing.assert_array_equal(a, b)
    for file in path.iterdir():
        blob = file.read_bytes()
        for secret in key_secrets(key):
            assert secret not in blob, file.name
    assert_no_secret(serialised(model.network.state_dict()), key_secrets(key))
    meta = json.loads((path / "model.json").read_text())
    assert meta["spec"]["key_fingerprint"] == key.fingerprint
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(path)
    model.save(path, overwrite=True)
    with pytest.raises(FileNotFoundError, match="weights.safetensors"):
        si.FederatedModel.load(tmp_path)


def test_spec_round_trips_through_save_and_load_without_key_bytes(pbmc_sites, key, tmp_path):
    """Every run setting (task options, optimisation, sampling, ...) is saved and read back as given."""
    task = si.tasks.Embedding(n_latent=8, label_key="bulk_labels", hidden=32, dropout=0.2)
    model = si.tl.train_federated(
        pbmc_sites,
        key=key,
        task=task,
        join="outer",
        rounds=2,
        fit={"local_epochs": 2, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.0},
        secure_aggregation={"min_cohort": 2},
        fraction=0.67,
        key_strength=0.5,
        validation_fraction=0.2,
        seed=3,
    )
    expected = RunSpec(
        task=task,
        sites=tuple(pbmc_sites),
        key_fingerprint=key.fingerprint,
        scheme="infl",
        rounds=2,
        fraction=0.67,
        fit=si.train.FitSettings(local_epochs=2, batch_size=64, lr=2e-3, weight_decay=0.0),
        key_strength=0.5,
        validation_fraction=0.2,
        join="outer",
        seed=3,
        min_cohort=2,
    )
    assert model.spec == expected
    path = model.save(tmp_path / "model")
    loaded = si.FederatedModel.load(path)
    assert loaded.spec == model.spec
    assert loaded.spec.to_dict() == model.spec.to_dict()
    assert loaded.spec.signature() == model.spec.signature()
    assert loaded.task == task
    assert loaded.config == model.config
    assert loaded.params == model.params
    assert_same_weights(loaded, model)
    pd.testing.assert_frame_equal(loaded.history, model.history, check_dtype=False)
    saved = [file for file in path.rglob("*") if file.is_file()]
    assert {file.name for file in saved} >= {"model.json", "weights.safetensors", "history.csv"}
    for file in saved:
        blob = file.read_bytes()
        for secret in key_secrets(key):
            assert secret not in blob, file.name


def test_label_key_shortcut_and_the_tasks_label_key(pbmc_sites, key):
    before = {n: a.copy() for n, a in pbmc_sites.items()}
    # given twice with different columns: an error naming both, before anything is trained or written
    with pytest.raises(
        ValueError, match=r"label_key='louvain' and the task's label column 'bulk_labels' differ"
    ):
        si.tl.train_federated(pbmc_sites, key=key, task=FAST_TASK, label_key="louvain", rounds=1)
    # a perturbation model's labels are its perturbations
    with pytest.raises(
        ValueError, match=r"label_key='louvain' and the task's label column 'bulk_labels' differ"
    ):
        si.tl.train_federated(
            pbmc_sites,
            key=key,
            task=si.tasks.Perturbation(perturbation_key="bulk_labels", control="CD14+ Monocyte"),
            label_key="louvain",
            rounds=1,
        )
    for name, adata in pbmc_sites.items():
        assert "scinfl_prediction" not in adata.obs
        _unchanged(adata, before[name])
    # the same column twice is one column; the shortcut alone sets the task's
    for task in (FAST_TASK, FAST_TASK.replace(label_key=None)):
        model = si.tl.train_federated(
            pbmc_sites, key=key, task=task, label_key="bulk_labels", rounds=1, copy=True
        )
        assert model.task == FAST_TASK
        assert model.schema.label_key == "bulk_labels"


def test_bad_input_names_the_site_and_the_problem(pbmc_sites, key):
    sites = {n: a.copy() for n, a in pbmc_sites.items()}
    originals = {n: a.copy() for n, a in sites.items()}

    nan_site = sites["site_1"].copy()
    nan_site.raw.X.data[:3] = np.nan
    with pytest.raises(ValueError, match=r"Site 'site_1'.*3 NaN or infinite"):
        si.tl.train_federated({**sites, "site_1": nan_site}, key=key, **FAST)

    no_label = sites["site_2"].copy()
    del no_label.obs["bulk_labels"]
    with pytest.raises(ValueError, match=r"Site 'site_2': label column 'bulk_labels' is missing"):
        si.tl.train_federated({**sites, "site_2": no_label}, key=key, **FAST)

    with pytest.raises(ValueError, match=r"Site 'empty' has no cells"):
        si.tl.train_federated({**sites, "empty": sites["site_0"][:0].copy()}, key=key, **FAST)

    renamed = sites["site_0"].raw.to_adata()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    renamed.raw = renamed
    with pytest.raises(ValueError, match="share no feature names"):
        si.tl.train_federated({**sites, "site_0": renamed}, key=key, **FAST)

    with pytest.raises(FileNotFoundError, match="key='my-password' names no key file.*FederationKey"):
        si.tl.train_federated(sites, key="my-password", **FAST)
    with pytest.raises(ValueError, match="needs labels"):
        si.tl.train_federated(sites, key=key, rounds=1)  # registered without a label column
    # none of the failed calls wrote into or changed the user's data
    for name, adata in sites.items():
        assert "scinfl_prediction" not in adata.obs
        pd.testing.assert_frame_equal(adata.obs, originals[name].obs)


def test_label_skew_extremes_still_train(pbmc, key):
    """A site holding one class, and a class with a single cell, are normal in federations."""
    labels = pbmc.obs["bulk_labels"].astype(str).to_numpy()
    one_cd34 = np.flatnonzero(labels == "CD34+")[:1]
    sites = {
        "one_class": pbmc[labels == "Dendritic"].copy(),
        "rest": pbmc[(labels != "Dendritic") & (labels != "CD34+")].copy(),
        "one_cell_of_a_class": pbmc[np.r_[one_cd34, np.flatnonzero(labels == "CD19+ B")[:20]]].copy(),
    }
    model = si.tl.train_federated(sites, key=key, copy=True, **{**FAST, "rounds": 2})
    written = model.sites
    assert "CD34+" in model.schema.categories  # known from its single cell
    assert model.history.groupby("site").n_train.first()["one_cell_of_a_class"] >= 18
    assert written["one_class"].obs["scinfl_prediction"].notna().all()
    assert written["one_cell_of_a_class"].obsm["scinfl_probabilities"].shape[1] == 10


def test_predict_reads_the_values_where_the_query_keeps_them(trained, pbmc_split, key):
    model, _ = trained  # trained on sites registered with use_raw=True
    _, test = pbmc_split
    expected = si.tl.predict(test, model, key=key, copy=True).obsm["scinfl_probabilities"]
    in_x = test.raw.to_adata()  # log-normalised values in .X, no .raw
    with pytest.raises(ValueError, match="no .raw"):
        si.tl.predict(in_x, model, key=key, copy=True)
    got = si.tl.predict(in_x, model, key=key, use_raw=False, copy=True).obsm["scinfl_probabilities"]
    np.testing.assert_array_equal(got, expected)
    in_layer = test.copy()
    in_layer.layers["lognorm"] = test.raw.X.copy()
    del in_layer.raw
    got = si.tl.predict(in_layer, model, key=key, layer="lognorm", copy=True).obsm["scinfl_probabilities"]
    np.testing.assert_array_equal(got, expected)


def test_a_truncated_site_file_names_the_site_and_the_path(pbmc_sites, tmp_path):
    """A site file cut short (a copy that did not finish) is refused before anything runs, by site and
    path, not with h5py's own message alone."""
    paths = {}
    for name, site in pbmc_sites.items():
        paths[name] = tmp_path / f"{name}.h5ad"
        site.write_h5ad(paths[name])
    whole = paths["site_1"].read_bytes()
    paths["site_1"].write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        ValueError, match=r"Site 'site_1': .*site_1\.h5ad cannot be read as an h5ad file .*truncated"
    ):
        si.tl.train_federated(paths, key=None, **FAST)


def test_the_same_anndata_given_for_two_sites_is_said(pbmc_sites):
    sites = {"a": pbmc_sites["site_0"], "b": pbmc_sites["site_1"], "c": pbmc_sites["site_0"]}
    with pytest.warns(UserWarning, match="Sites 'a' and 'c' are the same AnnData object"):
        si.tl.train_federated(sites, key=None, **{**FAST, "rounds": 1})


def test_labels_coded_as_numbers_at_one_site_and_names_at_another_are_refused(pbmc_sites):
    """Integer codes at one site and the names elsewhere would make a model of every class twice."""
    sites = {name: site.copy() for name, site in pbmc_sites.items()}
    labels = sites["site_0"].obs["bulk_labels"]
    sites["site_0"].obs["bulk_labels"] = labels.cat.codes.astype(int)
    before = {name: site.obs["bulk_labels"].copy() for name, site in sites.items()}
    with pytest.raises(
        ValueError,
        match=r"code the label column 'bulk_labels' differently \(site_0: numbers such as '0', '1'.*site_1: names such as",
    ):
        si.tl.train_federated(sites, key=None, **FAST)
    for name, site in sites.items():  # nothing was changed
        pd.testing.assert_series_equal(site.obs["bulk_labels"], before[name])
