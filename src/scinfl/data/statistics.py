"""A site's sufficient statistics for federated preprocessing: one streamed pass over its matrix.

What :mod:`scinfl.pp`'s federated ``highly_variable_genes``, ``scale`` and ``pca`` need from each site is a
sum over its cells: counts, per-gene sums and sums of squares (of the values, of seurat's de-logarithmised
values, or of values clipped per gene), a Gram matrix ``X^T X``, or products ``X^T (X Q)``. Summed over the
sites they are the pooled data's, so the federation computes exactly what scanpy computes on the pooled
cells. A :class:`StatisticRequest` names one statistic over an agreed gene order; :func:`site_statistic`
computes it as one flat float64 vector (its layout: :func:`statistic_size`, :func:`unpack_statistic`).

Backed sites are read in chunks of rows (memory flat in cells); sparse chunks stay sparse except for the
Gram matrix's and products' row blocks. Knows AnnData; knows nothing of federation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata.abc import CSCDataset, CSRDataset
from scipy import sparse

from .loader import _BackedRows, _csc_error, _is_backed
from .schema import SiteFields, check_unique_features, column_categories, feature_source, validate_fields

__all__ = [
    "StatisticRequest",
    "site_profile",
    "site_statistic",
    "statistic_size",
    "unpack_statistic",
]

StatisticKind = Literal["moments", "clipped", "gram", "products"]

_CHUNK_ELEMENTS = 1 << 22  # values per chunk of rows (dense), as the loader's finite check reads them
_MIN_SPARSE_ROWS = 4096  # sparse rows are cheap to read by the thousand whatever the width


@dataclass(frozen=True)
class StatisticRequest:
    """One statistic over the agreed genes, as the aggregator asks every site for it.

    ``kind``:

    - ``"moments"``: per group, the cell count, per-gene sums and sums of squares;
    - ``"clipped"``: per group, per-gene sums and sums of squares of ``min(x, clip)`` (``arrays["clip"]``,
      groups x genes; seurat_v3's regularised variance);
    - ``"gram"``: cell count, per-gene sums and ``X^T X`` (genes x genes);
    - ``"products"``: cell count, per-gene sums and ``X^T (X Q)`` for ``Q = arrays["basis"]`` (genes x k).

    ``genes`` is the pooled gene order: a gene the site lacks is zero in every one of its cells. ``layer``
    names where the values are (None: ``.X``). ``transform="expm1"`` takes ``expm1(x * ln(log_base))`` of
    each value first (seurat's dispersions on logarithmised data), in the data's own dtype, as scanpy does.
    ``batch_key`` and ``batches``: the groups are the cells whose ``.obs[batch_key]`` is each of
    ``batches`` (``batches`` without ``batch_key``: the sites are the batches; neither: one group, every
    cell). ``counts=True``: refuse values that are not
    non-negative integers (seurat_v3 models counts).
    """

    kind: StatisticKind
    genes: tuple[str, ...]
    layer: str | None = None
    transform: Literal["expm1"] | None = None
    log_base: float | None = None
    batch_key: str | None = None
    batches: tuple[str, ...] = ()
    counts: bool = False
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        return max(1, len(self.batches))

    def options(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-ready (what a message carries besides them)."""
        return {
            "kind": self.kind,
            "genes": list(self.genes),
            "layer": self.layer,
            "transform": self.transform,
            "log_base": self.log_base,
            "batch_key": self.batch_key,
            "batches": list(self.batches),
            "counts": self.counts,
        }

    def to_json(self) -> str:
        return json.dumps(self.options())

    @classmethod
    def from_json(cls, text: str, arrays: Mapping[str, np.ndarray] | None = None) -> StatisticRequest:
        options = json.loads(text)
        return cls(
            kind=options["kind"],
            genes=tuple(options["genes"]),
            layer=options["layer"],
            transform=options["transform"],
            log_base=options["log_base"],
            batch_key=options["batch_key"],
            batches=tuple(options["batches"]),
            counts=bool(options["counts"]),
            arrays=dict(arrays or {}),
        )


def statistic_size(request: StatisticRequest) -> int:
    """The length of the flat vector :func:`site_statistic` returns for ``request``."""
    p, groups = len(request.genes), request.n_groups
    if request.kind == "moments":
        return groups * (1 + 2 * p)
    if request.kind == "clipped":
        return groups * 2 * p
    if request.kind == "gram":
        return 1 + p + p * p
    if request.kind == "products":
        return 1 + p + p * int(request.arrays["basis"].shape[1])
    raise ValueError(f"Unknown statistic {request.kind!r}.")


def unpack_statistic(request: StatisticRequest, vector: np.ndarray) -> dict[str, np.ndarray]:
    """The named parts of a statistic's flat vector (one site's, or the sum over the sites)."""
    p, groups = len(request.genes), request.n_groups
    vector = np.asarray(vector, dtype=np.float64)
    if len(vector) != statistic_size(request):
        raise ValueError(
            f"A {request.kind} statistic has {statistic_size(request)} values, got {len(vector)}."
        )
    if request.kind == "moments":
        table = vector.reshape(groups, 1 + 2 * p)
        return {"n": table[:, 0], "sum": table[:, 1 : 1 + p], "sum_squares": table[:, 1 + p :]}
    if request.kind == "clipped":
        table = vector.reshape(groups, 2 * p)
        return {"sum": table[:, :p], "sum_squares": table[:, p:]}
    k = p if request.kind == "gram" else int(request.arrays["basis"].shape[1])
    name = "gram" if request.kind == "gram" else "products"
    return {"n": vector[:1], "sum": vector[1 : 1 + p], name: vector[1 + p :].reshape(p, k)}


def matrix_of(data, layer: str | None, site: str):
    """The matrix ``layer`` names (None: ``.X``) and its feature names, naming the site if it is absent."""
    matrix, var_names = feature_source(data, validate_fields(data, site, SiteFields(layer=layer)))
    if matrix is None:
        raise ValueError(f"Site {site!r}: the AnnData has no .X; pass layer= to name its values.")
    return matrix, pd.Index(var_names).astype(str)


def chunks(matrix, n_rows: int | None = None) -> Iterator[tuple[int, Any]]:
    """``(start, block)`` over the rows of an in-memory or backed matrix, in its own dtype; sparse blocks
    are CSR. Backed matrices are read from disk one block at a time."""
    if isinstance(matrix, CSCDataset):
        raise _csc_error(None)
    n_obs, n_vars = matrix.shape
    n_rows = n_rows or max(1, min(n_obs, _CHUNK_ELEMENTS // max(1, n_vars)))
    backed = _BackedRows(matrix) if _is_backed(matrix) else None
    if isinstance(matrix, CSRDataset) or sparse.issparse(matrix):
        n_rows = max(n_rows, _MIN_SPARSE_ROWS)
    csr = sparse.csr_matrix(matrix) if sparse.issparse(matrix) and not sparse.isspmatrix_csr(matrix) else None
    for start in range(0, n_obs, n_rows):
        stop = min(n_obs, start + n_rows)
        if backed is not None:
            block = backed[np.arange(start, stop)]
        elif csr is not None:
            block = csr[start:stop]
        else:
            block = matrix[start:stop]
        block = sparse.csr_matrix(block) if sparse.issparse(block) else np.asarray(block)
        yield start, block


def _values(block, request: StatisticRequest):
    """A block's values as the statistic reads them (seurat's ``expm1`` in the data's dtype)."""
    if request.transform is None:
        return block
    if request.transform != "expm1":
        raise ValueError(f"Unknown transform {request.transform!r}.")
    block = block.copy()
    target = block.data if sparse.issparse(block) else block
    if not np.issubdtype(target.dtype, np.floating):
        target = target.astype(np.float64)
        if sparse.issparse(block):
            block = block.astype(np.float64)
            target = block.data
        else:
            block = target
    if request.log_base is not None:
        target *= np.log(request.log_base)
    np.expm1(target, out=target)
    return block


def _check_block(block, site: str, where: str, counts: bool) -> None:
    values = block.data if sparse.issparse(block) else np.asarray(block)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(
            f"Site {site!r}: {where} holds NaN or infinite values; impute or filter them first "
            "(nothing was sent)."
        )
    if counts and ((values < 0).any() or (values.dtype.kind == "f" and (values != np.rint(values)).any())):
        raise ValueError(
            f"Site {site!r}: {where} holds values that are not non-negative integers, but flavor='seurat_v3' "
            "models raw counts; pass the layer of raw counts (layer=...)."
        )


def _column_sums(block, squares: bool = False) -> np.ndarray:
    if sparse.issparse(block):
        data = block.data.astype(np.float64)
        return np.bincount(block.indices, weights=data * data if squares else data, minlength=block.shape[1])
    values = block.astype(np.float64, copy=False)
    return (values * values).sum(axis=0) if squares else values.sum(axis=0)


def site_profile(
    data, site: str, *, layer: str | None = None, batch_key: str | None = None
) -> dict[str, Any]:
    """What a site publishes before its statistics are summed: its feature names and cell count, and
    with ``batch_key`` the cells of each batch it holds. Names and counts only, never values."""
    matrix, var_names = matrix_of(data, layer, site)
    check_unique_features(var_names, site)
    profile: dict[str, Any] = {"var_names": list(var_names), "n_obs": int(matrix.shape[0])}
    if batch_key is not None:
        counts = pd.Series(_batch_column(data, site, batch_key)).value_counts()
        profile["batches"] = {str(b): int(n) for b, n in sorted(counts.items())}
    return profile


def _batch_column(data, site: str, batch_key: str) -> np.ndarray:
    column_categories(data, site, batch_key, what="batch column")  # present, and no cell without a value
    return data.obs[batch_key].astype(str).to_numpy()


def site_statistic(data, site: str, request: StatisticRequest) -> np.ndarray:
    """``site``'s statistic for ``request`` as one flat float64 vector (see :func:`unpack_statistic`), from
    one pass over its matrix. With ``request.batches`` but no ``batch_key``, the batches are the sites:
    every cell of this one is in the batch named ``site``.

    Raises naming the site, before anything is returned, if its values are not finite (or not counts when
    ``request.counts``).
    """
    matrix, var_names = matrix_of(data, request.layer, site)
    where = f"layer {request.layer!r}" if request.layer is not None else ".X"
    genes = pd.Index(request.genes)
    position = genes.get_indexer(var_names)
    source = np.flatnonzero(position >= 0)  # the site's columns that are in the request, ...
    target = position[source]  # ... and where they go
    group_of = None  # every cell in the one group; else each cell's group (from .obs, already in memory)
    if request.batches and request.batch_key is None:  # the sites are the batches: this one is one
        group_of = np.full(matrix.shape[0], request.batches.index(site))
    elif request.batches:
        group_of = pd.Index(request.batches).get_indexer(_batch_column(data, site, request.batch_key))
        if (group_of < 0).any():
            raise ValueError(
                f"Site {site!r}: a batch of {request.batch_key!r} is not among the agreed batches."
            )
    out = np.zeros(statistic_size(request), dtype=np.float64)
    views = unpack_statistic(request, out)  # views into out, written in place
    clip = np.asarray(request.arrays["clip"], dtype=np.float64) if request.kind == "clipped" else None
    basis = (
        np.asarray(request.arrays["basis"], dtype=np.float64)[target] if request.kind == "products" else None
    )
    for start, block in chunks(matrix):
        _check_block(block, site, where, request.counts)
        block = _values(block[:, source] if len(source) != block.shape[1] else block, request)
        if request.kind in ("moments", "clipped"):
            block_groups = None if group_of is None else group_of[start : start + block.shape[0]]
            for group in [0] if block_groups is None else np.unique(block_groups):
                sub = block if block_groups is None else block[block_groups == group]
                if request.kind == "moments":
                    views["n"][group] += sub.shape[0]
                    views["sum"][group, target] += _column_sums(sub)
                    views["sum_squares"][group, target] += _column_sums(sub, squares=True)
                else:
                    limit = clip[group, target]
                    if sparse.issparse(sub):
                        sub = sub.astype(np.float64)
                        sub.data = np.minimum(sub.data, limit[sub.indices])
                    else:
                        sub = np.minimum(sub.astype(np.float64), limit)
                    views["sum"][group, target] += _column_sums(sub)
                    views["sum_squares"][group, target] += _column_sums(sub, squares=True)
        else:
            views["n"][0] += block.shape[0]
            views["sum"][target] += _column_sums(block)
            block = block.astype(np.float64)  # products of float32 values lose digits
            if request.kind == "gram":
                gram = block.T @ block
                gram = gram.toarray() if sparse.issparse(gram) else gram
                views["gram"][np.ix_(target, target)] += gram
            else:
                views["products"][target] += np.asarray(block.T @ (block @ basis))
    if not np.isfinite(out).all():
        raise ValueError(f"Site {site!r}: its statistics of {where} are not finite (values too large?).")
    return out
