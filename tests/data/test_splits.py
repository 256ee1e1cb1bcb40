"""Index splits that survive label skew: stratified_split (held-out and validation cells) and
dirichlet_partition (label-skewed simulated sites)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from scinfl.data import dirichlet_partition, stratified_split

LABEL = "bulk_labels"


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
