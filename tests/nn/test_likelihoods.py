"""Per-cell reconstruction losses (scinfl.nn.likelihoods) against the formulas, computed here in float64 numpy
on real PBMC profiles and counts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from scinfl.nn.likelihoods import LIKELIHOODS, cell_losses, clr, read_counts


@pytest.fixture(scope="module")
def counts(_pbmc) -> np.ndarray:
    """40 PBMCs x 765 genes of counts-like integers (the log-normalised .raw values undone and rounded)."""
    return np.rint(np.expm1(_pbmc.raw.X[:40].toarray().astype(np.float64)))


@pytest.fixture(scope="module")
def lognorm(_pbmc) -> np.ndarray:
    return _pbmc.raw.X[:40].toarray().astype(np.float64)


def _output(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, size=shape)


def _losses(likelihood, output: np.ndarray, target: np.ndarray, measured=None) -> np.ndarray:
    mask = None if measured is None else torch.from_numpy(np.asarray(measured))
    out = cell_losses(likelihood, torch.from_numpy(output), torch.from_numpy(target), mask)
    assert out.shape == (len(target),)  # one loss per cell
    return out.numpy()


def _poisson_by_hand(output: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mean over genes of rate - x log(rate), rate = softmax(output) * library size."""
    log_share = output - output.max(axis=1, keepdims=True)
    log_share -= np.log(np.exp(log_share).sum(axis=1, keepdims=True))
    log_rate = log_share + np.log(x.sum(axis=1, keepdims=True))
    return (np.exp(log_rate) - x * log_rate).mean(axis=1)


def _clr_by_hand(x: np.ndarray) -> np.ndarray:
    logged = np.log1p(x)
    return logged - logged.mean(axis=1, keepdims=True)


def test_gaussian_is_the_per_cell_mean_squared_error(lognorm):
    output = lognorm + _output(lognorm.shape) * 0.3
    expected = ((output - lognorm) ** 2).mean(axis=1)
    np.testing.assert_allclose(_losses("gaussian", output, lognorm), expected, rtol=1e-12)
    assert np.all(_losses("gaussian", lognorm, lognorm) == 0.0)


def test_poisson_is_the_nll_of_softmax_shares_times_library_size(counts):
    assert counts.sum(axis=1).min() > 100  # real cells: every library is large
    output = _output(counts.shape)
    np.testing.assert_allclose(
        _losses("poisson", output, counts), _poisson_by_hand(output, counts), rtol=1e-10
    )
    # shares are a softmax: shifting a cell's logits by a constant changes nothing
    shifted = output + np.arange(len(output))[:, None]
    np.testing.assert_allclose(
        _losses("poisson", shifted, counts), _losses("poisson", output, counts), rtol=1e-10
    )


def test_poisson_is_smallest_at_the_observed_shares(counts):
    """At logits log(x / library) the rates are the counts themselves: no other output does better."""
    x = counts + 1.0  # every share positive, so that its log exists
    best = np.log(x / x.sum(axis=1, keepdims=True))
    at_best = _losses("poisson", best, x)
    np.testing.assert_allclose(at_best, (x - x * np.log(x)).mean(axis=1), rtol=1e-10)
    for seed in range(3):
        assert np.all(_losses("poisson", best + 0.1 * _output(x.shape, seed), x) > at_best)
    logits = torch.from_numpy(best).requires_grad_(True)
    cell_losses("poisson", logits, torch.from_numpy(x)).sum().backward()
    assert logits.grad.abs().max() < 1e-10  # a minimum


def test_clr_transforms_the_target_then_mean_squared_error(counts):
    np.testing.assert_allclose(clr(torch.from_numpy(counts)).numpy(), _clr_by_hand(counts), rtol=1e-12)
    np.testing.assert_allclose(clr(torch.from_numpy(counts)).numpy().mean(axis=1), 0.0, atol=1e-12)
    output = _output(counts.shape)
    expected = ((output - _clr_by_hand(counts)) ** 2).mean(axis=1)
    np.testing.assert_allclose(_losses("clr", output, counts), expected, rtol=1e-12)
    assert np.allclose(_losses("clr", _clr_by_hand(counts), counts), 0.0, atol=1e-20)


def test_what_the_network_reads(counts):
    x = torch.from_numpy(counts)
    np.testing.assert_allclose(read_counts(x, "poisson").numpy(), np.log1p(counts), rtol=1e-12)
    np.testing.assert_allclose(read_counts(x, "clr").numpy(), _clr_by_hand(counts), rtol=1e-12)
    assert read_counts(x, "gaussian") is x


@pytest.mark.parametrize("likelihood", [likelihood for likelihood in LIKELIHOODS if likelihood != "nb"])
def test_measured_features_are_the_only_ones_scored(counts, lognorm, likelihood):
    """A site of a join='outer' federation zero-fills the genes it does not measure: they are not zeros of
    expression, so neither their outputs nor their zeros count (Poisson shares: over the measured genes)."""
    target = lognorm if likelihood == "gaussian" else counts
    measured = np.zeros(target.shape[1], dtype=bool)
    measured[np.random.default_rng(1).choice(target.shape[1], 500, replace=False)] = True
    output = _output(target.shape)
    masked = _losses(likelihood, output, target, measured)
    # what the same loss gives a site whose panel is just the measured genes
    np.testing.assert_allclose(
        masked, _losses(likelihood, output[:, measured], target[:, measured]), rtol=1e-12
    )
    by_hand = {
        "gaussian": lambda o, x: ((o - x) ** 2).mean(axis=1),
        "poisson": _poisson_by_hand,
        "clr": lambda o, x: ((o - _clr_by_hand(x)) ** 2).mean(axis=1),
    }[likelihood]
    np.testing.assert_allclose(masked, by_hand(output[:, measured], target[:, measured]), rtol=1e-10)
    # zero-filling the unmeasured genes and changing their outputs changes nothing
    filled, other = target.copy(), output.copy()
    filled[:, ~measured] = 0.0
    other[:, ~measured] = _output((len(target), int((~measured).sum())), seed=2) * 5
    np.testing.assert_allclose(_losses(likelihood, other, filled, measured), masked, rtol=1e-12)
    # ... whereas without the mask they count
    assert not np.allclose(_losses(likelihood, other, filled), masked)
    # all measured: the unmasked loss
    np.testing.assert_array_equal(
        _losses(likelihood, output, target, np.ones(target.shape[1], dtype=bool)),
        _losses(likelihood, output, target),
    )


def test_unknown_likelihood_raises(counts):
    x = torch.from_numpy(counts)
    with pytest.raises(
        ValueError, match=r"likelihood must be one of 'gaussian', 'poisson', 'nb', 'clr', got 'zinb'"
    ):
        cell_losses("zinb", x, x)


def _nb_by_hand(output: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mean over genes of -log NB(x | mu, theta), mu = softmax(logits) * library size, from scipy (n = theta,
    p = theta / (theta + mu)) in float64: a library independent of the torch distribution scinfl uses."""
    logits, log_theta = np.split(output, 2, axis=1)
    log_share = logits - logits.max(axis=1, keepdims=True)
    log_share -= np.log(np.exp(log_share).sum(axis=1, keepdims=True))
    mu = np.exp(log_share) * x.sum(axis=1, keepdims=True)
    theta = np.exp(log_theta)
    return -scipy.stats.nbinom.logpmf(x, theta, theta / (theta + mu)).mean(axis=1)


def _nb_output(shape, log_theta: float | np.ndarray = 0.0, seed: int = 0) -> np.ndarray:
    logits = _output(shape, seed)
    return np.concatenate([logits, np.broadcast_to(log_theta, shape)], axis=1)


def test_negative_binomial_is_the_nll_of_softmax_means_with_a_dispersion_per_gene(counts):
    rng = np.random.default_rng(3)
    output = _nb_output(counts.shape, rng.normal(0.0, 1.0, counts.shape[1]))
    np.testing.assert_allclose(_losses("nb", output, counts), _nb_by_hand(output, counts), rtol=1e-9)
    # the whole negative log-likelihood, log(x!) included: positive, as a probability is at most 1
    assert (_losses("nb", output, counts) > 0).all()
    # a huge inverse dispersion is a Poisson (whose loss leaves out log(x!), as torch's poisson_nll_loss)
    poisson = _losses("poisson", output[:, : counts.shape[1]], counts)
    log_factorial = scipy.special.gammaln(counts + 1).mean(axis=1)
    nearly = _losses("nb", _nb_output(counts.shape, 20.0), counts)  # theta = 5e8
    np.testing.assert_allclose(nearly, poisson + log_factorial, rtol=1e-5)
    # real cells vary around their cohort's mean shares more than a Poisson allows: with the cohort's
    # shares as every cell's mean, a dispersion (theta = 1) scores the counts better than a Poisson
    x = counts
    shares = x.sum(axis=0) / x.sum() + 1e-6
    best = np.broadcast_to(np.log(shares), x.shape)
    at_poisson = _losses("nb", np.concatenate([best, np.full_like(best, 20.0)], axis=1), x)
    at_nb = _losses("nb", np.concatenate([best, np.zeros_like(best)], axis=1), x)
    assert at_nb.mean() < at_poisson.mean()


def test_negative_binomial_scores_measured_features_only(counts):
    measured = np.zeros(counts.shape[1], dtype=bool)
    measured[np.random.default_rng(1).choice(counts.shape[1], 500, replace=False)] = True
    output = _nb_output(counts.shape, np.random.default_rng(4).normal(0, 1, counts.shape[1]))
    masked = _losses("nb", output, counts, measured)
    both = np.concatenate([measured, measured])
    np.testing.assert_allclose(masked, _losses("nb", output[:, both], counts[:, measured]), rtol=1e-12)
    np.testing.assert_allclose(masked, _nb_by_hand(output[:, both], counts[:, measured]), rtol=1e-9)
    filled = counts.copy()
    filled[:, ~measured] = 0.0
    np.testing.assert_allclose(_losses("nb", output, filled, measured), masked, rtol=1e-12)
    assert not np.allclose(_losses("nb", output, filled), masked)
    np.testing.assert_allclose(read_counts(torch.from_numpy(counts), "nb").numpy(), np.log1p(counts))
