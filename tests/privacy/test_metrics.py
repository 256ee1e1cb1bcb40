"""Reconstruction and membership metrics: values by hand, the baselines an attacker gets for free on real PBMCs."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.stats

from scinfl.privacy.metrics import (
    bootstrap_ci,
    membership_metrics,
    pearson,
    prior_baselines,
    reconstruction_metrics,
    spearman,
)


def _cells(adata) -> tuple[np.ndarray, np.ndarray]:
    return adata.raw.X.toarray().astype(np.float64), adata.obs["bulk_labels"].astype(str).to_numpy()


# --- reconstruction metrics ---------------------------------------------------------------------------


def test_reconstruction_metrics_by_hand():
    truth = np.array([0.0, 1.0, 2.0, 3.0])
    reconstructed = np.array([0.0, 1.0, 3.0, 2.0])  # the two top genes swapped
    m = reconstruction_metrics(reconstructed, truth, public_mean=np.ones(4), top_k=2)
    assert m["mse"] == pytest.approx(0.5)  # (0 + 0 + 1 + 1) / 4
    assert m["nmse"] == pytest.approx(0.5 / 3.5)  # mean square of the truth: (0 + 1 + 4 + 9) / 4
    assert m["cosine"] == pytest.approx(13 / 14)  # 0 + 1 + 6 + 6 over sqrt(14) * sqrt(14)
    # centred: (-1.5, -.5, .5, 1.5) . (-1.5, -.5, 1.5, .5) = 4, both norms^2 = 5
    assert m["pearson"] == pytest.approx(0.8)
    assert m["spearman"] == pytest.approx(0.8)  # ranks equal the values here
    assert m["pearson_minus_mean"] == pytest.approx(0.8)  # a constant prior does not change Pearson
    assert m["top2_overlap"] == 1.0  # same two genes, order inside the top set does not matter
    assert reconstruction_metrics(reconstructed, truth, public_mean=None, top_k=1)["top1_overlap"] == 0.0

    # a non-constant prior: deviations (0, 0, 1, 0) vs (0, 0, 0, 1) -> Pearson -1/3
    prior = np.array([0.0, 1.0, 2.0, 2.0])
    assert reconstruction_metrics(reconstructed, truth, public_mean=prior)["pearson_minus_mean"] == (
        pytest.approx(-1 / 3)
    )


def test_spearman_uses_ranks_and_average_ties():
    assert spearman([1.0, 2.0, 3.0, 4.0], [1.0, 10.0, 100.0, 1000.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0, 4.0], [1.0, 10.0, 100.0, 1000.0]) < 0.9
    # ties get average ranks: (1, 2.5, 2.5, 4) vs (1, 2, 3, 4)
    expected = np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
    assert spearman([0.0, 5.0, 5.0, 9.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(expected)


def test_constant_vectors_give_nan_without_warnings():
    truth = np.array([0.0, 1.0, 2.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any RuntimeWarning (0/0) fails the test
        m = reconstruction_metrics(np.full(4, 0.1), truth, public_mean=None)
        assert np.isnan(pearson(np.full(5, 0.1), np.arange(5.0)))  # 0.1 is not exact: no rounding residue
        assert np.isnan(pearson(np.zeros(3), np.zeros(3)))
    assert np.isnan(m["pearson"])
    assert np.isnan(m["spearman"])
    assert m["mse"] == pytest.approx(np.mean((0.1 - truth) ** 2))


def test_missing_inputs_give_nan_and_half_given_reidentification_is_an_error():
    truth = np.array([0.0, 1.0, 2.0, 3.0])
    m = reconstruction_metrics(truth, truth, public_mean=None)
    assert np.isnan(m["pearson_minus_mean"])
    assert np.isnan(m["pearson_minus_celltype_mean"])
    assert np.isnan(m["reidentified"])
    assert m["pearson"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both"):
        reconstruction_metrics(truth, truth, public_mean=None, reference=np.eye(4))
    with pytest.raises(ValueError, match="genes"):
        reconstruction_metrics(truth[:3], truth, public_mean=None)


def test_scale_invariant_mse_forgives_scale_and_offset_but_not_sign():
    truth = np.array([0.0, 0.5, 2.0, 3.5, 1.0])
    assert reconstruction_metrics(3 * truth, truth, public_mean=None)["mse"] == pytest.approx(
        np.mean((2 * truth) ** 2)
    )
    fitted = reconstruction_metrics(
        3 * truth + 1, truth, public_mean=np.full(5, truth.mean()), scale_invariant=True
    )
    assert fitted["mse"] == pytest.approx(0.0, abs=1e-20)
    assert fitted["cosine"] == pytest.approx(1.0)
    assert fitted["pearson_minus_mean"] == pytest.approx(1.0)
    # A flipped reconstruction: the best non-negative scale is 0, leaving the truth's mean level, so the
    # MSE is the truth's variance, not 0.
    flipped = reconstruction_metrics(-truth, truth, public_mean=None, scale_invariant=True)
    assert flipped["mse"] == pytest.approx(np.var(truth))
    assert flipped["pearson"] == pytest.approx(-1.0)


def test_public_mean_flatters_raw_pearson_but_not_mean_subtracted_pearson(pbmc):
    """The baselines on real PBMCs: what an attacker knows before attacking (measured on 100 cells)."""
    x, labels = _cells(pbmc)
    public, public_labels = x[350:], labels[350:]
    public_mean = public.mean(axis=0)
    rows = {"public_mean": [], "celltype_mean": []}
    for victim in range(100):
        celltype_mean = public[public_labels == labels[victim]].mean(axis=0)
        baselines = prior_baselines(
            x[victim],
            public_mean=public_mean,
            celltype_mean=celltype_mean,
            reference=x,
            victim_index=victim,
        )
        for name, metrics in baselines.items():
            rows[name].append(metrics)
    mean = {name: {k: np.nanmean([r[k] for r in rs]) for k in rs[0]} for name, rs in rows.items()}
    # measured: raw Pearson of the mean profile 0.587 (min 0.36) ...
    assert mean["public_mean"]["pearson"] > 0.5
    # ... while it explains none of the cell's deviation from the mean: 0 by definition
    assert all(r["pearson_minus_mean"] == 0.0 for r in rows["public_mean"])
    # the cell type alone explains some of it (measured 0.41): the bar an attack must clear
    assert mean["celltype_mean"]["pearson_minus_mean"] > 0.25
    assert mean["celltype_mean"]["pearson"] > mean["public_mean"]["pearson"]
    # A prior points at one fixed cell (the most typical of the population or of the type), so it can
    # "re-identify" at most that one victim per profile: measured 1 of 100 for the mean, 0 for the types.
    assert sum(r["reidentified"] for r in rows["public_mean"]) <= 1
    assert mean["celltype_mean"]["reidentified"] <= 0.05
    # the mean profile already shares about half of a cell's top-50 genes (measured 0.49)
    assert 0.3 < mean["public_mean"]["top50_overlap"] < 0.7


def test_prior_baselines_without_celltype_mean_are_nan():
    truth = np.array([0.0, 1.0, 2.0, 3.0])
    baselines = prior_baselines(truth, public_mean=np.full(4, 1.5), celltype_mean=None, top_k=2)
    assert set(baselines) == {"public_mean", "celltype_mean"}
    assert all(np.isnan(v) for v in baselines["celltype_mean"].values())
    assert set(baselines["celltype_mean"]) == set(baselines["public_mean"])
    assert baselines["public_mean"]["pearson_minus_mean"] == 0.0


def test_reidentification_finds_an_exact_copy_and_a_noisy_one_but_not_the_mean(pbmc):
    x, _ = _cells(pbmc)
    public_mean = x.mean(axis=0)
    rng = np.random.default_rng(0)
    for victim in (0, 250, 699):
        exact = reconstruction_metrics(
            x[victim], x[victim], public_mean=public_mean, reference=x, victim_index=victim
        )
        assert exact["reidentified"] == 1.0
        noisy = x[victim] + rng.normal(0.0, 0.3, x.shape[1])
        noisy_metrics = reconstruction_metrics(
            noisy, x[victim], public_mean=public_mean, reference=x, victim_index=victim
        )
        assert noisy_metrics["reidentified"] == 1.0
        # the right answer for the wrong victim is a failure
        wrong = reconstruction_metrics(
            x[victim], x[victim], public_mean=public_mean, reference=x, victim_index=(victim + 1) % len(x)
        )
        assert wrong["reidentified"] == 0.0
        mean = reconstruction_metrics(
            public_mean, x[victim], public_mean=public_mean, reference=x, victim_index=victim
        )
        assert mean["reidentified"] == 0.0


def test_reidentification_counts_a_tie_as_a_failure():
    reference = np.array([[0.0, 1.0, 2.0], [0.0, 2.0, 4.0], [3.0, 1.0, 0.0]])  # rows 0 and 1 correlate 1
    m = reconstruction_metrics(
        reference[0], reference[0], public_mean=None, reference=reference, victim_index=0
    )
    assert m["reidentified"] == 0.0
    m = reconstruction_metrics(
        reference[2], reference[2], public_mean=None, reference=reference, victim_index=2
    )
    assert m["reidentified"] == 1.0


# --- bootstrap ------------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_the_mean_narrows_and_has_the_normal_width():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 2.0, 20)
    large = rng.normal(1.0, 2.0, 2000)
    mean_small, low_small, high_small = bootstrap_ci(small)
    mean_large, low_large, high_large = bootstrap_ci(large)
    assert mean_small == pytest.approx(small.mean())
    assert low_small < mean_small < high_small
    assert low_large < mean_large < high_large
    assert high_large - low_large < 0.25 * (high_small - low_small)  # width ~ 1/sqrt(n): 0.1 expected
    # a 95% interval of a mean is about 2 * 1.96 standard errors wide
    expected = 2 * 1.96 * large.std(ddof=1) / np.sqrt(large.size)
    assert high_large - low_large == pytest.approx(expected, rel=0.15)
    _, low_90, high_90 = bootstrap_ci(large, level=0.9)
    assert low_large < low_90 < high_90 < high_large
    assert bootstrap_ci(large, seed=3) != bootstrap_ci(large, seed=4)
    assert bootstrap_ci(large, seed=3) == bootstrap_ci(large, seed=3)


def test_bootstrap_ci_ignores_nan_and_handles_degenerate_input():
    values = np.array([1.0, 2.0, np.nan, 3.0, 4.0])
    assert bootstrap_ci(values) == bootstrap_ci(values[~np.isnan(values)])
    assert all(np.isnan(bootstrap_ci([np.nan, np.nan])))
    assert all(np.isnan(bootstrap_ci([])))
    assert bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(values, level=95)


# --- membership metrics ---------------------------------------------------------------------------------


def test_membership_metrics_on_an_exact_roc_by_hand():
    nonmembers = np.arange(100.0)  # 0 .. 99
    members = np.array([1000.0, 99.5, 99.0, 98.5, 50.0])
    m = membership_metrics(members, nonmembers)
    # per member, the fraction of non-members below it, ties counting 1/2: 1, 1, .995, .99, .505
    assert m["auc"] == pytest.approx((1 + 1 + 0.995 + 0.99 + 0.505) / 5)
    # FPR <= 1% allows one false positive (the non-member at 99): threshold 98.5 catches 4 of 5
    assert m["tpr_at_1pct_fpr"] == pytest.approx(4 / 5)
    # FPR <= 0.1% allows no false positive: threshold 99.5 catches 2 of 5
    assert m["tpr_at_0.1pct_fpr"] == pytest.approx(2 / 5)
    # best TPR - FPR: threshold 98.5 gives 4/5 - 1/100
    assert m["advantage"] == pytest.approx(4 / 5 - 1 / 100)


def test_membership_metrics_perfect_reversed_and_chance():
    perfect = membership_metrics([5.0, 6.0, 7.0], [1.0, 2.0, 3.0])
    assert perfect == {"auc": 1.0, "tpr_at_1pct_fpr": 1.0, "tpr_at_0.1pct_fpr": 1.0, "advantage": 1.0}
    reversed_ = membership_metrics([1.0, 2.0, 3.0], [5.0, 6.0, 7.0])
    assert reversed_["auc"] == 0.0
    assert reversed_["tpr_at_1pct_fpr"] == 0.0
    rng = np.random.default_rng(0)
    chance = membership_metrics(rng.normal(size=5000), rng.normal(size=5000))
    assert chance["auc"] == pytest.approx(0.5, abs=0.03)
    assert chance["tpr_at_1pct_fpr"] == pytest.approx(0.01, abs=0.01)
    ties = membership_metrics(np.zeros(10), np.zeros(10))
    assert ties["auc"] == 0.5
    assert ties["tpr_at_1pct_fpr"] == 0.0  # the only threshold flags everyone: FPR 100%


def test_membership_metrics_reject_nan_and_empty():
    with pytest.raises(ValueError, match="NaN"):
        membership_metrics([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match="at least one"):
        membership_metrics([], [0.0])


def test_the_metrics_are_the_libraries_on_real_cells(pbmc):
    """pearson, bootstrap_ci and membership_metrics call scipy and scikit-learn; checked here against an
    independent computation of each on real PBMC values (numpy's corrcoef, a resampling loop by hand, the
    Mann-Whitney U statistic and a threshold sweep)."""
    cells = pbmc.raw.X[:60].toarray().astype(np.float64)
    for a, b in itertools.pairwise(cells):
        assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    per_cell = cells.mean(axis=1)
    mean, low, high = bootstrap_ci(per_cell, n_boot=400, seed=5)
    rng = np.random.default_rng(5)  # the same draws as scipy's percentile bootstrap
    means = per_cell[rng.integers(0, per_cell.size, size=(400, per_cell.size))].mean(axis=1)
    assert (mean, low, high) == pytest.approx(
        (per_cell.mean(), *np.percentile(means, [2.5, 97.5])), abs=1e-12
    )
    members, nonmembers = cells[:30, 0] + cells[:30, 1], cells[30:, 0] + cells[30:, 1]  # real ties (zeros)
    metrics = membership_metrics(members, nonmembers)
    u = scipy.stats.mannwhitneyu(members, nonmembers).statistic
    assert metrics["auc"] == pytest.approx(u / (members.size * nonmembers.size), abs=1e-12)
    thresholds = np.unique(np.concatenate([members, nonmembers]))
    tpr = np.array([(members >= t).mean() for t in thresholds])
    fpr = np.array([(nonmembers >= t).mean() for t in thresholds])
    assert metrics["advantage"] == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    assert metrics["tpr_at_1pct_fpr"] == pytest.approx(max([0.0, *tpr[fpr <= 0.01]]), abs=1e-12)
