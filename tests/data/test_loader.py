"""Sparse-aware loading on real PBMCs: check_finite, AlignedMatrix rows (sparse, reordered, layers), the
batch loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse

import scinfl as si
import scinfl.data.loader as loader_module
from helpers import FAST_TASK
from scinfl.data import (
    AlignedMatrix,
    SiteDataset,
    SiteFields,
    SparseRows,
    batch_loader,
    build_schema,
    check_finite,
    describe_site,
    feature_source,
    label_codes,
    site_fields,
    stratified_split,
)

LABEL = "bulk_labels"
RAW_FIELDS = SiteFields(label_key=LABEL, use_raw=True)


def _schema(adata, fields: SiteFields = RAW_FIELDS):
    """The schema of one site, agreed from its description."""
    return build_schema({"A": describe_site(adata, "A", fields)})


def _row_lookup(dense: np.ndarray) -> dict[bytes, int]:
    lookup = {row.tobytes(): i for i, row in enumerate(dense)}
    assert len(lookup) == len(dense), "rows are not unique; cannot trace them back"
    return lookup


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


def test_check_finite_refuses_values_beyond_float32(pbmc):
    matrix = pbmc.X.astype(np.float64)
    matrix[3, 5] = 1e39  # finite as float64, infinite once read as float32
    with pytest.raises(
        ValueError, match=r"Site 'A': the expression matrix holds 1 NaN or infinite values .*float32"
    ):
        check_finite(matrix, "A")
    matrix[3, 5] = 3e38  # still within float32's range
    check_finite(matrix, "A")


def test_site_inputs_check_finite_values_naming_the_site(pbmc):
    schema = _schema(pbmc)
    bad = pbmc.copy()
    bad.raw.X.data[[7, 70]] = np.nan
    with pytest.raises(ValueError, match=r"Site 'lab_3': the expression matrix holds 2 NaN"):
        FAST_TASK.inputs(bad, "lab_3", schema)


# --------------------------------------------------------------------------------------------------------
# AlignedMatrix on sparse data and layers


def test_aligned_matrix_counts_present_features(pbmc):
    genes = list(pbmc.var_names)
    site = pbmc[:, genes[:100]].copy()
    aligned = AlignedMatrix(site.X, site.var_names, (*tuple(genes[50:]), "NOT_A_GENE"))
    assert aligned.n_features == 716
    assert aligned.n_present == 50
    assert aligned.n_obs == 700
    np.testing.assert_array_equal(aligned.measured, [True] * 50 + [False] * 666)
    np.testing.assert_array_equal(aligned.rows(np.array([0, 5]))[:, :50], pbmc.X[[0, 5], 50:100])
    assert not aligned.rows(np.array([0, 5]))[:, 50:].any()


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


@pytest.mark.parametrize("storage", ["csr", "csr64 with duplicates", "csc"])
def test_sparse_rows_densify_to_the_dense_rows(pbmc, storage):
    """SparseRows (a GPU site's batches) hold exactly the values rows() gives, aligned to any schema."""
    matrix = sparse.csr_matrix(pbmc.raw.X)
    if storage == "csr64 with duplicates":  # every entry stored as two halves: toarray() sums them
        full = matrix.astype(np.float64)
        matrix = sparse.csr_matrix(
            (np.repeat(full.data / 2, 2), np.repeat(full.indices, 2), 2 * full.indptr), shape=full.shape
        )
        assert not matrix.has_canonical_format
        assert matrix.nnz == 2 * full.nnz
    elif storage == "csc":
        matrix = matrix.tocsc()
    names = list(pbmc.raw.var_names)
    index = np.array([0, 3, 3, 250, 699])
    for schema_names in (tuple(names), (*names[::-1][:400], "MISSING_GENE")):
        aligned = AlignedMatrix(matrix, pbmc.raw.var_names, schema_names)
        assert aligned.is_sparse
        batch = aligned.sparse_rows(index)
        assert len(batch) == len(index)
        assert batch.crow.dtype == batch.col.dtype == torch.int32
        np.testing.assert_array_equal(batch.dense().numpy(), aligned.rows(index))
        assert batch.values.numel() < 0.5 * batch.dense().numel()  # it crosses at its stored size
    assert aligned.sparse_rows(np.array([], dtype=np.int64)).dense().shape == (0, 401)


def test_dataset_sparse_batches_only_where_the_matrix_is_sparse(pbmc, raw_site):
    matrix, labels, dense = raw_site
    dataset = SiteDataset(matrix, np.arange(700), labels, sparse_batches=True)
    x, y = dataset[np.array([9, 2])]
    assert isinstance(x, SparseRows)
    np.testing.assert_array_equal(x.dense().numpy(), dense[[2, 9]])
    np.testing.assert_array_equal(y.numpy(), labels[[2, 9]])
    assert isinstance(dataset.with_sparse_batches(False)[np.array([2])][0], torch.Tensor)
    on_dense = AlignedMatrix(pbmc.X, pbmc.var_names, tuple(pbmc.var_names))
    assert not on_dense.is_sparse
    assert isinstance(
        SiteDataset(on_dense, np.arange(700), sparse_batches=True)[np.array([2])][0], torch.Tensor
    )


def test_rows_from_adata_use_raw_never_densifies(pbmc, raw_csr):
    _, dense = raw_csr
    schema = _schema(pbmc)
    index = np.arange(10, 200, 3)
    # the matrix of the schema's fields, and a task's inputs (checked for finite values, read from the
    # registration's .raw as in training)
    for aligned in (AlignedMatrix.from_adata(pbmc, schema), FAST_TASK.inputs(pbmc, "A", schema)):
        assert aligned.matrix is pbmc.raw.X  # the patched object: densifying it would raise
        assert aligned.measured.all()
        np.testing.assert_array_equal(aligned.rows(index), dense[index])


def test_layer_support(pbmc):
    assert list(pbmc.raw.var_names) == list(pbmc.var_names)  # precondition for putting .raw.X in a layer
    pbmc.layers["lognorm"] = pbmc.raw.X.copy()
    si.pp.register_site(pbmc, site="A", label_key=LABEL, layer="lognorm")
    fields = site_fields(pbmc, "A")
    assert fields == SiteFields(label_key=LABEL, layer="lognorm")
    matrix, _names = feature_source(pbmc, fields)
    assert matrix is pbmc.layers["lognorm"]
    schema = _schema(pbmc, fields)
    assert schema.layer == "lognorm"
    index = np.array([0, 17, 333, 699])
    for aligned in (AlignedMatrix.from_adata(pbmc, schema), FAST_TASK.inputs(pbmc, "A", schema)):
        rows = aligned.rows(index)
        np.testing.assert_array_equal(rows, pbmc.raw.X.toarray()[index])
        assert not np.array_equal(rows, pbmc.X[index])  # really read from the layer, not .X


# --------------------------------------------------------------------------------------------------------
# SiteDataset + batch_loader


@pytest.fixture
def raw_site(pbmc):
    schema = _schema(pbmc)
    matrix = AlignedMatrix.from_adata(pbmc, schema)
    labels = label_codes(pbmc, schema, "A")
    np.testing.assert_array_equal(FAST_TASK.labels(pbmc, "A", schema), labels)
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
