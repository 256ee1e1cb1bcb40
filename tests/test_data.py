"""scinfl.data (schema, sparse-aware loading, splits) and the site helpers of scinfl.pp, on real PBMCs."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scinfl as si
import scinfl.data.loader as loader_module
from scinfl.data import (
    AlignedMatrix,
    SiteDataset,
    SiteFields,
    batch_loader,
    build_schema,
    check_finite,
    dirichlet_partition,
    feature_source,
    label_codes,
    site_fields,
    stratified_split,
)

LABEL = "bulk_labels"
X_FIELDS = SiteFields(label_key=LABEL)
RAW_FIELDS = SiteFields(label_key=LABEL, use_raw=True)


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


def _row_lookup(dense: np.ndarray) -> dict[bytes, int]:
    lookup = {row.tobytes(): i for i, row in enumerate(dense)}
    assert len(lookup) == len(dense), "rows are not unique; cannot trace them back"
    return lookup


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
        schema = build_schema({"A": a, "B": b}, {"A": X_FIELDS, "B": X_FIELDS}, join="inner")

    expected = [g for g in genes[5:] if g not in renamed]
    assert schema.var_names == tuple(expected)
    assert schema.n_features == 757
    assert schema.join == "inner"


def test_inner_join_of_identical_genes_does_not_warn(pbmc):
    a, b = pbmc[:350].copy(), pbmc[350:].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = build_schema({"A": a, "B": b}, {"A": X_FIELDS, "B": X_FIELDS})
    assert schema.var_names == tuple(pbmc.var_names)


def test_outer_join_keeps_all_genes_and_zero_fills(pbmc):
    genes = list(pbmc.var_names)
    a = pbmc[:300, genes[:500]].copy()
    b = pbmc[300:, genes[300:][::-1]].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = build_schema({"A": a, "B": b}, {"A": X_FIELDS, "B": X_FIELDS}, join="outer")
    # A's genes in A's order, then the genes only B holds in B's order
    assert schema.var_names == tuple(genes[:500] + genes[500:][::-1])
    assert schema.join == "outer"

    column = {g: j for j, g in enumerate(genes)}
    for name, site, rows, held in (
        ("A", a, np.arange(300), set(genes[:500])),
        ("B", b, np.arange(300, 700), set(genes[300:])),
    ):
        aligned = AlignedMatrix.from_adata(site, schema, X_FIELDS).rows(np.arange(site.n_obs))
        assert aligned.shape == (site.n_obs, 765)
        assert aligned.dtype == np.float32
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


def test_aligned_matrix_counts_present_features(pbmc):
    genes = list(pbmc.var_names)
    site = pbmc[:, genes[:100]].copy()
    aligned = AlignedMatrix(site.X, site.var_names, (*tuple(genes[50:]), "NOT_A_GENE"))
    assert aligned.n_features == 716
    assert aligned.n_present == 50
    assert aligned.n_obs == 700
    np.testing.assert_array_equal(aligned.rows(np.array([0, 5]))[:, :50], pbmc.X[[0, 5], 50:100])
    assert not aligned.rows(np.array([0, 5]))[:, 50:].any()


@pytest.mark.parametrize("join", ["left", "union", ""])
def test_build_schema_rejects_unknown_join(pbmc, join):
    with pytest.raises(ValueError, match=f"join must be 'inner' or 'outer', got '{join}'"):
        build_schema({"A": pbmc}, {"A": X_FIELDS}, join=join)


def test_build_schema_rejects_no_sites():
    with pytest.raises(ValueError, match="No sites given"):
        build_schema({}, {})


def test_duplicate_var_names_raise_naming_the_site(pbmc):
    a = pbmc[:350].copy()
    b = pbmc[350:].copy()
    names = list(b.var_names)
    duplicated = names[3]
    names[40] = duplicated
    b.var_names = names
    with pytest.raises(
        ValueError,
        match=rf"Site 'B': duplicate feature names \({re.escape(duplicated)}.*var_names_make_unique",
    ):
        build_schema({"A": a, "B": b}, {"A": X_FIELDS, "B": X_FIELDS})


def test_no_shared_genes_raise(pbmc):
    a = pbmc[:350].copy()
    b = pbmc[350:].copy()
    b.var_names = [f"ENSG{i:011d}" for i in range(b.n_vars)]  # Ensembl-style IDs vs symbols
    with pytest.raises(ValueError, match=r"share no feature names.*symbols vs Ensembl IDs.*join='outer'"):
        build_schema({"A": a, "B": b}, {"A": X_FIELDS, "B": X_FIELDS})
    # the same sites are fine with an outer join
    schema = build_schema({"A": a, "B": b}, {"A": X_FIELDS, "B": X_FIELDS}, join="outer")
    assert schema.n_features == 2 * 765


# --------------------------------------------------------------------------------------------------------
# build_schema: labels and fields


@pytest.mark.parametrize("as_strings", [False, True], ids=["categorical", "strings"])
def test_label_categories_are_the_union_across_sites(pbmc, as_strings):
    myeloid = pbmc.obs[LABEL].isin(["Dendritic", "CD14+ Monocyte"]).to_numpy()
    a, b = pbmc[myeloid].copy(), pbmc[~myeloid].copy()
    if as_strings:
        b.obs[LABEL] = b.obs[LABEL].astype(str)
    # precondition: each site lacks classes the other has
    assert set(a.obs[LABEL].astype(str)) == {"Dendritic", "CD14+ Monocyte"}
    assert len(set(b.obs[LABEL].astype(str))) == 8

    schema = build_schema({"A": a, "B": b}, {"A": X_FIELDS, "B": X_FIELDS})
    assert schema.categories == tuple(sorted(pbmc.obs[LABEL].cat.categories))
    assert schema.n_classes == 10
    assert schema.label_key == LABEL
    # every cell gets the code of its own label in the shared categories
    for site in (a, b):
        codes = label_codes(site, schema, "site")
        np.testing.assert_array_equal(
            np.asarray(schema.categories)[codes], site.obs[LABEL].astype(str).to_numpy()
        )


def test_label_codes_reject_labels_outside_the_schema(pbmc):
    myeloid = pbmc.obs[LABEL].isin(["Dendritic", "CD14+ Monocyte"]).to_numpy()
    a, b = pbmc[myeloid].copy(), pbmc[~myeloid].copy()
    schema = build_schema({"A": a}, {"A": X_FIELDS})
    with pytest.raises(
        ValueError, match=r"Site 'B': labels \['CD19\+ B', .* are not among the model's categories"
    ):
        label_codes(b, schema, "B")


def test_schema_without_labels_has_no_categories(pbmc):
    schema = build_schema({"A": pbmc}, {"A": SiteFields()})
    assert schema.categories == ()
    assert schema.label_key is None


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
        build_schema({"A": a, "B": b}, {"A": X_FIELDS, "B": other})


def test_nan_labels_raise_naming_the_site(pbmc):
    a, b = pbmc[:350].copy(), pbmc[350:].copy()
    b.obs.loc[b.obs_names[[0, 10, 20]], LABEL] = np.nan
    with pytest.raises(ValueError, match=r"Site 'B': 3 cells have no value in label column 'bulk_labels'"):
        build_schema({"A": a, "B": b}, {"A": X_FIELDS, "B": X_FIELDS})
    with pytest.raises(ValueError, match=r"Site 'B': 3 cells have no label in 'bulk_labels'"):
        label_codes(b, build_schema({"A": a}, {"A": X_FIELDS}), "B")


def test_build_schema_missing_label_column_names_the_site(pbmc):
    a, b = pbmc[:350].copy(), pbmc[350:].copy()
    del b.obs[LABEL]
    with pytest.raises(ValueError, match=r"Site 'B': label column 'bulk_labels' is missing"):
        build_schema({"A": a, "B": b}, {"A": X_FIELDS, "B": X_FIELDS})


def test_schema_dict_round_trip(pbmc):
    schema = build_schema({"A": pbmc}, {"A": RAW_FIELDS})
    again = type(schema).from_dict(schema.to_dict())
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


def test_site_fields_layer_and_use_raw_together(pbmc):
    pbmc.layers["counts"] = pbmc.X.copy()
    with pytest.raises(ValueError, match=r"Site 'A': use either layer='counts' or use_raw=True, not both"):
        site_fields(pbmc, "A", layer="counts", use_raw=True)


def test_site_fields_defaults_registration_and_overrides(pbmc):
    assert site_fields(pbmc, "A") == SiteFields()
    si.pp.register_site(pbmc, site="A", label_key=LABEL, use_raw=True)
    assert site_fields(pbmc, "A") == RAW_FIELDS
    assert site_fields(pbmc, "A", label_key="louvain", use_raw=False) == SiteFields(label_key="louvain")


# --------------------------------------------------------------------------------------------------------
# check_finite


def _with_bad_values(pbmc, kind: str, value: float):
    if kind == "csr":
        matrix = pbmc.raw.X.copy()
        assert sparse.isspmatrix_csr(matrix) or isinstance(matrix, sparse.csr_array)
        matrix.data[[0, matrix.nnz // 2]] = value
    else:
        matrix = pbmc.X.copy()
        matrix[[0, 699], [0, 764]] = value
    return matrix


@pytest.mark.parametrize("kind", ["csr", "dense"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_check_finite_raises_naming_the_site(pbmc, kind, value):
    matrix = _with_bad_values(pbmc, kind, value)
    with pytest.raises(
        ValueError, match=r"Site 'lab_3': the expression matrix holds 2 NaN or infinite values"
    ):
        check_finite(matrix, "lab_3")


@pytest.mark.parametrize("kind", ["csr", "dense"])
def test_check_finite_accepts_clean_data(pbmc, kind):
    check_finite(pbmc.raw.X if kind == "csr" else pbmc.X, "A")  # must not raise on real, finite data


def test_check_finite_scans_every_chunk(pbmc, monkeypatch):
    monkeypatch.setattr(loader_module, "_FINITE_CHECK_ROWS", 64)
    matrix = pbmc.X.copy()
    matrix[699, 3] = np.nan  # in the last, partial chunk
    matrix[64, 0] = np.inf  # first row of the second chunk
    with pytest.raises(ValueError, match=r"Site 'A': .* holds 2 NaN"):
        check_finite(matrix, "A")


# --------------------------------------------------------------------------------------------------------
# AlignedMatrix on sparse data and layers


@pytest.fixture
def raw_csr(pbmc, monkeypatch):
    """pbmc's sparse .raw.X, made to fail if anything densifies the whole matrix."""
    matrix = pbmc.raw.X
    assert sparse.issparse(matrix)
    dense = matrix.toarray()

    def refuse(*args, **kwargs):
        raise AssertionError("the whole sparse matrix was densified")

    for name in ("toarray", "todense"):
        monkeypatch.setattr(matrix, name, refuse, raising=False)
    return matrix, dense


@pytest.mark.parametrize(
    "index",
    [np.arange(0, 700, 7), np.array([699, 3, 250, 0, 42]), np.array([5]), np.arange(700)],
    ids=["sorted", "unsorted", "one", "all"],
)
def test_rows_on_sparse_raw_match_dense_rows(pbmc, raw_csr, index):
    matrix, dense = raw_csr
    aligned = AlignedMatrix(matrix, pbmc.raw.var_names, tuple(pbmc.raw.var_names))
    out = aligned.rows(index)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, dense[index])


def test_rows_on_sparse_raw_with_reordered_schema(pbmc, raw_csr):
    matrix, dense = raw_csr
    names = list(pbmc.raw.var_names)
    schema_names = (*names[::-1], "MISSING_GENE")
    aligned = AlignedMatrix(matrix, pbmc.raw.var_names, schema_names)
    index = np.array([1, 100, 400, 650])
    out = aligned.rows(index)
    np.testing.assert_array_equal(out[:, :-1], dense[index][:, ::-1])
    assert not out[:, -1].any()


def test_rows_from_adata_use_raw_never_densifies(pbmc, raw_csr):
    _, dense = raw_csr
    schema = build_schema({"A": pbmc}, {"A": RAW_FIELDS})
    aligned = AlignedMatrix.from_adata(pbmc, schema)
    assert aligned.matrix is pbmc.raw.X  # the patched object: densifying it would raise
    index = np.arange(10, 200, 3)
    np.testing.assert_array_equal(aligned.rows(index), dense[index])


def test_layer_support(pbmc):
    assert list(pbmc.raw.var_names) == list(pbmc.var_names)  # precondition for putting .raw.X in a layer
    pbmc.layers["lognorm"] = pbmc.raw.X.copy()
    fields = site_fields(pbmc, "A", label_key=LABEL, layer="lognorm")
    assert fields == SiteFields(label_key=LABEL, layer="lognorm")
    matrix, _names = feature_source(pbmc, fields)
    assert matrix is pbmc.layers["lognorm"]
    schema = build_schema({"A": pbmc}, {"A": fields})
    assert schema.layer == "lognorm"
    index = np.array([0, 17, 333, 699])
    rows = AlignedMatrix.from_adata(pbmc, schema).rows(index)
    np.testing.assert_array_equal(rows, pbmc.raw.X.toarray()[index])
    assert not np.array_equal(rows, pbmc.X[index])  # really read from the layer, not .X


# --------------------------------------------------------------------------------------------------------
# SiteDataset + batch_loader


@pytest.fixture
def raw_site(pbmc):
    schema = build_schema({"A": pbmc}, {"A": RAW_FIELDS})
    matrix = AlignedMatrix.from_adata(pbmc, schema)
    labels = label_codes(pbmc, schema, "A")
    dense = pbmc.raw.X.toarray()
    return matrix, labels, dense


def _epoch(loader, lookup):
    """Cell indices (traced back through the expression rows) and labels of every batch of one epoch."""
    batches = []
    for x, y in loader:
        rows = [lookup[r.tobytes()] for r in x.numpy()]
        batches.append((np.array(rows), y.numpy()))
    return batches


@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_yields_every_cell_once_with_its_label(raw_site, shuffle):
    matrix, labels, dense = raw_site
    lookup = _row_lookup(dense)
    indices, _ = stratified_split(labels, 0.25, np.random.default_rng(0))
    dataset = SiteDataset(matrix, indices, labels)
    assert len(dataset) == len(indices)

    loader = batch_loader(dataset, batch_size=64, shuffle=shuffle, seed=3)
    epochs = []
    for _ in range(2):
        batches = _epoch(loader, lookup)
        seen = np.concatenate([rows for rows, _ in batches])
        epochs.append(seen)
        assert len(seen) == len(indices)
        np.testing.assert_array_equal(np.sort(seen), indices)
        for rows, y in batches:
            np.testing.assert_array_equal(y, labels[rows])
        assert [len(rows) for rows, _ in batches[:-1]] == [64] * (len(batches) - 1)
        if not shuffle:
            np.testing.assert_array_equal(seen, indices)
    # a shuffled loader draws a new order every epoch
    assert np.array_equal(epochs[0], epochs[1]) != shuffle


def test_loader_is_deterministic_per_seed(raw_site):
    matrix, labels, dense = raw_site
    lookup = _row_lookup(dense)
    dataset = SiteDataset(matrix, np.arange(700), labels)

    def order(seed):
        return [
            frozenset(rows.tolist())
            for rows, _ in _epoch(batch_loader(dataset, batch_size=50, shuffle=True, seed=seed), lookup)
        ]

    assert order(0) == order(0)
    assert order(0) != order(1)
    sequential = [frozenset(range(i, i + 50)) for i in range(0, 700, 50)]
    assert order(0) != sequential


def test_loader_without_labels(raw_site):
    matrix, _, dense = raw_site
    x, y = next(iter(batch_loader(SiteDataset(matrix, np.arange(10, 20)), batch_size=4, shuffle=False)))
    np.testing.assert_array_equal(x.numpy(), dense[10:14])
    assert y.numel() == 0


@pytest.mark.parametrize(
    ("n_cells", "drop_singleton", "sizes"),
    [
        (129, True, [64, 64]),
        (129, False, [64, 64, 1]),
        (130, True, [64, 64, 2]),
        (128, True, [64, 64]),
    ],
)
def test_drop_singleton(raw_site, n_cells, drop_singleton, sizes):
    matrix, labels, _ = raw_site
    dataset = SiteDataset(matrix, np.arange(n_cells), labels)
    for shuffle in (False, True):
        loader = batch_loader(dataset, batch_size=64, shuffle=shuffle, seed=0, drop_singleton=drop_singleton)
        assert [len(y) for _, y in loader] == sizes


# --------------------------------------------------------------------------------------------------------
# stratified_split


def _hand_labels():
    labels = np.array(["a"] * 50 + ["b"] * 20 + ["c"] * 1 + ["d"] * 2 + ["e"] * 7)
    return np.random.default_rng(42).permutation(labels)


def _check_partition(kept, held, n):
    assert len(np.intersect1d(kept, held)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(n))
    assert np.all(np.diff(kept) > 0)
    assert np.all(np.diff(held) > 0)


def test_stratified_split_hand_counts():
    labels = _hand_labels()
    kept, held = stratified_split(labels, 0.2, np.random.default_rng(0))
    _check_partition(kept, held, len(labels))
    counts = pd.Series(labels[held]).value_counts().to_dict()
    # round(0.2 n), at least one, never the whole class; the singleton class is never held out
    assert counts == {"a": 10, "b": 4, "d": 1, "e": 1}
    assert np.flatnonzero(labels == "c")[0] in kept


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_stratified_split_on_pbmc_labels(pbmc, fraction):
    labels = pbmc.obs[LABEL].astype(str).to_numpy()
    kept, held = stratified_split(labels, fraction, np.random.default_rng(1))
    _check_partition(kept, held, len(labels))
    for cls in np.unique(labels):
        n = int((labels == cls).sum())
        n_held = int((labels[held] == cls).sum())
        assert abs(n_held - fraction * n) <= 1, cls
        assert (labels[kept] == cls).sum() >= 1, cls


def test_stratified_split_is_reproducible_and_seed_dependent(pbmc):
    labels = pbmc.obs[LABEL].astype(str).to_numpy()
    a = stratified_split(labels, 0.2, np.random.default_rng(7))
    b = stratified_split(labels, 0.2, np.random.default_rng(7))
    c = stratified_split(labels, 0.2, np.random.default_rng(8))
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_stratified_split_zero_fraction_holds_nothing():
    labels = _hand_labels()
    kept, held = stratified_split(labels, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(kept, np.arange(len(labels)))
    assert held.size == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"held-out fraction must be in \[0, 1\)"):
        stratified_split(_hand_labels(), fraction, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------------
# dirichlet_partition


def _ten_classes():
    return np.repeat(np.arange(10), 60)


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_partition_covers_every_cell_once(alpha):
    labels = _ten_classes()
    parts = dirichlet_partition(labels, 4, alpha, np.random.default_rng(0))
    assert len(parts) == 4
    everything = np.concatenate(parts)
    assert len(everything) == len(labels)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_dirichlet_partition_respects_min_size():
    labels = _ten_classes()
    for seed in range(5):
        parts = dirichlet_partition(labels, 5, 0.05, np.random.default_rng(seed), min_size=40)
        assert min(len(p) for p in parts) >= 40


def _skew(alpha: float) -> float:
    labels = _ten_classes()
    shares = []
    for seed in range(5):
        for part in dirichlet_partition(labels, 4, alpha, np.random.default_rng(seed)):
            shares.append(np.bincount(labels[part], minlength=10).max() / len(part))
    return float(np.mean(shares))


def test_dirichlet_partition_skew_follows_alpha():
    skewed, even = _skew(0.1), _skew(100.0)
    assert skewed > 0.3
    assert even < 0.15  # 10 balanced classes: an even split gives a max share near 0.1
    assert skewed > 2 * even


@pytest.mark.parametrize(
    ("labels", "n_parts", "alpha", "min_size", "message"),
    [
        (np.repeat(np.arange(3), 10), 0, 1.0, 2, "n_sites must be at least 1, got 0"),
        (np.repeat(np.arange(3), 10), 3, 0.0, 2, "alpha must be positive, got 0.0"),
        (np.repeat(np.arange(3), 10), 3, -1.0, 2, "alpha must be positive"),
        (np.repeat(np.arange(3), 10), 4, 1.0, 8, "30 cells cannot make 4 sites of at least 8 cells"),
        (
            np.zeros(60, dtype=int),
            3,
            0.001,
            2,
            "Could not draw 3 label-skewed sites of at least 2 cells with alpha=0.001",
        ),
    ],
)
def test_dirichlet_partition_rejects_impossible_requests(labels, n_parts, alpha, min_size, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dirichlet_partition(labels, n_parts, alpha, np.random.default_rng(0), min_size=min_size)


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
    all_names = np.concatenate([s.obs_names.to_numpy() for s in sites.values()])
    assert len(all_names) == pbmc.n_obs
    assert set(all_names) == set(pbmc.obs_names)
    # the sites are new objects: editing one leaves the input alone
    sites["G1"].X[:] = 0
    sites["G1"].obs["phase"] = "edited"
    sites["G1"].uns["bulk_labels_colors"][0] = "#000000"
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
    assert "scinfl" not in pbmc.uns


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
