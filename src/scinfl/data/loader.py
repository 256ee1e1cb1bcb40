"""A site's matrix aligned to the schema, read a whole batch at a time.

Sparse matrices stay sparse: a batch of rows is sliced from the CSR matrix in one call and only that batch
is densified (tens of times faster than row by row, and the full matrix is never densified). For a GPU the
batch stays sparse until it is there (:class:`SparseRows`, ``SiteDataset(sparse_batches=True)``): it
crosses at its stored size and is densified on the device.

Backed matrices (``anndata.read_h5ad(path, backed="r")``: a CSR dataset or a dense HDF5 dataset) are read
from disk one batch at a time; only a CSR matrix's row pointers (8 bytes per cell) are held in memory. A
batch gives the same dense rows as the same matrix in memory, so training on a backed site computes what
training on the loaded site computes, bit for bit. Reading is planned here rather than left to anndata's
backed indexing, which reads each row with its own HDF5 call (7-16 ms for 128 random rows of a 2,000-gene
CSR matrix on our machine): the rows of a sorted batch are merged into runs of consecutive elements, and
when the file is an unfiltered HDF5 file opened read-only, each run is read with one ``os.preadv`` at its
byte offset in the file (0.8-1.2 ms per batch, densified; docs/benchmarks.md). Anything else (compressed
or zarr storage, a file open for writing) falls back to slicing runs through h5py. Nothing is mapped into
memory, so the process's resident memory does not grow with the file. A backed CSC matrix is refused: a
row of it is spread over the whole file.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from anndata.abc import CSCDataset, CSRDataset
from scipy import sparse
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .schema import FederationSchema, SiteFields, feature_source

__all__ = ["AlignedMatrix", "SiteDataset", "SparseRows", "batch_loader", "check_finite"]

_FINITE_CHECK_ROWS = 4096
_FINITE_CHECK_ELEMENTS = 1 << 22  # values per chunk when scanning a matrix for NaN (16 MiB of float32)


def _csc_error(site: str | None) -> TypeError:
    where = f"Site {site!r}: the" if site is not None else "The"
    return TypeError(
        f"{where} expression matrix is a backed CSC matrix (anndata CSCDataset); reading cells from it "
        "would read the whole matrix for every batch. Store it by cells (CSR) instead, e.g. "
        "adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); adata.write_h5ad(new_path)."
    )


_FLOAT32_MAX = np.finfo(np.float32).max


def _n_bad(values: np.ndarray) -> int:
    """Entries that are NaN or infinite, or become infinite as float32 (batches are read as float32)."""
    if values.dtype.kind != "f":
        return 0
    with np.errstate(invalid="ignore"):
        return int(np.count_nonzero(~(np.abs(values) <= _FLOAT32_MAX)))


def check_finite(matrix, site: str) -> None:
    """Raise naming the site if the matrix holds NaN or infinite values, or values beyond float32's range
    (checked in chunks).

    Backed matrices are scanned from disk chunk by chunk. A backed CSC matrix is refused here, before
    training, with the remedy (see :class:`AlignedMatrix`).
    """
    bad = 0
    if isinstance(matrix, CSCDataset):
        raise _csc_error(site)
    if sparse.issparse(matrix):
        bad = _n_bad(matrix.data)
    elif isinstance(matrix, CSRDataset):
        values = matrix.group["data"]
        if values.dtype.kind == "f":
            for start in range(0, values.shape[0], _FINITE_CHECK_ELEMENTS):
                bad += _n_bad(np.asarray(values[start : start + _FINITE_CHECK_ELEMENTS]))
    else:
        n_rows = max(1, min(_FINITE_CHECK_ROWS, _FINITE_CHECK_ELEMENTS // max(1, matrix.shape[1])))
        for start in range(0, matrix.shape[0], n_rows):
            bad += _n_bad(np.asarray(matrix[start : start + n_rows]))
    if bad:
        raise ValueError(
            f"Site {site!r}: the expression matrix holds {bad} NaN or infinite values (or values beyond "
            "float32's range, which become infinite when read); impute or filter them before training."
        )


def _runs(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge ranges ``[starts[i], stops[i])`` that follow each other into runs; empty ranges vanish."""
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if len(starts) < 2:
        return starts, stops
    new = np.flatnonzero(starts[1:] != stops[:-1]) + 1
    return starts[np.r_[0, new]], stops[np.r_[new - 1, len(stops) - 1]]


class _DiskRuns:
    """Reads runs ``ds[a:b]`` along the first axis of an HDF5 dataset (a CSR's ``data`` or a dense matrix).

    Where the layout allows, a run is read with ``os.preadv`` at its byte offset in the file: the dataset
    is unfiltered and stored contiguously or in chunks of whole rows, the file is opened read-only through
    HDF5's default file driver, and a test read agrees with h5py. Otherwise runs are sliced through h5py.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.dtype = dataset.dtype
        self.row_shape = tuple(dataset.shape[1:])
        self.row_bytes = self.dtype.itemsize * math.prod(self.row_shape)
        self._path = None
        try:
            self._layout = self._raw_layout(dataset)
        except Exception:  # any surprise in the layout: h5py reads it
            self._layout = None
        if self._layout is not None:
            self._path = os.path.abspath(dataset.file.filename)  # immune to a later chdir
            self._stat = self._file_identity()
            if not self._agrees_with_h5py():
                self._layout, self._path = None, None

    @staticmethod
    def _raw_layout(dataset) -> tuple[np.ndarray, int] | None:
        """``(offsets, rows_per_chunk)``: the byte offset of every chunk (a contiguous dataset is one)."""
        import h5py

        if not hasattr(os, "preadv") or not isinstance(dataset, h5py.Dataset):
            return None
        file = dataset.file
        if file.mode != "r" or file.driver not in ("sec2", "stdio") or file.userblock_size:
            return None
        if dataset.dtype.kind not in "biuf" or dataset.shape[0] == 0:
            return None
        plist = dataset.id.get_create_plist()
        if plist.get_nfilters() or plist.get_external_count():
            return None
        layout = plist.get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            offset = dataset.id.get_offset()
            return None if offset is None else (np.array([offset], dtype=np.int64), dataset.shape[0])
        if layout != h5py.h5d.CHUNKED or tuple(dataset.chunks[1:]) != tuple(dataset.shape[1:]):
            return None
        rows_per_chunk = dataset.chunks[0]
        n_chunks = -(-dataset.shape[0] // rows_per_chunk)
        offsets = np.full(n_chunks, -1, dtype=np.int64)

        def record(info) -> None:
            offsets[info.chunk_offset[0] // rows_per_chunk] = info.byte_offset

        if hasattr(dataset.id, "chunk_iter"):
            dataset.id.chunk_iter(record)
        else:
            for i in range(dataset.id.get_num_chunks()):
                record(dataset.id.get_chunk_info(i))
        return None if (offsets < 0).any() else (offsets, rows_per_chunk)

    def _file_identity(self) -> tuple[int, int, int]:
        stat = os.stat(self._path)
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _agrees_with_h5py(self) -> bool:
        n = self.dataset.shape[0]
        starts = np.array([0, max(0, n - 3)], dtype=np.int64)
        stops = np.minimum(starts + 3, n)
        starts, stops = _runs(starts, stops)
        return np.array_equal(self._read_raw(starts, stops), self._read_sliced(starts, stops))

    def read(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """``np.concatenate([ds[a:b] for a, b in zip(starts, stops)])`` for sorted, disjoint runs."""
        if self._layout is None:
            return self._read_sliced(starts, stops)
        if self._file_identity() != self._stat:
            raise RuntimeError(f"{self._path} changed on disk while scinfl was reading it.")
        return self._read_raw(starts, stops)

    def _empty(self, n: int) -> np.ndarray:
        return np.empty((n, *self.row_shape), dtype=self.dtype)

    def _read_sliced(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        out = self._empty(int(np.sum(stops - starts)))
        position = 0
        for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            out[position : position + stop - start] = self.dataset[start:stop]
            position += stop - start
        return out

    def _read_raw(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        offsets, rows_per_chunk = self._layout
        # Split every run at chunk boundaries (one read per chunk it touches), then read the pieces.
        first, last = starts // rows_per_chunk, (stops - 1) // rows_per_chunk
        n_pieces = last - first + 1
        run = np.repeat(np.arange(len(starts)), n_pieces)
        chunk = first[run] + np.arange(len(run)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        piece_start = np.maximum(starts[run], chunk * rows_per_chunk)
        piece_stop = np.minimum(stops[run], (chunk + 1) * rows_per_chunk)
        where = offsets[chunk] + (piece_start - chunk * rows_per_chunk) * self.row_bytes
        sizes = (piece_stop - piece_start) * self.row_bytes
        ends = np.cumsum(sizes)
        out = self._empty(int(np.sum(stops - starts)))
        buffer = out.reshape(-1).view(np.uint8)
        fd = os.open(self._path, os.O_RDONLY)
        try:
            for at, size, end in zip(where.tolist(), sizes.tolist(), ends.tolist(), strict=True):
                view = buffer[end - size : end]
                while len(view):  # preadv may return fewer bytes than asked
                    done = os.preadv(fd, [view], at)
                    if done <= 0:
                        raise OSError(f"Unexpected end of file reading {self._path}.")
                    view, at = view[done:], at + done
        finally:
            os.close(fd)
        return out


class _BackedRows:
    """Rows of a backed CSR or dense HDF5 matrix, read one batch at a time (see the module docstring)."""

    def __init__(self, matrix) -> None:
        self.shape = tuple(matrix.shape)
        self.sparse = isinstance(matrix, CSRDataset)
        if self.sparse:
            group = matrix.group
            self.indptr = np.asarray(group["indptr"][...], dtype=np.int64)
            self.data = _DiskRuns(group["data"])
            self.indices = _DiskRuns(group["indices"])
        else:
            self.values = _DiskRuns(matrix)

    @property
    def fast(self) -> bool:
        """Whether batches are read with ``os.preadv`` (else through h5py)."""
        readers = (self.data, self.indices) if self.sparse else (self.values,)
        return all(reader._layout is not None for reader in readers)

    def __getitem__(self, index: np.ndarray):
        """Rows ``index`` (any order, repeats allowed) as a CSR matrix or a dense array."""
        index = np.asarray(index, dtype=np.int64)
        unique, inverse = np.unique(index, return_inverse=True)
        if self.sparse:
            starts, stops = self.indptr[unique], self.indptr[unique + 1]
            runs = _runs(starts, stops)
            indptr = np.r_[0, np.cumsum(stops - starts)]
            block = sparse.csr_matrix(
                (self.data.read(*runs), self.indices.read(*runs), indptr), shape=(len(unique), self.shape[1])
            )
        else:
            block = self.values.read(*_runs(unique, unique + 1))
        return block if np.array_equal(unique, index) else block[inverse]


class AlignedMatrix:
    """One site's matrix with its columns mapped onto the schema's feature order.

    Features the site lacks are zero (``join="outer"``, or a query missing genes). Nothing is copied
    up front: :meth:`rows` reads and aligns one batch. The matrix may be in memory (dense or sparse) or
    backed: a CSR ``anndata.abc.CSRDataset`` or a dense ``h5py.Dataset``, read from disk batch by batch.
    A backed CSC matrix raises a ``TypeError`` (:func:`check_finite` raises it first, naming the site).
    """

    def __init__(self, matrix, var_names: pd.Index, schema_var_names: tuple[str, ...]) -> None:
        self.matrix = matrix
        if isinstance(matrix, CSCDataset):
            raise _csc_error(None)
        self._backed = _BackedRows(matrix) if _is_backed(matrix) else None
        position = pd.Index(schema_var_names).get_indexer(pd.Index(var_names).astype(str))
        present = np.flatnonzero(position >= 0)
        self.source_columns = present
        self.target_columns = position[present]
        self.n_features = len(schema_var_names)
        self.n_present = len(present)
        self._identity = self.n_present == self.n_features == matrix.shape[1] and np.array_equal(
            self.target_columns, np.arange(self.n_features)
        )
        # A source column's schema position, -1 where the schema lacks it: sparse batches remap indices.
        self._column_lookup = np.full(matrix.shape[1], -1, dtype=np.int64)
        self._column_lookup[present] = self.target_columns

    @classmethod
    def from_adata(cls, adata: AnnData, schema: FederationSchema, fields: SiteFields | None = None):
        matrix, var_names = feature_source(adata, fields or schema.fields)
        return cls(matrix, var_names, schema.var_names)

    @property
    def n_obs(self) -> int:
        return self.matrix.shape[0]

    @property
    def measured(self) -> np.ndarray:
        """One flag per schema feature: does this site measure it (else it is zero-filled)."""
        flags = np.zeros(self.n_features, dtype=bool)
        flags[self.target_columns] = True
        return flags

    @property
    def is_sparse(self) -> bool:
        """Whether batches are read from a sparse (CSR or CSC) matrix, in memory or backed."""
        return sparse.issparse(self.matrix) or (self._backed is not None and self._backed.sparse)

    def _read(self, index: np.ndarray):
        return self.matrix[index] if self._backed is None else self._backed[index]

    def _aligned_csr(self, block) -> sparse.csr_matrix:
        """A sparse batch as CSR in the schema's columns: each stored value moves to its schema column,
        values of columns the schema lacks are dropped. O(stored values): a row's columns are left in
        whatever order they come (slicing columns would sort them), duplicates are kept."""
        block = sparse.csr_matrix(block)
        if self._identity:
            return block
        columns, indptr, data = self._column_lookup[block.indices], block.indptr, block.data
        keep = columns >= 0
        if not keep.all():
            kept = np.flatnonzero(keep)  # positions and take: several times faster than a boolean mask
            indptr = np.searchsorted(kept, indptr)
            columns, data = columns.take(kept), data.take(kept)
        return sparse.csr_matrix(
            (data, columns.astype(indptr.dtype), indptr), shape=(block.shape[0], self.n_features)
        )

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (sorted ascending for fast reads), aligned, as a dense float32 array."""
        block = self._read(index)
        if sparse.issparse(block):
            return self._aligned_csr(block).toarray().astype(np.float32, copy=False)
        block = np.asarray(block)
        if self._identity:
            return block.astype(np.float32, copy=False)
        out = np.zeros((len(index), self.n_features), dtype=np.float32)
        out[:, self.target_columns] = block[:, self.source_columns]
        return out

    def sparse_rows(self, index: np.ndarray) -> SparseRows:
        """Rows ``index``, aligned, as :class:`SparseRows`: densified, the same values as :meth:`rows`."""
        if not self.is_sparse:
            raise TypeError("sparse_rows needs a sparse matrix; this one is dense (use rows).")
        block = self._aligned_csr(self._read(index))
        if block.dtype != np.float32 and not block.has_canonical_format:
            # Repeated entries are summed where they are densified, in float32; toarray() sums them in
            # the stored precision, so sum them here first (sorting the batch: a rare kind of matrix).
            block = block.copy()
            block.sum_duplicates()
        kind = np.int32 if max(block.nnz, self.n_features) < np.iinfo(np.int32).max else np.int64
        return SparseRows(
            torch.from_numpy(block.indptr.astype(kind, copy=False)),
            torch.from_numpy(block.indices.astype(kind, copy=False)),
            torch.from_numpy(block.data.astype(np.float32, copy=False)),
            (len(index), self.n_features),
        )


class SparseRows:
    """A batch of rows as CSR parts (row pointers, column indices, float32 values) and its dense shape.

    A row's columns may come in any order, and repeated entries are summed (as scipy's ``toarray`` does).

    It crosses to a device at its stored size (a fifth of the dense batch at 10% non-zeros), and
    :meth:`dense` builds the dense float32 batch where its parts are; :func:`scinfl.train.to_device` does
    both. ``len`` is its number of rows.
    """

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
        self.crow, self.col, self.values, self.shape = crow, col, values, (int(shape[0]), int(shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.crow, self.col, self.values

    def replace(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> SparseRows:
        """The same batch with its parts replaced (moved)."""
        return SparseRows(crow, col, values, self.shape)

    def dense(self) -> torch.Tensor:
        """The dense ``shape`` float32 batch, on the device of the parts.

        Each value is added at its row and column (``index_put_`` with ``accumulate``): no CSR kernel, so
        a row's columns need not be sorted (they are not after alignment) and any torch device can do
        it. Repeated entries (a matrix not in canonical form) are summed; on a CUDA GPU deterministically
        (a sorting kernel), on several CPU threads not necessarily in the same order.
        """
        device = self.values.device
        counts = self.crow[1:] - self.crow[:-1]
        # output_size: no wait for the device to learn the result's length.
        rows = torch.repeat_interleave(
            torch.arange(self.shape[0], device=device), counts, output_size=self.values.numel()
        )
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=device)
        return out.index_put_((rows, self.col), self.values, accumulate=True)


def _is_backed(matrix) -> bool:
    """A matrix on disk: an anndata backed sparse dataset or an HDF5 dataset."""
    if isinstance(matrix, CSRDataset):
        return True
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py comes with anndata
        return False
    return isinstance(matrix, h5py.Dataset)


class SiteDataset(Dataset):
    """Cells ``indices`` of an aligned matrix, with optional integer labels; indexed by whole batches.

    With ``sparse_batches`` and a sparse matrix, a batch's rows are :class:`SparseRows`, densified where
    they are moved (a site training on a GPU, :func:`scinfl.train.sparse_batches_on`); otherwise a dense
    float32 tensor.
    """

    def __init__(
        self,
        matrix: AlignedMatrix,
        indices: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        sparse_batches: bool = False,
    ) -> None:
        self.matrix = matrix
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = labels
        self.sparse_batches = bool(sparse_batches and getattr(matrix, "is_sparse", False))

    def with_sparse_batches(self, sparse_batches: bool = True) -> SiteDataset:
        """The same cells, their batches sparse (where the matrix is) or not."""
        return SiteDataset(self.matrix, self.indices, self.labels, sparse_batches=sparse_batches)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, positions) -> tuple[torch.Tensor | SparseRows, torch.Tensor]:
        # Row order within a batch changes nothing; int64 keeps an empty batch an (empty) index array.
        rows = np.sort(self.indices[np.asarray(positions, dtype=np.int64)])
        x = self.matrix.sparse_rows(rows) if self.sparse_batches else torch.from_numpy(self.matrix.rows(rows))
        y = torch.from_numpy(self.labels[rows]) if self.labels is not None else torch.empty(0)
        return x, y


def batch_loader(
    dataset: SiteDataset, *, batch_size: int, shuffle: bool, seed: int = 0, drop_singleton: bool = False
) -> DataLoader:
    """A DataLoader yielding whole batches from ``dataset``.

    ``drop_singleton`` drops a final batch of one cell (BatchNorm cannot train on it); with shuffling a
    different cell sits out each epoch.
    """
    generator = torch.Generator().manual_seed(int(seed))
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    drop_last = drop_singleton and len(dataset) % batch_size == 1
    sampler = BatchSampler(order, batch_size=batch_size, drop_last=drop_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)
