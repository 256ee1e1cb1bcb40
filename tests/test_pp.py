"""scinfl.pp on real PBMCs: split one AnnData into simulated sites or a held-out set, and register a
site's fields."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scinfl as si

LABEL = "bulk_labels"
REGISTERED = {"use_raw": True}  # the pbmc fixture's registration


def _same(a, b, where="") -> None:
    """Deep equality of nested .uns-like structures (dicts, arrays, scalars)."""
    if sparse.issparse(a):
        assert sparse.issparse(b), where
        _same(a.toarray(), b.toarray(), where)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), where
        assert a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    elif hasattr(a, "keys"):
        assert set(a.keys()) == set(b.keys()), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    else:
        assert a == b, where


def _snapshot(adata):
    return {
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "X": adata.X.copy(),
        "raw": adata.raw.X.copy(),
        "uns": copy.deepcopy(dict(adata.uns)),
        "shape": adata.shape,
    }


def _assert_unchanged(adata, snap) -> None:
    assert adata.shape == snap["shape"]
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    np.testing.assert_array_equal(adata.X, snap["X"])
    assert (snap["raw"] != adata.raw.X).nnz == 0
    _same(dict(adata.uns), snap["uns"], "uns")


# --------------------------------------------------------------------------------------------------------
# pp.split_sites, pp.split_holdout


def test_split_sites_by_site_key(pbmc):
    snap = _snapshot(pbmc)
    sites = si.pp.split_sites(pbmc, site_key="phase")
    assert list(sites) == ["G1", "G2M", "S"]
    for name, site in sites.items():
        assert not site.is_view
        assert site is not pbmc
        assert (site.obs["phase"].astype(str) == name).all()
        assert site.n_obs == int((pbmc.obs["phase"] == name).sum())
        rows = pbmc.obs_names.get_indexer(site.obs_names)
        np.testing.assert_array_equal(site.X, pbmc.X[rows])
        assert site.var_names.equals(pbmc.var_names)
        assert site.uns["scinfl"]["registration"] == REGISTERED  # inherited
    all_names = np.concatenate([s.obs_names.to_numpy() for s in sites.values()])
    assert len(all_names) == pbmc.n_obs
    assert set(all_names) == set(pbmc.obs_names)
    # the sites are new objects: editing one leaves the input alone
    sites["G1"].X[:] = 0
    sites["G1"].obs["phase"] = "edited"
    sites["G1"].uns["bulk_labels_colors"][0] = "#000000"
    si.pp.register_site(
        sites["G2M"], site="G2M", label_key=LABEL
    )  # re-registering a site leaves the input alone
    sites["S"].uns["scinfl"]["registration"]["use_raw"] = False
    _assert_unchanged(pbmc, snap)


def test_split_sites_by_dirichlet(pbmc):
    snap = _snapshot(pbmc)
    sites = si.pp.split_sites(pbmc, n_sites=3, label_key=LABEL, alpha=0.5, seed=0, min_cells=20)
    assert list(sites) == ["site_0", "site_1", "site_2"]
    names = [set(s.obs_names) for s in sites.values()]
    assert sum(len(n) for n in names) == pbmc.n_obs
    assert set().union(*names) == set(pbmc.obs_names)
    for site in sites.values():
        assert not site.is_view
        assert site.n_obs >= 20
        rows = pbmc.obs_names.get_indexer(site.obs_names)
        np.testing.assert_array_equal(site.X, pbmc.X[rows])
        pd.testing.assert_series_equal(site.obs["n_counts"], pbmc.obs["n_counts"].iloc[rows])
        assert site.uns["scinfl"]["registration"] == REGISTERED  # inherited
    again = si.pp.split_sites(pbmc, n_sites=3, label_key=LABEL, alpha=0.5, seed=0, min_cells=20)
    assert all(again[k].obs_names.equals(sites[k].obs_names) for k in sites)
    other = si.pp.split_sites(pbmc, n_sites=3, label_key=LABEL, alpha=0.5, seed=1, min_cells=20)
    assert any(not other[k].obs_names.equals(sites[k].obs_names) for k in sites)
    for site in sites.values():
        site.X[:] = 0
    _assert_unchanged(pbmc, snap)


def test_pbmc_sites_fixture_is_label_skewed(pbmc_sites, pbmc):
    assert sum(s.n_obs for s in pbmc_sites.values()) == pbmc.n_obs
    shares = [s.obs[LABEL].value_counts(normalize=True).max() for s in pbmc_sites.values()]
    overall = pbmc.obs[LABEL].value_counts(normalize=True).max()
    assert max(shares) > overall


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "Pass either site_key= .* or n_sites="),
        ({"site_key": "phase", "n_sites": 2}, "Pass either site_key="),
        ({"site_key": "hospital"}, "site_key 'hospital' is not a column of .obs"),
        ({"n_sites": 2}, "needs label_key= naming an .obs column; got None"),
        ({"n_sites": 2, "label_key": "cell_type"}, "got 'cell_type'"),
    ],
)
def test_split_sites_rejects_bad_arguments(pbmc, kwargs, message):
    with pytest.raises(ValueError, match=message):
        si.pp.split_sites(pbmc, **kwargs)


def test_split_holdout_is_stratified_and_disjoint(pbmc):
    snap = _snapshot(pbmc)
    rest, held = si.pp.split_holdout(pbmc, label_key=LABEL, fraction=0.2, seed=0)
    assert not rest.is_view
    assert not held.is_view
    assert not set(rest.obs_names) & set(held.obs_names)
    assert set(rest.obs_names) | set(held.obs_names) == set(pbmc.obs_names)
    total = pbmc.obs[LABEL].value_counts()
    held_counts = held.obs[LABEL].value_counts().reindex(total.index, fill_value=0)
    for cls, n in total.items():
        assert abs(held_counts[cls] - 0.2 * n) <= 1, cls
    assert held.n_obs == pytest.approx(0.2 * pbmc.n_obs, abs=len(total))
    rows = pbmc.obs_names.get_indexer(held.obs_names)
    np.testing.assert_array_equal(held.X, pbmc.X[rows])
    for part in (rest, held):
        assert part.uns["scinfl"]["registration"] == REGISTERED  # inherited
    held.uns["scinfl"]["registration"]["use_raw"] = False
    _assert_unchanged(pbmc, snap)
    again = si.pp.split_holdout(pbmc, label_key=LABEL, fraction=0.2, seed=0)[1]
    assert again.obs_names.equals(held.obs_names)


def test_split_holdout_rejects_missing_label(pbmc):
    with pytest.raises(ValueError, match="label_key 'cell_type' is not a column of .obs"):
        si.pp.split_holdout(pbmc, label_key="cell_type")


# --------------------------------------------------------------------------------------------------------
# pp.register_site


def test_register_site_writes_registration(pbmc):
    pbmc.uns["scinfl"] = {"params": {"kept": 1}}
    result = si.pp.register_site(pbmc, site="A", label_key=LABEL, use_raw=True)
    assert result is None
    assert pbmc.uns["scinfl"]["registration"] == {"site": "A", "use_raw": True, "label_key": LABEL}
    assert pbmc.uns["scinfl"]["params"] == {"kept": 1}  # other scinfl entries are kept


def test_register_site_layer(pbmc):
    pbmc.layers["counts"] = pbmc.raw.X.copy()
    si.pp.register_site(pbmc, site="lab_2", layer="counts")
    assert pbmc.uns["scinfl"]["registration"] == {"site": "lab_2", "use_raw": False, "layer": "counts"}


def test_register_site_rejects_missing_label_naming_the_site(pbmc):
    with pytest.raises(
        ValueError, match=r"Site 'lab_7': label column 'cell_type' is missing from \.obs \(columns: "
    ):
        si.pp.register_site(pbmc, site="lab_7", label_key="cell_type")
    assert pbmc.uns["scinfl"] == {"registration": REGISTERED}  # the earlier registration is untouched


def test_register_site_rejects_missing_layer_and_empty_site(pbmc):
    with pytest.raises(ValueError, match="Site 'A': layer 'counts' not found"):
        si.pp.register_site(pbmc, site="A", layer="counts")
    empty = pbmc[:0].copy()
    with pytest.raises(ValueError, match="Site 'E' has no cells"):
        si.pp.register_site(empty, site="E", label_key=LABEL)


def test_register_site_again_replaces_the_old_registration(pbmc):
    pbmc.layers["counts"] = pbmc.raw.X.copy()
    si.pp.register_site(pbmc, site="A", label_key=LABEL, layer="counts")
    si.pp.register_site(pbmc, site="A", label_key=LABEL, use_raw=True)
    assert pbmc.uns["scinfl"]["registration"] == {"site": "A", "use_raw": True, "label_key": LABEL}


def test_register_site_again_without_layer_drops_the_layer(pbmc):
    pbmc.layers["counts"] = pbmc.raw.X.copy()
    si.pp.register_site(pbmc, site="A", label_key=LABEL, layer="counts")
    si.pp.register_site(pbmc, site="A")
    assert pbmc.uns["scinfl"]["registration"] == {"site": "A", "use_raw": False}


def test_register_site_without_a_name(pbmc):
    si.pp.register_site(pbmc, label_key=LABEL)
    assert pbmc.uns["scinfl"]["registration"] == {"use_raw": False, "label_key": LABEL}  # no site recorded
    assert si.data.site_fields(pbmc, "A") == si.data.SiteFields(label_key=LABEL)
    # errors name the AnnData generically, and leave the registration as it was
    with pytest.raises(ValueError, match=r"Site 'adata': label column 'cell_type' is missing from \.obs"):
        si.pp.register_site(pbmc, label_key="cell_type")
    with pytest.raises(TypeError, match=r"Site 'adata' is a ndarray, not an AnnData"):
        si.pp.register_site(pbmc.X)
    assert pbmc.uns["scinfl"]["registration"] == {"use_raw": False, "label_key": LABEL}


def test_register_site_on_a_dict_registers_each_under_its_name(pbmc):
    sites = si.pp.split_sites(pbmc, n_sites=3, label_key=LABEL, alpha=1.0, seed=0)
    snap = _snapshot(pbmc)
    sites["site_1"].layers["counts"] = sites["site_1"].raw.X.copy()
    assert si.pp.register_site(sites, label_key=LABEL) is None
    for name, site in sites.items():
        assert site.uns["scinfl"]["registration"] == {"site": name, "use_raw": False, "label_key": LABEL}
        assert si.data.site_fields(site, name) == si.data.SiteFields(label_key=LABEL)
    si.pp.register_site({"site_1": sites["site_1"]}, layer="counts")  # only the sites given
    assert sites["site_1"].uns["scinfl"]["registration"] == {
        "site": "site_1",
        "use_raw": False,
        "layer": "counts",
    }
    assert sites["site_0"].uns["scinfl"]["registration"]["label_key"] == LABEL
    _assert_unchanged(pbmc, snap)  # the sites' registrations are their own


def test_register_site_on_a_dict_names_the_failing_site(pbmc):
    sites = si.pp.split_sites(pbmc, n_sites=2, label_key=LABEL, alpha=1.0, seed=0)
    del sites["site_1"].obs[LABEL]
    with pytest.raises(ValueError, match=r"Site 'site_1': label column 'bulk_labels' is missing from \.obs"):
        si.pp.register_site(sites, label_key=LABEL)
    with pytest.raises(TypeError, match=r"Site 'B' is a str, not an AnnData"):
        si.pp.register_site({"A": sites["site_0"], "B": "b.h5ad"})
    with pytest.raises(
        ValueError, match="site= names one AnnData; a mapping of sites registers each under its name"
    ):
        si.pp.register_site(sites, site="A", use_raw=True)
    assert sites["site_1"].uns["scinfl"]["registration"] == REGISTERED


def test_register_site_rejects_a_bad_modality(pbmc):
    si.pp.register_site(pbmc, site="A", modality="prot")
    assert pbmc.uns["scinfl"]["registration"] == {"site": "A", "use_raw": False, "modality": "prot"}
    for modality in ("", "rna:prot", 3):
        with pytest.raises(ValueError, match=r"Site 'A': a modality is a non-empty name without ':'"):
            si.pp.register_site(pbmc, site="A", modality=modality)
    assert pbmc.uns["scinfl"]["registration"]["modality"] == "prot"


def test_register_a_view_makes_it_an_actual_anndata_and_leaves_its_parent(pbmc):
    snap = _snapshot(pbmc)
    view = pbmc[:100]
    assert view.is_view
    with pytest.warns(UserWarning, match="initializing view as actual"):
        si.pp.register_site(view, site="v", label_key=LABEL)
    assert not view.is_view
    assert view.uns["scinfl"]["registration"] == {"site": "v", "use_raw": False, "label_key": LABEL}
    _assert_unchanged(pbmc, snap)


def test_register_site_rejects_a_scinfl_entry_that_is_not_a_dict(pbmc):
    pbmc.uns["scinfl"] = "notes"
    with pytest.raises(
        TypeError, match=r"Site 'A': \.uns\['scinfl'\] is a str, but scinfl keeps a dict there"
    ):
        si.pp.register_site(pbmc, site="A")
    assert pbmc.uns["scinfl"] == "notes"
