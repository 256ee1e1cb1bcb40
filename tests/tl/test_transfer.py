"""tl.transfer_labels: a site's cells labelled by their nearest labelled cells in a shared embedding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scinfl as si


def _halves(pbmc):
    """pbmc68k_reduced's PCA (the embedding here), cut into a labelled reference and cells to label."""
    order = np.random.default_rng(0).permutation(pbmc.n_obs)
    reference, query = pbmc[np.sort(order[:500])].copy(), pbmc[np.sort(order[500:])].copy()
    return reference, query


def test_labels_come_from_the_nearest_reference_cells(pbmc):
    reference, query = _halves(pbmc)
    before = query.copy()
    labelled = si.tl.transfer_labels(query, reference, label_key="bulk_labels", use_rep="X_pca", copy=True)
    assert "bulk_labels_transferred" not in query.obs  # copy=True leaves it alone
    assert list(query.obs.columns) == list(before.obs.columns)
    transferred = labelled.obs["bulk_labels_transferred"]
    truth = query.obs["bulk_labels"].astype(str).to_numpy()
    accuracy = np.mean(transferred.astype(str).to_numpy() == truth)
    majority = pd.Series(truth).value_counts(normalize=True).iloc[0]
    assert accuracy > majority + 0.25  # PCA of PBMCs separates the cell types
    assert set(transferred.cat.categories) <= set(reference.obs["bulk_labels"].cat.categories)
    confidence = labelled.obs["bulk_labels_transferred_confidence"].to_numpy()
    assert ((confidence > 0) & (confidence <= 1)).all()
    # by hand, for one cell: the 15 nearest reference cells' majority, and its share of the vote
    distances = ((reference.obsm["X_pca"] - query.obsm["X_pca"][0]) ** 2).sum(axis=1)
    votes = reference.obs["bulk_labels"].astype(str).to_numpy()[np.argsort(distances)[:15]]
    values, counts = np.unique(votes, return_counts=True)
    assert transferred.iloc[0] == values[np.argmax(counts)]
    assert confidence[0] == pytest.approx(counts.max() / 15)


def test_in_place_with_key_added_and_unlabelled_reference_cells(pbmc):
    reference, query = _halves(pbmc)
    reference.obs["gate"] = reference.obs["bulk_labels"].astype(object)
    reference.obs.loc[reference.obs_names[:400], "gate"] = np.nan  # only 100 labelled cells vote
    assert (
        si.tl.transfer_labels(query, reference, label_key="gate", use_rep="X_pca", key_added="cell_type")
        is None
    )
    assert {"cell_type", "cell_type_confidence"} <= set(query.obs.columns)
    assert set(query.obs["cell_type"].astype(str)) <= set(reference.obs["gate"].dropna())


def test_bad_input_is_named(pbmc):
    reference, query = _halves(pbmc)
    with pytest.raises(ValueError, match="reference has no .obs\\['cell_type'\\]"):
        si.tl.transfer_labels(query, reference, label_key="cell_type", use_rep="X_pca")
    with pytest.raises(ValueError, match="AnnData to label has no .obsm\\['X_scinfl'\\]"):
        si.tl.transfer_labels(query, reference, label_key="bulk_labels")
    reference.obsm["X_small"] = reference.obsm["X_pca"][:, :5]
    query.obsm["X_small"] = query.obsm["X_pca"][:, :6]
    with pytest.raises(ValueError, match="same model"):
        si.tl.transfer_labels(query, reference, label_key="bulk_labels", use_rep="X_small")
    reference.obs["empty"] = pd.Series(np.nan, index=reference.obs_names, dtype=object)
    with pytest.raises(ValueError, match="no cell with a label"):
        si.tl.transfer_labels(query, reference, label_key="empty", use_rep="X_pca")
    assert "bulk_labels_transferred" not in query.obs
