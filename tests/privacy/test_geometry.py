"""Geometry matching on real PBMCs: leaked vectors read without the key, by their shape alone.

Positive controls: victims' cells leak through a secret invertible linear map (a random one, the hardened
scheme's own ``T^{-T} x``, a projection to fewer dimensions), and matching the geometry of the leaked set
to a public cohort beats every prior. Negative controls: random vectors, and the right geometry with the
victims' identities scrambled, score at the priors and at chance. Every figure in a comment was measured
on this split (230 victims, 470 public cells).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

import scinfl as si
from scinfl.nn.hardened import HardenedLayout, derive_hardened_key
from scinfl.privacy.geometry import (
    entropic_gromov_wasserstein,
    geometry_attack,
    geometry_distances,
    infer_cell_types,
    linkage_ranks,
    linkage_summary,
    match_geometry,
    reconstruct,
    reconstruction_similarity,
)

N_VICTIMS = 230  # of 700 cells: about one of three sites; the other 470 are the public cohort
FIXED_KEY = si.FederationKey(bytes(range(32)), scheme="hardened")


@pytest.fixture(scope="module")
def cells(_pbmc) -> dict[str, np.ndarray]:
    """Log-normalised expression (700 x 765) and cell types, split into victims and a public cohort."""
    x = _pbmc.raw.X.toarray().astype(np.float64)
    labels = _pbmc.obs["bulk_labels"].to_numpy().astype(str)
    order = np.random.default_rng(0).permutation(len(x))
    victims, public = order[:N_VICTIMS], order[N_VICTIMS:]
    return {
        "x": x,
        "labels": labels,
        "victims": victims,
        "truth": x[victims],
        "truth_labels": labels[victims],
        "public": x[public],
        "public_labels": labels[public],
    }


def _haar(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def _inverse_transpose_leak(truth: np.ndarray, gain: float, seed: int) -> np.ndarray:
    """``T^{-T} x`` for every cell, ``T = Q1 diag(g) Q2`` with gains log-uniform in ``[1/gain, gain]``.

    What a first-layer gradient ratio reveals of a cell under a secret invertible input map ``T`` (rows
    here: ``x^T T^{-1}``). The gains make it non-orthogonal, so distances are distorted, not kept.
    """
    rng = np.random.default_rng(seed)
    n = truth.shape[1]
    transform = (_haar(rng, n) * np.exp(rng.uniform(-np.log(gain), np.log(gain), n))) @ _haar(rng, n)
    return truth @ np.linalg.inv(transform)


def _hardened_leak(cells: np.ndarray) -> np.ndarray:
    """What the hardened scheme's first-layer gradient ratio reveals: ``T^{-T} x`` (its key-derived mixing)."""
    layout = HardenedLayout(in_features=(cells.shape[1], 64), n_outputs=10)
    key = derive_hardened_key(FIXED_KEY.derive, layout)
    return key.weight_gradient_input(0, torch.from_numpy(cells).float()).double().numpy()


def _attack(cells, leaked, *, truth=None, truth_labels=None, linkage: bool = False) -> dict[str, float]:
    return geometry_attack(
        leaked,
        cells["public"],
        cells["public_labels"],
        truth=cells["truth"] if truth is None else truth,
        truth_labels=cells["truth_labels"] if truth_labels is None else truth_labels,
        pool=cells["x"] if linkage else None,
        pool_index=cells["victims"] if linkage else None,
    )


# --- Gromov-Wasserstein itself ------------------------------------------------------------------------------


def test_gromov_wasserstein_recovers_a_permutation_of_rotated_cells(cells):
    """The same 200 real cells, shuffled, rotated, rescaled and shifted: GW matches every cell to itself."""
    rng = np.random.default_rng(1)
    a = cells["public"][:200]
    shuffle = rng.permutation(200)
    rotation = _haar(rng, a.shape[1])
    b = 3.0 * a[shuffle] @ rotation + 1.0

    # Distances over all 765 genes concentrate (every pair of cells is far apart), so matching them exactly
    # needs a sharper coupling than the default: at epsilon 3e-3 only 35% of the cells came out right.
    coupling = entropic_gromov_wasserstein(cdist(a, a), cdist(b, b), epsilon=3e-4)
    np.testing.assert_allclose(coupling.sum(axis=1), 1 / 200, rtol=1e-4)
    np.testing.assert_allclose(coupling.sum(axis=0), 1 / 200, rtol=1e-4)
    # row i of a is row argsort(shuffle)[i] of b
    recovered = np.mean(coupling.argmax(axis=1) == np.argsort(shuffle))
    assert recovered > 0.95  # measured 1.0
    # the same through the leaked-vector path (PCA and cosine distances in each space), default epsilon
    recovered = np.mean(match_geometry(a, b).argmax(axis=1) == np.argsort(shuffle))
    assert recovered > 0.9  # measured 1.0


def test_gromov_wasserstein_keeps_given_marginals_and_rejects_bad_input():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(30, 3))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    p = rng.uniform(0.5, 2.0, 30)
    q = rng.uniform(0.5, 2.0, 30)
    coupling = entropic_gromov_wasserstein(distances, distances, p, q, epsilon=1e-2)
    np.testing.assert_allclose(coupling.sum(axis=1), p / p.sum(), rtol=1e-4)
    np.testing.assert_allclose(coupling.sum(axis=0), q / q.sum(), rtol=1e-4)
    assert np.all(coupling >= 0)
    with pytest.raises(ValueError, match="symmetric"):
        entropic_gromov_wasserstein(distances + np.triu(distances), distances)
    with pytest.raises(ValueError, match="positive"):
        entropic_gromov_wasserstein(distances, distances, np.zeros(30))
    with pytest.raises(ValueError, match="square"):
        entropic_gromov_wasserstein(distances[:, :5], distances)
    with pytest.raises(ValueError, match="no geometry"):
        entropic_gromov_wasserstein(np.zeros((4, 4)), distances)


def test_geometry_distances_ignore_the_space_the_cells_are_in(cells):
    """Rotating the cells does not change what GW sees; a per-cell scale does not change cosine distances."""
    a = cells["public"][:100]
    rotation = _haar(np.random.default_rng(2), a.shape[1])
    reference = geometry_distances(a)
    assert reference.shape == (100, 100)
    np.testing.assert_array_equal(np.diag(reference), 0.0)
    np.testing.assert_allclose(geometry_distances(a @ rotation), reference, atol=1e-8)
    cosine = geometry_distances(a, metric="cosine")
    np.testing.assert_allclose(geometry_distances(a @ rotation, metric="cosine"), cosine, atol=1e-9)
    # centred on the set's mean, so a per-cell scale is not exactly absorbed: compare the rankings
    scaled = geometry_distances(a * np.random.default_rng(3).uniform(0.9, 1.1, (100, 1)), metric="cosine")
    assert np.corrcoef(scaled.ravel(), cosine.ravel())[0, 1] > 0.99
    with pytest.raises(ValueError, match="metric"):
        geometry_distances(a, metric="manhattan")


# --- the attacks on their own -------------------------------------------------------------------------------


def test_cell_types_and_reconstruction_read_the_coupling():
    coupling = np.array([[0.3, 0.1, 0.1], [0.0, 0.2, 0.3]])
    predicted, probabilities, classes = infer_cell_types(coupling, np.array(["a", "b", "b"]))
    np.testing.assert_array_equal(classes, ["a", "b"])
    np.testing.assert_array_equal(predicted, ["a", "b"])
    np.testing.assert_allclose(probabilities, [[0.6, 0.4], [0.0, 1.0]])
    public = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    np.testing.assert_allclose(reconstruct(coupling, public), [[1.0, 0.6], [1.2, 1.6]])
    with pytest.raises(ValueError, match="one label per public cell"):
        infer_cell_types(coupling, ["a", "b"])


def test_linkage_ranks_count_ties_against_the_attacker():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.2], [0.3, 0.8, 0.1]])
    ranks = linkage_ranks(scores, [0, 1, 0])
    np.testing.assert_array_equal(ranks, [1, 3, 2])  # a constant score ranks the victim last
    summary = linkage_summary(ranks, n_pool=3)
    assert summary["top1"] == pytest.approx(1 / 3)
    assert summary["top1_x_chance"] == pytest.approx(1.0)
    assert summary["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert summary["mrr_chance"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    with pytest.raises(ValueError, match="outside the pool"):
        linkage_ranks(scores, [0, 1, 3])


def test_reconstruction_similarity_is_the_mean_subtracted_pearson(cells):
    public_mean = cells["public"].mean(axis=0)
    estimates, pool = cells["truth"][:3], cells["public"][:5]
    similarity = reconstruction_similarity(estimates, pool, public_mean)
    expected = np.corrcoef(estimates - public_mean, pool - public_mean)[:3, 3:]
    np.testing.assert_allclose(similarity, expected, atol=1e-12)


# --- positive controls: the attack beats the priors ---------------------------------------------------------


def test_attack_beats_the_priors_through_a_secret_invertible_mixing(cells):
    leaked = _inverse_transpose_leak(cells["truth"], gain=4.0, seed=0)
    result = _attack(cells, leaked, linkage=True)
    # cell types: measured 0.74 against 0.31 for the majority class
    assert result["celltype_majority"] == pytest.approx(0.309, abs=1e-3)
    assert result["celltype_accuracy"] > result["celltype_majority"] + 0.3
    # reconstruction: measured 0.462, above the mean profile of the victim's *true* type (0.433)
    assert result["pearson_minus_mean"] > 0.4
    assert result["pearson_minus_mean"] > result["prior_celltype_pearson_minus_mean"]
    assert result["pearson"] > result["prior_public_mean_pearson"] + 0.05  # measured 0.69 vs 0.58
    # linkage in a pool of all 700 cells, by the coupling with the pool: measured top-1 0.13 (88x chance)
    assert result["linkage_geometry_top1_x_chance"] > 50
    assert result["linkage_geometry_mrr_x_chance"] > 15  # measured 23
    # by the reconstruction's similarity: weak (a smoothed profile), measured MRR 3.6x chance
    assert result["linkage_reconstruction_mrr_x_chance"] > 2


def test_attack_reads_the_hardened_schemes_leak(cells):
    """The hardened scheme's own first-layer leak ``T^{-T} x`` (key-derived block mixing, gains up to 4x)."""
    result = _attack(cells, _hardened_leak(cells["truth"]))
    assert result["celltype_accuracy"] > result["celltype_majority"] + 0.3  # measured 0.70 vs 0.31
    assert result["pearson_minus_mean"] > result["prior_celltype_pearson_minus_mean"]  # 0.458 vs 0.433


def test_attack_survives_a_change_of_dimension(cells):
    """The leaked space need not be the gene space: a random projection to 256 dimensions."""
    rng = np.random.default_rng(3)
    leaked = cells["truth"] @ rng.normal(size=(cells["truth"].shape[1], 256)) / 16.0
    predicted, _, _ = infer_cell_types(match_geometry(leaked, cells["public"]), cells["public_labels"])
    assert np.mean(predicted == cells["truth_labels"]) > 0.6  # measured 0.72 (majority 0.31)


def test_a_site_with_its_own_cell_type_mix_needs_the_mix(pbmc, pbmc_sites):
    """A label-skewed site (two thirds dendritic cells) against the other sites as the public cohort.

    With uniform public weights the coupling must spread the site's mass like the public cohort's, and
    matches clusters wrongly: no better than the majority class. Given the site's cell-type proportions
    (here the true ones: how well an attacker could do who estimated them), the attack works again.
    """
    x = pbmc.raw.X.toarray().astype(np.float64)
    labels = pbmc.obs["bulk_labels"].to_numpy().astype(str)
    site = np.flatnonzero(pbmc.obs_names.isin(pbmc_sites["site_2"].obs_names))
    public = np.setdiff1d(np.arange(len(x)), site)
    leaked = _hardened_leak(x[site])
    # The uniform coupling never settles (it runs to max_iter): 100 steps rather than 200 keep this fast.
    uniform = geometry_attack(leaked, x[public], labels[public], truth_labels=labels[site], max_iter=100)
    assert uniform["gw_steps"] == 100
    assert uniform["celltype_accuracy"] < uniform["celltype_majority"] + 0.1  # measured 0.19 vs 0.15

    types, counts = np.unique(labels[site], return_counts=True)
    share = dict(zip(types, counts / counts.sum(), strict=True))
    public = public[np.isin(labels[public], types)]  # a type absent from the site gets no mass
    public_types, public_counts = np.unique(labels[public], return_counts=True)
    per_cell = dict(zip(public_types, public_counts, strict=True))
    weights = np.array([share[label] / per_cell[label] for label in labels[public]])
    informed = geometry_attack(
        leaked, x[public], labels[public], truth_labels=labels[site], public_weights=weights, max_iter=100
    )
    assert informed["celltype_accuracy"] > 0.6  # measured 0.80
    assert informed["celltype_accuracy"] > uniform["celltype_accuracy"] + 0.4


# --- negative controls: at the priors and at chance ---------------------------------------------------------


def test_random_vectors_reveal_nothing(cells):
    # 100 victims: with no geometry to match GW runs to its step limit, and this keeps the test fast
    truth, truth_labels = cells["truth"][:100], cells["truth_labels"][:100]
    leaked = np.random.default_rng(4).normal(size=truth.shape)
    result = _attack(cells, leaked, truth=truth, truth_labels=truth_labels)
    assert result["celltype_accuracy"] < result["celltype_majority"]  # measured 0.19 vs 0.33
    assert abs(result["pearson_minus_mean"]) < 0.1  # measured -0.009
    assert result["pearson_minus_mean"] < result["prior_celltype_pearson_minus_mean"] - 0.3


def test_scrambled_identities_reveal_nothing(cells):
    """The right geometry (the mixed victims), but leaked vector i is not victim i: every metric at chance.

    Guards against a metric that rewards matching the cohort's composition rather than the victim.
    """
    leaked = _inverse_transpose_leak(cells["truth"], gain=4.0, seed=0)
    leaked = leaked[np.random.default_rng(5).permutation(len(leaked))]
    result = _attack(cells, leaked, linkage=True)
    assert result["celltype_accuracy"] < result["celltype_majority"]  # measured 0.20 vs 0.31
    assert abs(result["pearson_minus_mean"]) < 0.1  # measured -0.006
    # A scrambled vector still points at cells of its own type, which is the victim's in about 1 case of 5:
    # slightly above a random ranking (measured 1.4x), far below the real linkage (23x).
    assert result["linkage_geometry_mrr_x_chance"] < 2
    assert result["linkage_reconstruction_mrr_x_chance"] < 2  # measured 0.8
    assert result["linkage_geometry_top1_x_chance"] < 10  # at most 3 of 230 victims first by luck; measured 1
