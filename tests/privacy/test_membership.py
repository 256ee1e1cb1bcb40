"""Membership inference: loss threshold and reference-model scores, on hand-made and real PBMC models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import expit

from scinfl.privacy.membership import (
    lira_scores,
    logit_confidence,
    loss_scores,
    reference_model_scores,
    rmia_scores,
    split_inclusion,
    true_label_confidence,
)
from scinfl.privacy.metrics import membership_metrics


def _auc(scores: np.ndarray, member: np.ndarray) -> float:
    return membership_metrics(scores[member], scores[~member])["auc"]


def _hand_made(effect: float, *, n: int = 400, n_models: int = 8, seed: int = 0):
    """True-label probabilities of a target and reference models, with cells of very different difficulty.

    Each cell has its own typical logit-confidence (some cells are easy, some hard); training on a cell adds
    ``effect`` to it. A raw loss threshold mostly sees difficulty; reference models calibrate it away.
    """
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(2.0, 2.0, n)
    included = split_inclusion(n_models, n, seed=seed)
    reference = expit(difficulty + effect * included + rng.normal(0.0, 0.3, (n_models, n)))
    member = rng.random(n) < 0.5
    target = expit(difficulty + effect * member + rng.normal(0.0, 0.3, n))
    return target, reference, included, member


# --- building blocks ------------------------------------------------------------------------------------


def test_loss_scores_are_minus_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(7, 4)
    x = torch.arange(7.0)[:, None]  # row i -> logits[i]
    y = torch.tensor([0, 3, 1, 1, 2, 0, 3])

    def predict_proba(batch):
        return torch.softmax(logits[batch[:, 0].long()], dim=1)

    expected = -F.cross_entropy(logits, y, reduction="none").double().numpy()
    np.testing.assert_allclose(loss_scores(predict_proba, x, y), expected, rtol=1e-5)
    np.testing.assert_allclose(loss_scores(predict_proba, x, y.numpy(), batch_size=3), expected, rtol=1e-5)
    np.testing.assert_allclose(true_label_confidence(predict_proba, x, y), np.exp(expected), rtol=1e-5)
    # a probability that underflowed to 0 still gives a finite, very low score
    assert np.isfinite(loss_scores(lambda b: torch.tensor([[1.0, 0.0]]), x[:1], [1])[0])
    with pytest.raises(ValueError, match="one label per row"):
        loss_scores(predict_proba, x, y[:3])


def test_logit_confidence_by_hand():
    np.testing.assert_allclose(logit_confidence([0.5, 0.75, 0.1]), [0.0, np.log(3.0), -np.log(9.0)])
    saturated = logit_confidence([0.0, 1.0])
    assert np.all(np.isfinite(saturated))
    assert saturated[0] < -20 < 20 < saturated[1]


def test_split_inclusion_puts_every_candidate_in_half_of_the_models():
    included = split_inclusion(8, 1000, seed=0)
    assert included.shape == (8, 1000)
    assert included.dtype == bool
    np.testing.assert_array_equal(included.sum(axis=0), 4)
    assert np.all(np.abs(included.mean(axis=1) - 0.5) < 0.06)  # each model sees about half
    assert not np.array_equal(included, split_inclusion(8, 1000, seed=1))
    with pytest.raises(ValueError, match="at least 2"):
        split_inclusion(1, 10)


# --- reference-model attacks on hand-made probabilities -------------------------------------------------


def test_reference_model_attacks_calibrate_away_difficulty():
    """Members are more confident, but cell difficulty dominates: reference models must see through it."""
    target, reference, included, member = _hand_made(effect=1.0)
    scores = reference_model_scores(target, reference, included)
    loss_auc = _auc(np.log(target), member)
    assert loss_auc < 0.75  # measured 0.68: the loss threshold mostly sees difficulty
    for name, values in scores.items():
        assert values.shape == target.shape
        assert np.all(np.isfinite(values))
        assert _auc(values, member) > 0.9, name  # measured lira_online 0.99, lira_offline 0.99, rmia 0.96
        assert _auc(values, member) > loss_auc + 0.2, name
    offline_rmia = rmia_scores(target, reference, included, online=False)
    assert _auc(offline_rmia, member) > 0.85  # measured 0.93


def test_reference_model_attacks_are_at_chance_when_training_changes_nothing():
    target, reference, included, member = _hand_made(effect=0.0, n=2000)
    for name, values in reference_model_scores(target, reference, included).items():
        assert _auc(values, member) == pytest.approx(0.5, abs=0.05), name


def test_lira_variance_choice_and_many_models():
    target, reference, included, member = _hand_made(effect=1.0, n_models=64)
    per_example = lira_scores(target, reference, included, variance="per_example")
    np.testing.assert_array_equal(lira_scores(target, reference, included), per_example)  # 32 per side: auto
    assert _auc(per_example, member) > 0.9  # measured 0.99
    few = _hand_made(effect=1.0, n_models=8)
    np.testing.assert_array_equal(
        lira_scores(*few[:3]), lira_scores(*few[:3], variance="global")
    )  # 4 per side: a shared variance
    assert not np.allclose(lira_scores(*few[:3], variance="per_example"), lira_scores(*few[:3]))
    with pytest.raises(ValueError, match="variance"):
        lira_scores(*few[:3], variance="median")


def test_lira_by_hand_with_global_variance():
    # One candidate, IN models at logit 2 and 4 (mean 3), OUT models at 0 and 2 (mean 1): pooled variance
    # from the four deviations of +-1 over 2 degrees of freedom = 2.
    included = np.array([[True], [True], [False], [False]])
    reference = expit(np.array([[2.0], [4.0], [0.0], [2.0]]))
    target = expit(np.array([2.5]))
    online = lira_scores(target, reference, included)
    # log N(2.5; 3, 2) - log N(2.5; 1, 2) = ((2.5 - 1)^2 - (2.5 - 3)^2) / (2 * 2)
    assert online[0] == pytest.approx((1.5**2 - 0.5**2) / 4)
    offline = lira_scores(target, reference, included, online=False)
    assert offline[0] == pytest.approx((2.5 - 1.0) / np.sqrt(2.0))  # OUT deviations only: variance 2 / 1


def test_lira_candidates_missing_a_side_borrow_the_average_shift():
    target, reference, included, member = _hand_made(effect=1.0)
    included = included.copy()
    included[:, 0] = False  # candidate 0: no IN model
    included[:, 1] = True  # candidate 1: no OUT model
    scores = lira_scores(target, reference, included)
    assert np.all(np.isfinite(scores))
    assert _auc(scores, member) > 0.9
    with pytest.raises(ValueError, match="OUT"):
        lira_scores(target, reference, included, online=False)


def test_offline_attacks_work_when_no_reference_model_saw_the_candidates():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(2.0, 2.0, 400)
    member = rng.random(400) < 0.5
    target = expit(difficulty + 1.0 * member + rng.normal(0.0, 0.3, 400))
    out_only = expit(difficulty + rng.normal(0.0, 0.3, (4, 400)))  # trained on other cells only
    assert _auc(lira_scores(target, out_only, None, online=False), member) > 0.9  # measured 0.99
    assert _auc(rmia_scores(target, out_only, None, online=False), member) > 0.85  # measured 0.93
    with pytest.raises(ValueError, match="included"):
        lira_scores(target, out_only, None, online=True)


def test_rmia_by_hand_and_explicit_population():
    # two models, all candidates seen by half of them; marginal p(x) = mean over both models (online)
    reference = np.array([[0.8, 0.5, 0.2], [0.4, 0.5, 0.6]])
    included = np.array([[True, False, True], [False, True, False]])
    target = np.array([0.9, 0.25, 0.4])
    # ratios: 0.9 / 0.6 = 1.5, 0.25 / 0.5 = 0.5, 0.4 / 0.4 = 1.0 -> fraction of candidates each dominates
    np.testing.assert_allclose(rmia_scores(target, reference, included), [2 / 3, 0.0, 1 / 3])
    # gamma = 2.5: only 1.5 / 0.5 = 3 clears it (1.0 / 0.5 = 2 and 1.5 / 1.0 do not)
    np.testing.assert_allclose(rmia_scores(target, reference, included, gamma=2.5), [1 / 3, 0.0, 0.0])
    same = rmia_scores(
        target,
        reference,
        included,
        population_target_confidence=target,
        population_reference_confidences=reference,
    )
    np.testing.assert_allclose(same, [2 / 3, 0.0, 1 / 3])
    # offline, a = 0.5: p(x) = (1.5 * p_out + 0.5) / 2 with p_out the OUT model's value: .4, .8, .6
    offline = rmia_scores(target, reference, included, online=False, offline_a=0.5)
    ratios = target / ((1.5 * np.array([0.4, 0.8, 0.6]) + 0.5) / 2)
    np.testing.assert_allclose(offline, [(ratios < r).mean() for r in ratios])
    with pytest.raises(ValueError, match="probabilities"):
        rmia_scores(target * 2, reference, included)
    with pytest.raises(ValueError, match="shape"):
        rmia_scores(target, reference, included[:, :2])


# --- real data: a small model overfit on PBMCs ----------------------------------------------------------


def _fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, *, seed: int, epochs: int = 300):
    """Full-batch Adam on a linear softmax classifier: memorises 40 cells."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 10)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return lambda batch: torch.softmax(model(batch), dim=1)


@pytest.fixture
def pbmc_tensors(pbmc):
    x = torch.from_numpy(pbmc.raw.X.toarray().astype(np.float32))
    y = torch.from_numpy(pbmc.obs["bulk_labels"].cat.codes.to_numpy().astype(np.int64))
    return x, y


def test_loss_threshold_detects_members_of_an_overfit_model(pbmc_tensors):
    x, y = pbmc_tensors
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    members, nonmembers = order[:40], order[40:80]
    predict_proba = _fit_logistic_regression(x[members], y[members], seed=0)
    result = membership_metrics(
        loss_scores(predict_proba, x[members], y[members]),
        loss_scores(predict_proba, x[nonmembers], y[nonmembers]),
    )
    assert result["auc"] > 0.75  # measured 0.98 (0.86-0.99 over 5 splits)
    assert result["tpr_at_1pct_fpr"] > 0.2  # measured 0.72 (0.2-0.72)


def test_lira_with_real_reference_models(pbmc_tensors):
    """The whole protocol with trained models: 80 candidates, 8 reference models on random halves."""
    x, y = pbmc_tensors
    rng = np.random.default_rng(0)
    candidates = torch.from_numpy(rng.permutation(len(x))[:80])
    member = np.arange(80) < 40
    target = _fit_logistic_regression(x[candidates[member]], y[candidates[member]], seed=0)
    included = split_inclusion(8, 80, seed=0)
    references = [
        _fit_logistic_regression(x[candidates[row]], y[candidates[row]], seed=100 + k)
        for k, row in enumerate(included)
    ]
    xc, yc = x[candidates], y[candidates]
    target_confidence = true_label_confidence(target, xc, yc)
    reference_confidences = np.stack([true_label_confidence(r, xc, yc) for r in references])
    scores = reference_model_scores(target_confidence, reference_confidences, included)
    assert _auc(scores["lira_online"], member) > 0.9  # measured 0.99 (0.98-1.0 over 4 splits)
    assert _auc(scores["lira_offline"], member) > 0.8  # measured 0.97 (0.91-0.97)
    # RMIA works on raw probabilities, which saturate for a memorising model: weaker here (measured 0.80)
    assert _auc(scores["rmia"], member) > 0.65
