"""Label transfer in a shared embedding: a site's cells labelled by their nearest labelled cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from ..privacy.utility import knn_labels

__all__ = ["transfer_labels"]


def _representation(adata: AnnData, use_rep: str, name: str) -> np.ndarray:
    if use_rep not in adata.obsm:
        raise ValueError(
            f"The {name} has no .obsm[{use_rep!r}]; embed it first (si.tl.predict(..., key=...)) or pass use_rep=."
        )
    values = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError(f"The {name}'s .obsm[{use_rep!r}] must be finite, one row per cell.")
    return values


def transfer_labels(
    adata: AnnData,
    reference: AnnData,
    *,
    label_key: str,
    use_rep: str = "X_scinfl",
    n_neighbors: int = 15,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Label cells by majority vote of their nearest labelled reference cells in a shared embedding.

    The use the embedding of a keyed model is for across sites: a site without labels (an RNA-only site
    of a mosaic, a new cohort) takes them from a site that has them, when both are embedded by the same
    model under the same key (``.obsm["X_scinfl"]``, from training or :func:`scinfl.tl.predict`). Both
    AnnData stay where they are: run it where the reference's embedding and labels may be read.

    Parameters
    ----------
    adata
        The cells to label.
    reference
        Labelled cells, embedded in the same space.
    label_key
        ``reference.obs`` column of labels; cells without a label are left out of the vote.
    use_rep
        ``.obsm`` key of the embedding in both.
    n_neighbors
        Reference cells that vote (fewer when the reference has fewer labelled cells).
    key_added
        ``adata.obs`` column written; default ``f"{label_key}_transferred"``. Its ``_confidence`` column
        is the fraction of the voters that agree with the label given.
    copy
        Return a copy of ``adata`` with the labels instead of writing into it.

    Returns
    -------
    ``adata`` labelled, with ``copy=True``; otherwise None.
    """
    if label_key not in reference.obs:
        raise ValueError(f"The reference has no .obs[{label_key!r}] to transfer.")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be at least 1, got {n_neighbors}.")
    query = _representation(adata, use_rep, "AnnData to label")
    known = _representation(reference, use_rep, "reference")
    if query.shape[1] != known.shape[1]:
        raise ValueError(
            f".obsm[{use_rep!r}] has {query.shape[1]} columns in the AnnData to label and {known.shape[1]} in "
            "the reference: embed both with the same model."
        )
    labels = reference.obs[label_key]
    labelled = labels.notna().to_numpy()
    if not labelled.any():
        raise ValueError(f"The reference has no cell with a label in .obs[{label_key!r}].")
    names = labels[labelled].astype(str).to_numpy()
    predicted, confidence = knn_labels(
        known[labelled], names, query, n_neighbors=n_neighbors, confidence=True
    )
    key_added = f"{label_key}_transferred" if key_added is None else key_added
    categories = (
        labels.cat.categories.astype(str)
        if isinstance(labels.dtype, pd.CategoricalDtype)
        else np.unique(names)
    )
    target = adata.copy() if copy else adata
    present = set(names)
    target.obs[key_added] = pd.Categorical(predicted, categories=[c for c in categories if c in present])
    target.obs[f"{key_added}_confidence"] = confidence
    return target if copy else None
