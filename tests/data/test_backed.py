"""Backed sites: h5ad files opened with ``backed="r"`` train like the same data in memory, read batch by batch.

Files are written from real PBMCs (pbmc68k_reduced) into ``tmp_path``: sparse and dense ``.X``, a layer,
float32, float64 and integer counts. Each file holds its site's registration (``pp.register_site``): where
its values are travels with the data.
"""

from __future__ import annotations

import hashlib
import os

import anndata as ad
import h5py
import numpy as np
import pytest
import torch
from scipy import sparse

import scinfl as si
from scinfl.data import AlignedMatrix, build_schema, check_finite, describe_site, site_fields
from scinfl.data import loader as loader_module
from scinfl.data.loader import _BackedRows, _DiskRuns

LABEL = "bulk_labels"
TINY = {
    "task": si.tasks.Classification(label_key=LABEL, hidden=32),
    "rounds": 2,
    "seed": 0,
    "secure_aggregation": {"min_cohort": 2},
}


def _counts(pbmc) -> sparse.csr_matrix:
    """Integer counts-like values: the log-normalised ``.raw`` values undone and rounded."""
    raw = sparse.csr_matrix(pbmc.raw.X, dtype=np.float32)
    counts = raw.copy()
    counts.data = np.rint(np.expm1(raw.data))
    counts.eliminate_zeros()
    return counts.astype(np.int32)


def _variant(pbmc, kind: str) -> tuple[ad.AnnData, dict]:
    """An AnnData of one storage kind, registered with the fields that read its features (also returned)."""
    adata, fields = _storage(pbmc, kind)
    si.pp.register_site(adata, **fields)
    return adata, fields


def _storage(pbmc, kind: str) -> tuple[ad.AnnData, dict]:
    raw = sparse.csr_matrix(pbmc.raw.X, dtype=np.float32)
    obs = pbmc.obs[[LABEL]].copy()
    var = pbmc.raw.var[[]].copy()
    if kind == "csr32":
        return ad.AnnData(raw, obs=obs, var=var), {}
    if kind == "csr64":
        return ad.AnnData(raw.astype(np.float64), obs=obs, var=var), {}
    if kind == "dense32":
        return ad.AnnData(raw.toarray(), obs=obs, var=var), {}
    if kind == "dense64":
        return ad.AnnData(raw.toarray().astype(np.float64), obs=obs, var=var), {}
    if kind == "int_counts":
        return ad.AnnData(_counts(pbmc), obs=obs, var=var), {}
    if kind == "layer":  # .X holds other values: the layer must be what is read
        adata = ad.AnnData(np.asarray(pbmc.X, dtype=np.float32), obs=obs, var=var)
        adata.layers["counts"] = _counts(pbmc)
        return adata, {"layer": "counts"}
    if kind == "raw":
        adata = pbmc.copy()
        adata.obs = obs
        return adata, {"use_raw": True}
    raise AssertionError(kind)


KINDS = ["csr32", "csr64", "dense32", "dense64", "int_counts", "layer", "raw"]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_sites(pbmc, kind: str, directory) -> tuple[list, dict]:
    """Two sites of one storage kind written to h5ad files (with the registration they inherit), and the
    fields registered."""
    adata, fields = _variant(pbmc, kind)
    parts = si.pp.split_sites(adata, n_sites=2, label_key=LABEL, alpha=1.0, seed=0)
    paths = []
    for name, part in parts.items():
        path = directory / f"{kind}_{name}.h5ad"
        part.write_h5ad(path)
        paths.append(path)
    return paths, fields


def _state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.network.state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
def test_backed_training_is_identical_to_in_memory(pbmc, tmp_path, kind):
    paths, fields = _write_sites(pbmc, kind, tmp_path)
    digests = [_sha256(p) for p in paths]
    key = si.FederationKey(hashlib.sha256(b"backed test key").digest())  # the default (hardened) scheme

    in_memory = {p.stem: ad.read_h5ad(p) for p in paths}
    backed = {p.stem: ad.read_h5ad(p, backed="r") for p in paths}
    expected = "dense" if kind.startswith("dense") else "sparse"
    for adata in backed.values():
        fields_read = site_fields(adata, "s")  # the registration, read back from the file
        assert fields_read == si.data.SiteFields(**fields)
        matrix = si.data.feature_source(adata, fields_read)[0]
        if kind == "layer":  # anndata 0.12's backed mode loads layers into memory when it opens the file
            assert sparse.issparse(matrix) or isinstance(matrix, ad.abc.CSRDataset)
        elif expected == "sparse":
            assert isinstance(matrix, ad.abc.CSRDataset)
        else:
            assert isinstance(matrix, h5py.Dataset)

    model_memory = si.tl.train_federated(in_memory, key=key, **TINY)
    model_backed = si.tl.train_federated(backed, key=key, **TINY)
    assert model_memory.schema.layer == fields.get("layer")
    assert model_memory.schema.use_raw == fields.get("use_raw", False)

    state_memory, state_backed = _state(model_memory), _state(model_backed)
    assert state_memory.keys() == state_backed.keys()
    for name in state_memory:
        assert torch.equal(state_memory[name], state_backed[name]), name
    for name in in_memory:
        for column in ("scinfl_probabilities", "X_scinfl"):
            np.testing.assert_array_equal(backed[name].obsm[column], in_memory[name].obsm[column])
        assert (backed[name].obs["scinfl_prediction"] == in_memory[name].obs["scinfl_prediction"]).all()
    for adata in backed.values():
        adata.file.close()
    assert [_sha256(p) for p in paths] == digests  # the user's files are untouched


def test_backed_keyed_infl_and_plain_are_identical_to_in_memory(pbmc, tmp_path, key):
    paths, _ = _write_sites(pbmc, "csr32", tmp_path)
    for run_key in (key, None):
        in_memory = {p.stem: ad.read_h5ad(p) for p in paths}
        backed = {p.stem: ad.read_h5ad(p, backed="r") for p in paths}
        a = _state(si.tl.train_federated(in_memory, key=run_key, **TINY))
        b = _state(si.tl.train_federated(backed, key=run_key, **TINY))
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_backed_training_reads_batches_not_the_matrix(pbmc, tmp_path, monkeypatch):
    """Training and prediction never load the whole matrix: no anndata to_memory, and every read is a batch."""
    paths, _ = _write_sites(pbmc, "csr32", tmp_path)
    backed = {p.stem: ad.read_h5ad(p, backed="r") for p in paths}

    def refuse(*args, **kwargs):
        raise AssertionError("the backed matrix was read whole or through anndata's indexing")

    from anndata._core.sparse_dataset import BaseCompressedSparseDataset

    monkeypatch.setattr(BaseCompressedSparseDataset, "to_memory", refuse)
    monkeypatch.setattr(BaseCompressedSparseDataset, "__getitem__", refuse)
    monkeypatch.setattr(loader_module, "_FINITE_CHECK_ELEMENTS", 1000)
    reads: list[tuple[np.ndarray, np.ndarray]] = []
    original = _DiskRuns.read

    def spy(self, starts, stops):
        reads.append((starts.copy(), stops.copy()))
        return original(self, starts, stops)

    monkeypatch.setattr(_DiskRuns, "read", spy)
    model = si.tl.train_federated(backed, key=None, **TINY)
    assert reads
    for starts, stops in reads:
        assert (starts[1:] >= stops[:-1]).all()  # sorted, disjoint runs
    biggest = max(int(np.sum(stops - starts)) for starts, stops in reads)
    indptr = np.diff(backed[paths[0].stem].X.group["indptr"][...])
    assert biggest <= 1024 * indptr.max()  # at most one prediction batch of 1024 cells

    reads.clear()
    query = ad.read_h5ad(paths[0], backed="r")
    si.tl.predict(query, model, key=None, batch_size=50)
    n_rows = np.diff(query.X.group["indptr"][...])
    assert max(int(np.sum(stops - starts)) for starts, stops in reads) <= 50 * n_rows.max()
    assert query.obsm["X_scinfl"].shape[0] == query.n_obs


@pytest.mark.parametrize("kind", ["csr32", "dense32", "int_counts"])
@pytest.mark.parametrize("compression", [None, "gzip"])
def test_backed_rows_match_in_memory_rows(pbmc, tmp_path, kind, compression):
    adata, _ = _variant(pbmc, kind)
    path = tmp_path / "site.h5ad"
    adata.write_h5ad(path, compression=compression)
    backed = ad.read_h5ad(path, backed="r")
    assert _BackedRows(backed.X).fast is (compression is None)  # compressed data: read through h5py
    names = tuple(adata.var_names)
    schemas = {"same": names, "reordered": (*names[::-1][:500], "NOT_A_GENE")}
    rng = np.random.default_rng(0)
    for schema_names in schemas.values():
        on_disk = AlignedMatrix(backed.X, backed.var_names, schema_names)
        in_memory = AlignedMatrix(adata.X, adata.var_names, schema_names)
        for index in (
            np.sort(rng.choice(adata.n_obs, 128, replace=False)),
            np.arange(adata.n_obs),
            np.array([699, 3, 3, 250, 0]),  # unsorted, with a repeat
            np.array([], dtype=np.int64),
        ):
            out = on_disk.rows(index)
            assert out.dtype == np.float32
            np.testing.assert_array_equal(out, in_memory.rows(index))
            if on_disk.is_sparse:  # the batches a GPU site reads: CSR parts, densified on the device
                for aligned in (on_disk, in_memory):
                    np.testing.assert_array_equal(aligned.sparse_rows(index).dense().numpy(), out)
            else:
                with pytest.raises(TypeError, match="sparse_rows needs a sparse matrix"):
                    on_disk.sparse_rows(index)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_backed_csr_reads_across_small_chunks(pbmc, tmp_path, chunk):
    """Runs that cross the chunks of the data and indices datasets are split and reassembled exactly."""
    matrix = sparse.csr_matrix(pbmc.raw.X, dtype=np.float32)
    path = tmp_path / "chunked.h5"
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "X", matrix, dataset_kwargs={"chunks": (chunk,)})
    with h5py.File(path, "r") as f:
        stored = ad.io.sparse_dataset(f["X"])
        assert f["X/data"].chunks == (chunk,)
        rows = _BackedRows(stored)
        assert rows.fast
        rng = np.random.default_rng(chunk)
        for index in (np.arange(700), np.sort(rng.choice(700, 200, replace=False)), np.array([5, 6, 7, 699])):
            block = rows[index]
            assert sparse.issparse(block)
            np.testing.assert_array_equal(block.toarray(), matrix[index].toarray())


def test_backed_file_open_for_writing_is_read_through_h5py(pbmc, tmp_path):
    adata, _ = _variant(pbmc, "csr32")
    path = tmp_path / "site.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r+")
    rows = _BackedRows(backed.X)
    assert not rows.fast  # HDF5 may hold unflushed writes: no reads behind its back
    index = np.arange(0, 700, 9)
    np.testing.assert_array_equal(rows[index].toarray(), adata.X[index].toarray())
    backed.file.close()


def test_backed_file_changed_during_reading_raises(pbmc, tmp_path):
    adata, _ = _variant(pbmc, "dense32")
    path = tmp_path / "site.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    aligned = AlignedMatrix(backed.X, backed.var_names, tuple(adata.var_names))
    aligned.rows(np.arange(10))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(RuntimeError, match="changed on disk"):
        aligned.rows(np.arange(10))


@pytest.mark.parametrize("kind", ["csr32", "dense32", "csr64"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_in_backed_file_raises_naming_the_site(pbmc, tmp_path, kind, value):
    adata, _ = _variant(pbmc, kind)
    if sparse.issparse(adata.X):
        adata.X.data[[5, adata.X.nnz - 1]] = value  # the last value: in the last chunk of the scan
    else:
        adata.X[[5, 699], [0, 764]] = value
    parts = si.pp.split_sites(adata, n_sites=2, label_key=LABEL, alpha=1.0, seed=0)
    backed = {}
    for name, part in parts.items():
        part.write_h5ad(tmp_path / f"{name}.h5ad")
        backed[name] = ad.read_h5ad(tmp_path / f"{name}.h5ad", backed="r")
    bad = [
        name
        for name, part in parts.items()
        if not np.isfinite(part.X.data if sparse.issparse(part.X) else part.X).all()
    ]
    with pytest.raises(ValueError, match=rf"Site '{bad[0]}': the expression matrix holds \d NaN or infinite"):
        si.tl.train_federated(backed, key=None, **TINY)


def test_check_finite_scans_a_backed_csr_in_chunks(pbmc, tmp_path, monkeypatch):
    adata, _ = _variant(pbmc, "csr32")
    adata.X.data[[0, 1000, adata.X.nnz - 1]] = np.nan
    adata.write_h5ad(tmp_path / "site.h5ad")
    backed = ad.read_h5ad(tmp_path / "site.h5ad", backed="r")
    monkeypatch.setattr(loader_module, "_FINITE_CHECK_ELEMENTS", 999)  # chunk edges fall anywhere
    with pytest.raises(ValueError, match=r"Site 'A': the expression matrix holds 3 NaN"):
        check_finite(backed.X, "A")


def test_backed_csc_is_refused_naming_the_site(pbmc, tmp_path):
    adata, _ = _variant(pbmc, "csr32")
    adata.X = adata.X.tocsc()
    parts = si.pp.split_sites(adata, n_sites=2, label_key=LABEL, alpha=1.0, seed=0)
    backed = {}
    for name, part in parts.items():
        part.write_h5ad(tmp_path / f"{name}.h5ad")
        backed[name] = ad.read_h5ad(tmp_path / f"{name}.h5ad", backed="r")
    first = next(iter(backed))
    with pytest.raises(TypeError, match=rf"Site '{first}': the expression matrix is a backed CSC matrix"):
        si.tl.train_federated(backed, key=None, **TINY)
    with pytest.raises(TypeError, match="backed CSC matrix"):
        AlignedMatrix(backed[first].X, backed[first].var_names, tuple(adata.var_names))
    schema = build_schema(
        {n: describe_site(a, n, site_fields(a, n, label_key=LABEL)) for n, a in backed.items()}
    )
    assert schema.n_features == adata.n_vars  # names are still read from a CSC file: only cells are refused


@pytest.mark.parametrize("kind", ["csr32", "dense64"])
def test_sites_given_as_paths_train_like_in_memory_sites(pbmc, tmp_path, kind):
    paths, _ = _write_sites(pbmc, kind, tmp_path)
    digests = [_sha256(p) for p in paths]
    key = si.FederationKey(hashlib.sha256(b"backed test key").digest())
    in_memory = {p.stem: ad.read_h5ad(p) for p in paths}
    model_memory = si.tl.train_federated(in_memory, key=key, **TINY)
    model_paths = si.tl.train_federated({p.stem: p for p in paths}, key=key, copy=True, **TINY)
    written = model_paths.sites
    assert set(written) == set(in_memory)
    a, b = _state(model_memory), _state(model_paths)
    assert all(torch.equal(a[name], b[name]) for name in a)
    for name, adata in written.items():
        assert adata.isbacked
        np.testing.assert_array_equal(adata.obsm["X_scinfl"], in_memory[name].obsm["X_scinfl"])
        adata.file.close()
    model_paths = si.tl.train_federated([str(p) for p in paths], key=key, **TINY)  # no write-back
    assert model_paths.sites is None
    c = _state(model_paths)
    assert all(torch.equal(a[name], c[name]) for name in a)
    assert [_sha256(p) for p in paths] == digests
