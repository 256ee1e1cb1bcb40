"""Analytic first-layer inversion on real PBMCs, with and without the key, and calibration attacks.

Positive controls: the inversion recovers a real cell exactly from one gradient, and the paper's keyed
layer does not stop it (the key only rescales each row of the gradient). Calibration attacks show that a
key acting as a simple fixed transform of the input (a per-gene gain and offset, an orthogonal mixing of
the genes) is exposed by the many leaked vectors and a public cohort.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scinfl as si
from scinfl.nn import ResidualMLPClassifier, keyify, use_key
from scinfl.privacy.analytic import (
    calibrate_gain_offset,
    calibrate_principal_axes,
    invert_first_layer,
    invert_first_layer_no_bias,
    resolve_sign,
)
from scinfl.privacy.metrics import pearson, reconstruction_metrics

VICTIMS = (0, 123, 456)
# A fixed key, so that the transforms below are the same in every run (any key behaves alike).
FIXED_KEY = si.FederationKey(bytes(range(32)), scheme="infl")


def _cells(adata) -> tuple[np.ndarray, np.ndarray]:
    """Log-normalised expression (700 x 765, float32) and integer cell-type labels."""
    return adata.raw.X.toarray().astype(np.float32), adata.obs["bulk_labels"].cat.codes.to_numpy().astype(
        np.int64
    )


def _first_layer_gradient(network: nn.Module, layer: nn.Linear, cell: np.ndarray, label: int, key=None):
    """The gradient a client would send for one cell: cross-entropy w.r.t. the first layer's parameters."""
    network.eval()  # BatchNorm on running statistics: a single cell is a valid batch
    x = torch.from_numpy(cell)[None]
    with use_key(key):
        loss = F.cross_entropy(network(x), torch.tensor([label]))
    params = [layer.weight] if layer.bias is None else [layer.weight, layer.bias]
    return [g.detach().numpy() for g in torch.autograd.grad(loss, params)]


def _mean_subtracted_pearson(estimates: np.ndarray, truth: np.ndarray, public_mean: np.ndarray) -> float:
    return float(
        np.nanmean([pearson(e - public_mean, t - public_mean) for e, t in zip(estimates, truth, strict=True)])
    )


# --- analytic inversion: positive controls ----------------------------------------------------------------


@pytest.mark.parametrize("victim", VICTIMS)
def test_first_layer_inversion_recovers_a_real_cell_exactly(pbmc, victim):
    x, labels = _cells(pbmc)
    torch.manual_seed(0)
    network = ResidualMLPClassifier(x.shape[1], 10, hidden=64)
    grad_weight, grad_bias = _first_layer_gradient(network, network.embedding[0], x[victim], labels[victim])
    recovered = invert_first_layer(grad_weight, grad_bias)
    m = reconstruction_metrics(
        recovered, x[victim], public_mean=x.mean(axis=0), reference=x, victim_index=victim
    )
    assert m["pearson"] > 0.99  # the acceptance criterion; measured 1 - 1e-15
    assert m["pearson_minus_mean"] > 0.99
    assert m["reidentified"] == 1.0  # singled out among all 700 cells
    # not only the direction: the values themselves (float32 gradients, measured max error 6e-8)
    np.testing.assert_allclose(recovered, x[victim], atol=1e-4)


@pytest.mark.parametrize("victim", VICTIMS)
def test_first_layer_inversion_defeats_the_paper_key(pbmc, victim):
    """The attacker has no key, yet recovers the input: the paper scheme's known weakness, reproduced."""
    x, labels = _cells(pbmc)
    torch.manual_seed(0)
    network = keyify(ResidualMLPClassifier(x.shape[1], 10, hidden=64))
    key = torch.from_numpy(FIXED_KEY.coordinates())
    layer = network.network.embedding[0]
    grad_weight, grad_bias = _first_layer_gradient(network, layer, x[victim], labels[victim], key=key)

    # The key really is in this gradient: each row is the input times its own key factor r_i, and these
    # differ across rows (measured 0.22 to 1.69 here), unlike the keyless gradient where every row gives x.
    active = np.abs(grad_bias) > 1e-4 * np.abs(grad_bias).max()
    row_factors = (grad_weight[active] @ x[victim]) / (grad_bias[active] * (x[victim] @ x[victim]))
    assert row_factors.max() / row_factors.min() > 1.5
    grad_keyless = _first_layer_gradient(network, layer, x[victim], labels[victim], key=None)
    assert not np.allclose(grad_keyless[0], grad_weight)

    recovered = invert_first_layer(grad_weight, grad_bias)
    m = reconstruction_metrics(
        recovered,
        x[victim],
        public_mean=x.mean(axis=0),
        reference=x,
        victim_index=victim,
        scale_invariant=True,
    )
    assert m["pearson"] > 0.99  # measured 1 - 1e-15
    assert m["pearson_minus_mean"] > 0.99
    assert m["reidentified"] == 1.0
    assert m["nmse"] < 1e-6  # after fitting the one unknown scale (measured ~1e-17)


def test_keyed_inversions_of_many_cells_share_nearly_one_scale(pbmc):
    """The key's per-row factors average out over the active rows: leaked cells can be pooled as they are."""
    x, labels = _cells(pbmc)
    torch.manual_seed(0)
    network = keyify(ResidualMLPClassifier(x.shape[1], 10, hidden=64))
    key = torch.from_numpy(FIXED_KEY.coordinates())
    layer = network.network.embedding[0]
    scales, single_row_scales = [], []
    for victim in range(60):
        grad_weight, grad_bias = _first_layer_gradient(network, layer, x[victim], labels[victim], key=key)
        cell = x[victim].astype(np.float64)
        scales.append(invert_first_layer(grad_weight, grad_bias) @ cell / (cell @ cell))
        top = np.argmax(np.abs(grad_bias))
        single_row_scales.append(grad_weight[top] @ cell / (grad_bias[top] * (cell @ cell)))
    scales, single_row_scales = np.array(scales), np.array(single_row_scales)
    # coefficients of variation over the cells
    assert scales.std() / scales.mean() < 0.08  # measured 0.029 (0.026 on 200 cells)
    assert single_row_scales.std() / single_row_scales.mean() > 0.15  # one row's factor: measured 0.25


@pytest.mark.parametrize("keyed", [False, True])
def test_no_bias_inversion_recovers_the_cell_up_to_scale(pbmc, keyed):
    x, labels = _cells(pbmc)
    torch.manual_seed(0)
    plain = ResidualMLPClassifier(x.shape[1], 10, hidden=64)
    plain.embedding[0] = nn.Linear(x.shape[1], 64, bias=False)
    network = keyify(plain) if keyed else plain
    layer = network.network.embedding[0] if keyed else network.embedding[0]
    key = torch.from_numpy(FIXED_KEY.coordinates()) if keyed else None
    victim = VICTIMS[1]
    (grad_weight,) = _first_layer_gradient(network, layer, x[victim], labels[victim], key=key)
    recovered = invert_first_layer_no_bias(grad_weight)
    assert np.linalg.norm(recovered) == pytest.approx(1.0)
    assert pearson(recovered, x[victim]) > 0.99  # sign resolved by non-negativity; measured 1 - 1e-15
    assert pearson(-recovered, x[victim]) < -0.99  # the sign was a real choice
    m = reconstruction_metrics(
        recovered,
        x[victim],
        public_mean=x.mean(axis=0),
        reference=x,
        victim_index=victim,
        scale_invariant=True,
    )
    assert m["reidentified"] == 1.0
    assert m["nmse"] < 1e-6


def test_resolve_sign_prefers_positive_mass():
    cell = np.array([0.0, 3.0, 0.0, 1.0, -0.5])
    np.testing.assert_array_equal(resolve_sign(cell), cell)
    np.testing.assert_array_equal(resolve_sign(-cell), cell)


def test_first_layer_inversion_combines_rows_with_different_scales_and_rejects_dead_layers():
    rng = np.random.default_rng(0)
    x = rng.random(30)
    delta = rng.normal(size=8)
    delta[:3] = 0.0  # inactive units send zero rows
    row_scale = rng.uniform(0.2, 1.8, size=8)  # a keyed layer's r_i
    recovered = invert_first_layer(np.outer(delta * row_scale, x), delta)
    # the input times the mean key factor of the active rows (a plain mean of the rows would weight them)
    np.testing.assert_allclose(recovered, row_scale[3:].mean() * x, rtol=1e-10)
    # a key strength above 1 makes some factors negative: the rows still combine, up to the sign
    row_scale[[3, 5]] *= -1
    recovered = invert_first_layer(np.outer(delta * row_scale, x), delta)
    reference_sign = np.sign(row_scale[np.argmax(np.abs(delta))])
    np.testing.assert_allclose(recovered, reference_sign * np.abs(row_scale[3:]).mean() * x, rtol=1e-10)
    with pytest.raises(ValueError, match="no unit"):
        invert_first_layer(np.zeros((4, 30)), np.zeros(4))
    with pytest.raises(ValueError, match="rows"):
        invert_first_layer(np.zeros((4, 30)), np.ones(3))


# --- calibration attacks: a key that is a simple fixed transform is exposed -------------------------------


def _leaked_and_public(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """200 victims' cells (whose transformed inputs leak) and 300 other cells as the public cohort."""
    order = np.random.default_rng(seed).permutation(len(x))
    return order[:200], x[order[:200]].astype(np.float64), x[order[200:500]].astype(np.float64)


def test_gain_offset_key_is_undone_by_moment_matching(pbmc):
    """A secret per-gene gain and offset in front of the first layer: inversion leaks T(x), calibration x."""
    x, labels = _cells(pbmc)
    victims, truth, public = _leaked_and_public(x)
    gain = np.exp(FIXED_KEY.uniform("test/gain", (x.shape[1],), low=-2.0, high=2.0))  # 0.14 .. 7.4
    offset = FIXED_KEY.uniform("test/offset", (x.shape[1],), low=-3.0, high=3.0)

    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 10))
    transformed_network = nn.Sequential(_FixedAffine(gain, offset), network)
    leaked = np.stack(
        [
            invert_first_layer(*_first_layer_gradient(transformed_network, network[0], x[v], labels[v]))
            for v in victims
        ]
    )
    np.testing.assert_allclose(leaked, truth * gain + offset, atol=1e-3)  # the inversion leaks T(x) exactly

    public_mean = public.mean(axis=0)
    raw = _mean_subtracted_pearson(leaked, truth, public_mean)
    calibrated = calibrate_gain_offset(leaked, public)
    restored = _mean_subtracted_pearson(calibrated, truth, public_mean)
    assert raw < 0.6  # measured 0.44: the transform hides about half of the cell-specific signal ...
    assert restored > 0.97  # ... and moment matching restores it (measured 0.991-0.994 over 5 splits)
    assert np.mean([pearson(c, t) for c, t in zip(calibrated, truth, strict=True)]) > 0.98  # measured 0.995


class _FixedAffine(nn.Module):
    """A key acting as a fixed per-gene transform of the input (what calibration attacks target)."""

    def __init__(self, gain: np.ndarray, offset: np.ndarray) -> None:
        super().__init__()
        self.gain = torch.from_numpy(np.asarray(gain, dtype=np.float32))
        self.offset = torch.from_numpy(np.asarray(offset, dtype=np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain + self.offset


def test_gain_offset_calibration_handles_constant_genes():
    rng = np.random.default_rng(0)
    public = rng.random((50, 4))
    public[:, 3] = 2.0  # constant in the public cohort
    leaked = rng.random((40, 4)) * 5 - 1
    leaked[:, 1] = 7.0  # constant among the leaked vectors: no information
    calibrated = calibrate_gain_offset(leaked, public)
    assert np.all(np.isfinite(calibrated))
    np.testing.assert_allclose(calibrated[:, 1], public[:, 1].mean())
    np.testing.assert_allclose(calibrated[:, 3], 2.0)
    np.testing.assert_allclose(calibrated[:, 0].std(ddof=1), public[:, 0].std(ddof=1))


def _top_axes(public: np.ndarray, k: int) -> np.ndarray:
    return np.linalg.svd(public - public.mean(axis=0), full_matrices=False)[2][:k]


def _top_pc_correlation(
    estimates: np.ndarray, truth: np.ndarray, public: np.ndarray, axes: np.ndarray
) -> float:
    """Mean per-cell Pearson of the coordinates on the public cohort's top principal ``axes``."""
    mean = public.mean(axis=0)
    coordinates = zip((estimates - mean) @ axes.T, (truth - mean) @ axes.T, strict=True)
    return float(np.mean([pearson(e, t) for e, t in coordinates]))


def test_orthogonal_mixing_key_is_partly_undone_by_principal_axes(pbmc):
    """A secret orthogonal mixing of the genes (plus an offset): moment matching fails, PCA alignment does not.

    What it recovers, measured over 30 random splits with n_components=3: each cell's position in the top-3
    principal subspace (correlation 0.87-0.99), hence a mean-subtracted Pearson of 0.435-0.462, against
    0.446-0.465 for the oracle projection of the true cell onto that subspace. Nothing outside the subspace.
    """
    x, _ = _cells(pbmc)
    _, truth, public = _leaked_and_public(x)
    mixing_seed = int.from_bytes(FIXED_KEY.derive("test/mixing", 8), "little")
    mixing, _ = np.linalg.qr(np.random.default_rng(mixing_seed).normal(size=(x.shape[1], x.shape[1])))
    leaked = truth @ mixing + 3.0
    public_mean = public.mean(axis=0)
    k = 3
    axes = _top_axes(public, k)

    assert abs(_mean_subtracted_pearson(leaked, truth, public_mean)) < 0.1  # measured -0.01
    moments = calibrate_gain_offset(leaked, public)
    assert abs(_mean_subtracted_pearson(moments, truth, public_mean)) < 0.1  # measured -0.02: no unmixing
    assert (
        _top_pc_correlation(moments, truth, public, axes) < 0.3
    )  # measured -0.21 (-0.5 to -0.1 over splits)

    aligned = calibrate_principal_axes(leaked, public, n_components=k)
    assert _top_pc_correlation(aligned, truth, public, axes) > 0.8  # measured 0.91 on this split
    recovered = _mean_subtracted_pearson(aligned, truth, public_mean)
    oracle = _mean_subtracted_pearson((truth - public_mean) @ axes.T @ axes + public_mean, truth, public_mean)
    assert recovered > 0.38  # measured 0.44
    assert recovered > 0.85 * oracle  # measured 0.44 of 0.46


def test_principal_axes_calibration_is_invariant_to_the_mixing(pbmc):
    """The result depends on the cells, not on which orthogonal transform the key chose."""
    x, _ = _cells(pbmc)
    _, truth, public = _leaked_and_public(x, seed=1)
    rng = np.random.default_rng(1)
    results = []
    for _ in range(2):
        mixing, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
        results.append(calibrate_principal_axes(truth @ mixing, public, n_components=3))
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)
    with pytest.raises(ValueError, match="genes"):
        calibrate_principal_axes(truth[:, :10], public)
