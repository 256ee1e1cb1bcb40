"""The federation schema on real PBMCs: what a site publishes (describe_site), the schema agreed from it
(build_schema), where a site's fields are (site_fields) and its label codes."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest

import scinfl as si
from scinfl.data import (
    AlignedMatrix,
    FederationSchema,
    SiteFields,
    build_schema,
    describe_site,
    label_codes,
    site_fields,
)

LABEL = "bulk_labels"
X_FIELDS = SiteFields(label_key=LABEL)
RAW_FIELDS = SiteFields(label_key=LABEL, use_raw=True)


def _schema(sites, fields: SiteFields | dict[str, SiteFields] = X_FIELDS, **kwargs) -> FederationSchema:
    """The schema agreed from what each site publishes (``describe_site`` with ``fields``)."""
    return build_schema(
        {
            name: describe_site(adata, name, fields if isinstance(fields, SiteFields) else fields[name])
            for name, adata in sites.items()
        },
        **kwargs,
    )


def _unregistered(adata):
    """``adata`` without the fixture's registration (``use_raw=True``): the defaults apply."""
    del adata.uns["scinfl"]
    return adata


# --------------------------------------------------------------------------------------------------------
# describe_site: what a site publishes


def test_describe_site_publishes_names_and_counts_only(pbmc):
    description = describe_site(pbmc, "A", RAW_FIELDS, covariate_keys=("phase",))
    assert json.loads(json.dumps(description)) == description  # JSON: it travels in Flower's first message
    assert description == {
        "var_names": list(pbmc.raw.var_names),
        "categories": list(pbmc.obs[LABEL].cat.categories),
        "label_coding": "names",  # how the column writes its labels (names, not numeric codes)
        "covariates": {"phase": ["G1", "G2M", "S"]},
        "label_key": LABEL,
        "layer": None,
        "use_raw": True,
        "n_obs": 700,
    }
    # the names of the matrix the fields point at; no label column, no categories
    unlabelled = describe_site(pbmc[:, :100], "A", SiteFields())
    assert unlabelled["var_names"] == list(pbmc.var_names[:100])
    assert unlabelled["categories"] == []
    assert unlabelled["covariates"] == {}
    assert unlabelled["n_obs"] == 700


def test_describe_site_of_a_matrix_without_features_raises_naming_the_site(pbmc):
    with pytest.raises(ValueError, match=r"Site 'E' has no features \(its matrix has no columns\)"):
        describe_site(pbmc[:, []].copy(), "E", SiteFields())
    description = describe_site(pbmc, "E", X_FIELDS) | {"var_names": []}
    with pytest.raises(ValueError, match=r"Site 'E' has no features"):
        build_schema({"E": description})


def test_missing_covariate_column_raises_naming_the_site(pbmc):
    with pytest.raises(
        ValueError, match=r"Site 'B': column 'donor' is missing from \.obs \(columns: bulk_labels"
    ):
        describe_site(pbmc, "B", X_FIELDS, covariate_keys=("donor",))


# --------------------------------------------------------------------------------------------------------
# build_schema: features


def test_inner_join_keeps_shared_genes_in_first_site_order_and_warns(pbmc):
    genes = list(pbmc.var_names)
    a = pbmc[:350].copy()
    # site B: other cells, genes in reverse order, 5 genes missing, 3 renamed (held by B only)
    b = pbmc[350:, genes[5:][::-1]].copy()
    renamed = {genes[10]: "B_ONLY_1", genes[20]: "B_ONLY_2", genes[700]: "B_ONLY_3"}
    b.var_names = [renamed.get(g, g) for g in b.var_names]

    with pytest.warns(
        UserWarning, match=r"^11 features are not held by every site .*; 757 shared features remain"
    ):
        schema = _schema({"A": a, "B": b}, join="inner")

    expected = [g for g in genes[5:] if g not in renamed]
    assert schema.var_names == tuple(expected)
    assert schema.n_features == 757
    assert schema.join == "inner"


def test_inner_join_of_identical_genes_does_not_warn(pbmc):
    a, b = pbmc[:350].copy(), pbmc[350:].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = _schema({"A": a, "B": b})
    assert schema.var_names == tuple(pbmc.var_names)
    assert schema.join == "inner"  # the default


def test_outer_join_keeps_all_genes_and_zero_fills(pbmc):
    genes = list(pbmc.var_names)
    a = pbmc[:300, genes[:500]].copy()
    b = pbmc[300:, genes[300:][::-1]].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = _schema({"A": a, "B": b}, join="outer")
    # A's genes in A's order, then the genes only B holds in B's order
    assert schema.var_names == tuple(genes[:500] + genes[500:][::-1])
    assert schema.join == "outer"

    column = {g: j for j, g in enumerate(genes)}
    for name, site, rows, held in (
        ("A", a, np.arange(300), set(genes[:500])),
        ("B", b, np.arange(300, 700), set(genes[300:])),
    ):
        matrix = AlignedMatrix.from_adata(site, schema, X_FIELDS)
        aligned = matrix.rows(np.arange(site.n_obs))
        assert aligned.shape == (site.n_obs, 765)
        assert aligned.dtype == np.float32
        np.testing.assert_array_equal(matrix.measured, [g in held for g in schema.var_names])
        n_missing = 0
        for j, gene in enumerate(schema.var_names):
            if gene in held:
                np.testing.assert_array_equal(
                    aligned[:, j], pbmc.X[rows, column[gene]], err_msg=f"{name}:{gene}"
                )
            else:
                n_missing += 1
                assert not aligned[:, j].any(), f"site {name}: {gene} should be zero-filled"
        assert n_missing == 765 - len(held)


@pytest.mark.parametrize("join", ["left", "union", ""])
def test_build_schema_rejects_unknown_join(pbmc, join):
    with pytest.raises(ValueError, match=f"join must be 'inner' or 'outer', got '{join}'"):
        _schema({"A": pbmc}, join=join)


def test_build_schema_rejects_no_sites():
    with pytest.raises(ValueError, match="No sites given"):
        build_schema({})


def test_duplicate_var_names_raise_naming_the_site(pbmc):
    b = pbmc[350:].copy()
    names = list(b.var_names)
    duplicated = names[3]
    names[40] = duplicated
    b.var_names = names
    with pytest.raises(
        ValueError,
        match=rf"Site 'B': duplicate feature names \({re.escape(duplicated)}.*var_names_make_unique",
    ):
        _schema({"A": pbmc[:350].copy(), "B": b})


def test_no_shared_genes_raise(pbmc):
    a = pbmc[:350].copy()
    b = pbmc[350:].copy()
    b.var_names = [f"ENSG{i:011d}" for i in range(b.n_vars)]  # Ensembl-style IDs vs symbols
    with pytest.raises(ValueError, match=r"share no feature names.*symbols vs Ensembl IDs.*join='outer'"):
        _schema({"A": a, "B": b})
    # the same sites are fine with an outer join
    schema = _schema({"A": a, "B": b}, join="outer")
    assert schema.n_features == 2 * 765


# --------------------------------------------------------------------------------------------------------
# build_schema: labels, covariates and fields


@pytest.mark.parametrize("as_strings", [False, True], ids=["categorical", "strings"])
def test_label_categories_are_the_union_across_sites(pbmc, as_strings):
    myeloid = pbmc.obs[LABEL].isin(["Dendritic", "CD14+ Monocyte"]).to_numpy()
    a, b = pbmc[myeloid].copy(), pbmc[~myeloid].copy()
    if as_strings:
        b.obs[LABEL] = b.obs[LABEL].astype(str)
    # precondition: each site lacks classes the other has
    assert set(a.obs[LABEL].astype(str)) == {"Dendritic", "CD14+ Monocyte"}
    assert len(set(b.obs[LABEL].astype(str))) == 8

    schema = _schema({"A": a, "B": b})
    assert schema.categories == tuple(sorted(pbmc.obs[LABEL].cat.categories))
    assert schema.n_classes == 10
    assert schema.label_key == LABEL
    # every cell gets the code of its own label in the shared categories
    for site in (a, b):
        codes = label_codes(site, schema, "site")
        np.testing.assert_array_equal(
            np.asarray(schema.categories)[codes], site.obs[LABEL].astype(str).to_numpy()
        )


def test_covariate_categories_are_the_union_across_sites(pbmc):
    g1 = (pbmc.obs["phase"] == "G1").to_numpy()
    a, b = pbmc[g1].copy(), pbmc[~g1].copy()
    a.obs["phase"] = a.obs["phase"].cat.set_categories(["S", "G1"])  # S: a category without cells here
    b.obs["phase"] = b.obs["phase"].astype(str)
    descriptions = {
        "A": describe_site(a, "A", X_FIELDS, covariate_keys=("phase", "louvain")),
        "B": describe_site(b, "B", X_FIELDS, covariate_keys=("phase",)),
    }
    assert descriptions["A"]["covariates"]["phase"] == ["S", "G1"]  # a categorical's own categories
    assert descriptions["B"]["covariates"]["phase"] == ["G2M", "S"]  # strings: the values present
    schema = build_schema(descriptions)
    assert schema.covariates == (
        ("phase", ("G1", "G2M", "S")),
        ("louvain", tuple(sorted(a.obs["louvain"].cat.categories))),  # only A publishes it
    )
    assert FederationSchema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema


def test_label_codes_reject_labels_outside_the_schema(pbmc):
    myeloid = pbmc.obs[LABEL].isin(["Dendritic", "CD14+ Monocyte"]).to_numpy()
    a, b = pbmc[myeloid].copy(), pbmc[~myeloid].copy()
    schema = _schema({"A": a})
    with pytest.raises(
        ValueError, match=r"Site 'B': labels \['CD19\+ B', .* are not among the model's categories"
    ):
        label_codes(b, schema, "B")


def test_schema_without_labels_has_no_categories(pbmc):
    schema = _schema({"A": pbmc}, SiteFields())
    assert schema.categories == ()
    assert schema.label_key is None
    with pytest.raises(ValueError, match=r"Site 'A': label column None is missing"):
        label_codes(pbmc, schema, "A")


@pytest.mark.parametrize(
    "other",
    [
        SiteFields(label_key="louvain"),
        SiteFields(label_key=LABEL, layer="counts"),
        SiteFields(label_key=LABEL, use_raw=True),
    ],
    ids=["label_key", "layer", "use_raw"],
)
def test_sites_disagreeing_on_fields_raise(pbmc, other):
    a, b = pbmc[:350].copy(), pbmc[350:].copy()
    b.layers["counts"] = b.X.copy()
    with pytest.raises(ValueError, match=r"Sites disagree on the label column, layer or use_raw: A: .*; B: "):
        _schema({"A": a, "B": b}, {"A": X_FIELDS, "B": other})


def test_nan_labels_raise_naming_the_site(pbmc):
    a, b = pbmc[:350].copy(), pbmc[350:].copy()
    b.obs.loc[b.obs_names[[0, 10, 20]], LABEL] = np.nan
    with pytest.raises(ValueError, match=r"Site 'B': 3 cells have no value in label column 'bulk_labels'"):
        _schema({"A": a, "B": b})
    with pytest.raises(ValueError, match=r"Site 'B': 3 cells have no label in 'bulk_labels'"):
        label_codes(b, _schema({"A": a}), "B")


def test_build_schema_missing_label_column_names_the_site(pbmc):
    a, b = pbmc[:350].copy(), pbmc[350:].copy()
    del b.obs[LABEL]
    with pytest.raises(
        ValueError, match=r"Site 'B': label column 'bulk_labels' is missing from \.obs \(columns: n_genes, "
    ):
        _schema({"A": a, "B": b})


def test_schema_dict_round_trip(pbmc):
    schema = _schema({"A": pbmc}, RAW_FIELDS)
    again = FederationSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
    assert again == schema
    assert again.fields == RAW_FIELDS


# --------------------------------------------------------------------------------------------------------
# site_fields


def test_site_fields_missing_label_column_names_site_and_columns(pbmc):
    with pytest.raises(
        ValueError,
        match=r"Site 'B': label column 'cell_type' is missing from \.obs \(columns: bulk_labels, n_genes, .*louvain\)",
    ):
        site_fields(pbmc, "B", label_key="cell_type")


@pytest.mark.parametrize(("layers", "listed"), [({}, "none"), ({"spliced": None}, r"\['spliced'\]")])
def test_site_fields_missing_layer(pbmc, layers, listed):
    for name in layers:
        pbmc.layers[name] = pbmc.X.copy()
    with pytest.raises(ValueError, match=rf"Site 'A': layer 'counts' not found; its layers are {listed}"):
        site_fields(pbmc, "A", layer="counts")


def test_site_fields_use_raw_without_raw(pbmc):
    pbmc.raw = None
    with pytest.raises(ValueError, match=r"Site 'A': use_raw=True but the AnnData has no \.raw"):
        site_fields(pbmc, "A", use_raw=True)
    # the registration says use_raw=True: the same error without the argument
    with pytest.raises(ValueError, match=r"Site 'A': use_raw=True but the AnnData has no \.raw"):
        site_fields(pbmc, "A")


def test_site_fields_layer_and_use_raw_together(pbmc):
    pbmc.layers["counts"] = pbmc.X.copy()
    with pytest.raises(ValueError, match=r"Site 'A': use either layer='counts' or use_raw=True, not both"):
        site_fields(pbmc, "A", layer="counts", use_raw=True)


def test_site_fields_defaults_registration_and_overrides(pbmc):
    assert site_fields(pbmc, "A") == SiteFields(use_raw=True)  # the fixture's registration
    assert site_fields(_unregistered(pbmc), "A") == SiteFields()
    si.pp.register_site(pbmc, site="A", label_key=LABEL, use_raw=True)
    assert site_fields(pbmc, "A") == RAW_FIELDS
    assert site_fields(pbmc, "A", label_key="louvain", use_raw=False) == SiteFields(label_key="louvain")


def test_site_fields_explicit_layer_or_raw_overrides_the_registered_one(pbmc):
    """Where the values are is one choice: an explicit layer replaces a registered ``use_raw=True``, and
    an explicit ``use_raw=True`` a registered layer (``tl.predict(query, model, layer=...)`` passes only
    the layer)."""
    pbmc.layers["lognorm"] = pbmc.raw.X.copy()
    assert site_fields(pbmc, "A", layer="lognorm") == SiteFields(layer="lognorm")
    si.pp.register_site(pbmc, site="A", label_key=LABEL, layer="lognorm")
    assert site_fields(pbmc, "A", use_raw=True) == RAW_FIELDS
