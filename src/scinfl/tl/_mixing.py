"""How well an embedding mixes the sites (or any batches) of the same cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.neighbors import NearestNeighbors

__all__ = ["site_mixing"]


def site_mixing(
    adata: AnnData,
    *,
    batch_key: str,
    use_rep: str = "X_scinfl",
    n_neighbors: int = 15,
    key_added: str = "site_mixing",
) -> float:
    """How mixed the batches (sites, donors) are in an embedding: per cell, the share of its nearest
    neighbours from another batch, over that share's expectation under neighbours drawn at random.

    1 means the batches are as mixed as at random, 0 that every cell's neighbours are from its own batch.
    The same cell types in different proportions across batches keep it below 1 even for a perfect
    integration; compare methods on the same cells. Run it where the batches' embeddings may be pooled
    (``anndata.concat`` of the sites' outputs).

    Parameters
    ----------
    adata
        Cells of several batches, embedded in one space.
    batch_key
        ``.obs`` column of each cell's batch (e.g. its site).
    use_rep
        ``.obsm`` key of the embedding.
    n_neighbors
        Neighbours per cell.
    key_added
        ``.obs`` column of each cell's score.

    Returns
    -------
    The mean over cells; each cell's score goes to ``adata.obs[key_added]``.
    """
    if batch_key not in adata.obs:
        raise ValueError(f"No .obs[{batch_key!r}]: name the column of each cell's batch (its site).")
    if use_rep not in adata.obsm:
        raise ValueError(
            f"No .obsm[{use_rep!r}]: embed the cells first (or name the embedding with use_rep=)."
        )
    batch = adata.obs[batch_key].astype(str).to_numpy()
    sizes = pd.Series(batch).value_counts()
    if len(sizes) < 2:
        raise ValueError(f".obs[{batch_key!r}] holds one batch ({sizes.index[0]!r}): nothing to mix.")
    if not 1 <= n_neighbors < adata.n_obs:
        raise ValueError(f"n_neighbors must be between 1 and {adata.n_obs - 1}, got {n_neighbors}.")
    latent = np.asarray(adata.obsm[use_rep])
    index = (
        NearestNeighbors(n_neighbors=n_neighbors + 1).fit(latent).kneighbors(latent, return_distance=False)
    )
    index = index[:, 1:]  # the cell itself first
    other = (batch[index] != batch[:, None]).mean(axis=1)
    expected = (adata.n_obs - sizes.loc[batch].to_numpy()) / (adata.n_obs - 1)
    score = other / expected
    adata.obs[key_added] = score
    return float(score.mean())
