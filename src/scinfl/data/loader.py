"""A site's matrix aligned to the schema, read a whole batch at a time.

Sparse matrices stay sparse: a batch of rows is sliced from the CSR matrix in one call and only that batch
is densified (tens of times faster than row by row, and the full matrix is never densified).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .schema import FederationSchema, SiteFields, feature_source

__all__ = ["AlignedMatrix", "SiteDataset", "batch_loader", "check_finite"]

_FINITE_CHECK_ROWS = 4096


def check_finite(matrix, site: str) -> None:
    """Raise naming the site if the matrix holds NaN or infinite values (checked in row chunks)."""
    if sparse.issparse(matrix):
        values = matrix.data
        bad = np.count_nonzero(~np.isfinite(values)) if values.dtype.kind == "f" else 0
    else:
        bad = 0
        for start in range(0, matrix.shape[0], _FINITE_CHECK_ROWS):
            chunk = np.asarray(matrix[start : start + _FINITE_CHECK_ROWS])
            if chunk.dtype.kind == "f":
                bad += int(np.count_nonzero(~np.isfinite(chunk)))
    if bad:
        raise ValueError(
            f"Site {site!r}: the expression matrix holds {bad} NaN or infinite values; "
            "impute or filter them before training."
        )


class AlignedMatrix:
    """One site's matrix with its columns mapped onto the schema's feature order.

    Features the site lacks are zero (``join="outer"``, or a query missing genes). Nothing is copied
    up front: :meth:`rows` reads and aligns one batch.
    """

    def __init__(self, matrix, var_names: pd.Index, schema_var_names: tuple[str, ...]) -> None:
        self.matrix = matrix
        position = pd.Index(schema_var_names).get_indexer(pd.Index(var_names).astype(str))
        present = np.flatnonzero(position >= 0)
        self.source_columns = present
        self.target_columns = position[present]
        self.n_features = len(schema_var_names)
        self.n_present = len(present)
        self._identity = self.n_present == self.n_features == matrix.shape[1] and np.array_equal(
            self.target_columns, np.arange(self.n_features)
        )

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

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (sorted ascending for fast reads), aligned, as a dense float32 array."""
        block = self.matrix[index]
        block = block.toarray() if sparse.issparse(block) else np.asarray(block)
        if self._identity:
            return block.astype(np.float32, copy=False)
        out = np.zeros((len(index), self.n_features), dtype=np.float32)
        out[:, self.target_columns] = block[:, self.source_columns]
        return out


class SiteDataset(Dataset):
    """Cells ``indices`` of an aligned matrix, with optional integer labels; indexed by whole batches."""

    def __init__(self, matrix: AlignedMatrix, indices: np.ndarray, labels: np.ndarray | None = None) -> None:
        self.matrix = matrix
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        # Row order within a batch changes nothing; int64 keeps an empty batch an (empty) index array.
        rows = np.sort(self.indices[np.asarray(positions, dtype=np.int64)])
        x = torch.from_numpy(self.matrix.rows(rows))
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
