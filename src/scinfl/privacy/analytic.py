"""Analytic first-layer inversion, and calibration attacks that undo a fixed transform of the input.

First layer. For one sample and a first linear layer ``y = x W^T + b`` followed by anything, the chain rule
gives ``dL/dW = delta x^T`` and ``dL/db = delta`` with ``delta = dL/dy``: every row ``i`` with
``delta_i != 0`` holds the input exactly, ``x = (dL/dW)[i] / (dL/db)[i]``. No optimisation, no prior, no key
needed. The paper's keyed layer (``scheme="infl"``) computes ``y = (x W^T) * r + b + c`` (then FiLM), with a
key-dependent per-row factor ``r = 1 + s*tanh(a(k))``; its gradients are ``dL/dW[i] = delta_i r_i x`` and
``dL/db[i] = delta_i``, so the ratio gives ``r_i x``: the input up to one unknown scale per row. That scale
is removed by normalising each row's estimate onto a reference row before averaging, and the input comes
out up to one factor (the mean key factor of the active rows, positive when ``|s| <= 1``), which
scale-invariant metrics ignore. The key does not hide the input from this attack.

Calibration. A defence that instead feeds the first layer a fixed secret transform ``T(x)`` leaks ``T(x)``
exactly, for every client cell. If ``T`` is simple (a per-gene gain and offset; an orthogonal mixing of the
genes), the many leaked vectors together with a public reference cohort of the same tissue reveal ``T``:
:func:`calibrate_gain_offset` matches per-gene moments, :func:`calibrate_principal_axes` matches principal
axes. A key that acts as a simple fixed transform is exposed by these; tests show it on real PBMCs.

Everything takes and returns numpy arrays (CPU tensors are accepted as inputs).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "calibrate_gain_offset",
    "calibrate_principal_axes",
    "first_layer_rows",
    "invert_first_layer",
    "invert_first_layer_no_bias",
    "mean_input_from_statistics",
    "resolve_sign",
    "site_mean_inputs",
]


def _as_array(values, name: str, ndim: int) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor: leave autograd and the device behind
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf.")
    return array


def resolve_sign(vector: np.ndarray) -> np.ndarray:
    """Flip ``vector`` if its negative entries outweigh its positive ones.

    Expression data (counts, log-normalised counts) are non-negative, so of ``v`` and ``-v`` the one with
    the larger positive mass is the better guess for a vector known only up to sign.
    """
    positive = np.clip(vector, 0.0, None).sum()
    negative = np.clip(-vector, 0.0, None).sum()
    return vector if positive >= negative else -vector


def invert_first_layer(grad_weight, grad_bias, *, relative_tolerance: float = 1e-4) -> np.ndarray:
    """Recover a single input from the gradient of the first linear layer (weight and bias).

    Each row ``i`` gives an estimate ``e_i = grad_weight[i] / grad_bias[i]``, which is the input ``x`` for a
    plain layer and ``r_i x`` for a keyed layer (see the module docstring). Rows are combined robustly:

    1. keep the rows whose ``|grad_bias|`` is at least ``relative_tolerance`` times the largest (rows of
       inactive units are zero and carry nothing; tiny ones are dominated by rounding);
    2. take the row with the largest ``|grad_bias|`` as reference and rescale every estimate by the
       least-squares factor onto it (``c_i = <e_i, e_ref> / <e_i, e_i> = r_ref / r_i``), which removes a
       keyed layer's per-row scale and is a no-op (``c_i = 1``) for a plain layer;
    3. average the rescaled estimates weighted by ``|grad_bias|``, giving ``r_ref x``;
    4. rescale by the mean of ``1 / |c_i|``, giving ``sign(r_ref) * mean(|r_i|) * x``: the mean over the
       active rows varies far less from cell to cell than one row's factor (measured on PBMCs: 2.6% vs 25%
       coefficient of variation over 200 cells), so the leaked cells of one client share nearly one scale
       and calibration attacks can pool them.

    Parameters
    ----------
    grad_weight
        ``(out_features, in_features)`` gradient of the layer's weight for one sample.
    grad_bias
        ``(out_features,)`` gradient of the layer's bias.
    relative_tolerance
        Rows with ``|grad_bias|`` below this fraction of the largest are ignored.

    Returns
    -------
    numpy.ndarray
        ``(in_features,)``: the input exactly (plain layer), or the input times the mean key factor of the
        active rows (keyed layer; positive when the key strength is at most 1, else the sign is that of
        the reference row's factor: see :func:`resolve_sign`). Score it with scale-invariant metrics. For
        a batch gradient, a mixture of the batch's inputs.

    Raises
    ------
    ValueError
        If every bias gradient is zero (no unit was active: this route carries no information).
    """
    weight, bias, rows = _active_rows(grad_weight, grad_bias, relative_tolerance)
    if len(rows) == 0:
        raise ValueError("Every bias gradient is zero: no unit of the layer was active for this input.")
    magnitude = np.abs(bias)
    estimates = weight[rows] / bias[rows, None]
    reference = estimates[np.argmax(magnitude[rows])]
    squared_norms = np.einsum("ij,ij->i", estimates, estimates)
    usable = squared_norms > 0  # an all-zero input row gives nothing to align
    if not usable.any():
        return np.zeros(weight.shape[1])
    estimates, rows, squared_norms = estimates[usable], rows[usable], squared_norms[usable]
    factors = (estimates @ reference) / squared_norms
    weights = magnitude[rows]
    aligned = (weights * factors) @ estimates / weights.sum()
    # `aligned` is r_ref * x. Rescale it to the mean |r_i| over the kept rows (1 / |factor_i| is
    # |r_i / r_ref|): a single row's key factor varies from cell to cell with which units are active, the
    # mean over a few dozen rows hardly does, so leaked cells share one scale and can be pooled.
    return aligned * np.mean(1.0 / np.abs(factors))


def first_layer_rows(grad_weight, grad_bias, *, relative_tolerance: float = 1e-3) -> np.ndarray:
    """Every active row's ratio ``grad_weight[i] / grad_bias[i]`` of a first linear layer, one vector each.

    For one cell's gradient each row is the cell (times the row's key factor): :func:`invert_first_layer`
    pools them. For a sum of many cells' gradients or updates (what a server receives with secure
    aggregation), row ``i`` is a mixture of the inputs weighted by each cell's ``delta_i``, a different
    mixture per unit, so the rows are kept apart: they are the vectors a geometry attack reads.

    Parameters
    ----------
    grad_weight, grad_bias
        ``(out_features, in_features)`` and ``(out_features,)``: a gradient, an update or a change of the
        aggregated weights of the layer.
    relative_tolerance
        Rows with ``|grad_bias|`` below this fraction of the largest are left out (dominated by rounding).

    Returns
    -------
    numpy.ndarray
        ``(n_rows, in_features)``; no rows when every bias entry is zero.
    """
    weight, bias, rows = _active_rows(grad_weight, grad_bias, relative_tolerance)
    return weight[rows] / bias[rows, None]


def _active_rows(
    grad_weight, grad_bias, relative_tolerance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The layer's gradient as arrays, and the rows whose ``|grad_bias|`` is at least ``relative_tolerance``
    of the largest (none when every bias entry is zero: no unit was active)."""
    weight = _as_array(grad_weight, "grad_weight", 2)
    bias = _as_array(grad_bias, "grad_bias", 1)
    if weight.shape[0] != bias.shape[0]:
        raise ValueError(f"grad_weight has {weight.shape[0]} rows but grad_bias has {bias.shape[0]} entries.")
    magnitude = np.abs(bias)
    largest = magnitude.max(initial=0.0)
    if largest == 0.0:
        return weight, bias, np.zeros(0, dtype=np.int64)
    return weight, bias, np.flatnonzero(magnitude >= relative_tolerance * largest)


def invert_first_layer_no_bias(grad_weight) -> np.ndarray:
    """Recover a single input, up to scale, from the weight gradient of a first linear layer without bias.

    For one sample ``grad_weight = delta x^T`` (for a keyed layer ``(delta * r) x^T``): rank one, so its top
    right singular vector is ``x / ||x||`` up to sign. The sign is resolved by non-negativity of expression
    (:func:`resolve_sign`); the scale is lost, so score the result with scale-invariant metrics.

    Returns
    -------
    numpy.ndarray
        ``(in_features,)`` with unit norm. For a batch gradient, the dominant direction of the batch.
    """
    weight = _as_array(grad_weight, "grad_weight", 2)
    if not np.any(weight):
        raise ValueError("The weight gradient is zero: no unit of the layer was active for this input.")
    _, _, right = np.linalg.svd(weight, full_matrices=False)
    return resolve_sign(right[0])


def _leaked_and_public(leaked, public) -> tuple[np.ndarray, np.ndarray]:
    leaked = _as_array(leaked, "leaked", 2)
    public = _as_array(public, "public", 2)
    if leaked.shape[1] != public.shape[1]:
        raise ValueError(f"leaked has {leaked.shape[1]} genes but public has {public.shape[1]}.")
    return leaked, public


def _std(matrix: np.ndarray) -> np.ndarray:
    return matrix.std(axis=0, ddof=1) if matrix.shape[0] > 1 else np.zeros(matrix.shape[1])


def calibrate_gain_offset(leaked, public) -> np.ndarray:
    """Undo an unknown per-gene gain and offset by matching each gene's mean and spread to a public cohort.

    If every leaked vector is ``T(x) = g * x + o`` (element-wise, one secret ``g, o`` per gene, ``g > 0``),
    each leaked gene has mean ``g * mu + o`` and spread ``g * sigma``. Standardising it and giving it the
    public cohort's mean and spread inverts ``T`` up to sampling noise in the moments. A gene that is
    constant among the leaked vectors carries no information about the cells and is set to the public
    mean; a gene constant in the public cohort gets its constant value.

    Parameters
    ----------
    leaked
        ``(n_leaked, n_genes)``: many vectors leaked through the same transform (e.g. analytic inversions
        of many cells' gradients).
    public
        ``(n_public, n_genes)``: real cells of the same tissue, in the original gene space.

    Returns
    -------
    numpy.ndarray
        ``(n_leaked, n_genes)``: the calibrated estimates of the original cells.
    """
    leaked, public = _leaked_and_public(leaked, public)
    leaked_std = _std(leaked)
    # Spread at rounding level is no spread: compare with the gene's magnitude.
    informative = leaked_std > 1e-12 * np.maximum(np.abs(leaked).max(axis=0), 1.0)
    standardised = np.zeros_like(leaked)
    standardised[:, informative] = (
        leaked[:, informative] - leaked[:, informative].mean(axis=0)
    ) / leaked_std[informative]
    return standardised * _std(public) + public.mean(axis=0)


def _principal_axes(matrix: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, leading principal axes ``(n_components, n_genes)`` and standard deviations along them.

    Eigen-decomposes the smaller of the Gram matrix (cells x cells) and the covariance (genes x genes):
    with a few hundred cells and ~800 genes that is ~10x faster than an SVD of the data, and the leading
    components, the only ones used, are as accurate.
    """
    mean = matrix.mean(axis=0)
    centred = matrix - mean
    if centred.shape[0] <= centred.shape[1]:
        eigenvalues, vectors = np.linalg.eigh(centred @ centred.T)
        order = np.argsort(eigenvalues)[::-1][:n_components]
        singular_values = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
        axes = centred.T @ vectors[:, order]
        with np.errstate(invalid="ignore", divide="ignore"):
            axes = np.where(singular_values > 0, axes / singular_values, 0.0).T
    else:
        eigenvalues, vectors = np.linalg.eigh(centred.T @ centred)
        order = np.argsort(eigenvalues)[::-1][:n_components]
        singular_values = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
        axes = vectors[:, order].T
    return mean, axes, singular_values / np.sqrt(max(matrix.shape[0] - 1, 1))


def _cross_distance(
    leaked_coordinates: np.ndarray, public_coordinates: np.ndarray, signs: np.ndarray
) -> float:
    """Mean Euclidean distance between the sign-flipped leaked cells and the public cells."""
    flipped = leaked_coordinates * signs
    squared = (
        np.einsum("ij,ij->i", flipped, flipped)[:, None]
        + np.einsum("ij,ij->i", public_coordinates, public_coordinates)[None, :]
        - 2.0 * flipped @ public_coordinates.T
    )
    return float(np.sqrt(np.clip(squared, 0.0, None)).mean())


def _axis_signs(
    leaked_coordinates: np.ndarray, public_coordinates: np.ndarray, *, exhaustive: int = 8
) -> np.ndarray:
    """Signs of the leaked principal coordinates that best match the public cohort's joint distribution.

    The criterion is the energy distance between the two clouds of cells in the principal subspace. Its
    within-cohort terms do not depend on the signs (flipping coordinates preserves the distances inside a
    cloud), so minimising it means minimising the mean leaked-to-public distance. The signs of the first
    ``exhaustive`` axes are searched jointly over all combinations, those of later axes one at a time given
    the earlier ones.

    Why not per-axis skewness: on PBMCs the projections on the two leading axes have skewness of only
    0.1-0.2 (bimodal, with modes of similar weight), and the skewness sign picked the wrong sign in 4 of 10
    random draws; a greedy one-axis-at-a-time search from all-positive signs got stuck as often. The joint
    shape of the cell clusters in the leading plane is not symmetric, and the joint search found the right
    signs of the leading axes in all 30 draws measured.
    """
    n_components = leaked_coordinates.shape[1]
    n_joint = min(exhaustive, n_components)
    combinations = 1.0 - 2.0 * ((np.arange(2**n_joint)[:, None] >> np.arange(n_joint)) & 1)
    costs = [
        _cross_distance(leaked_coordinates[:, :n_joint], public_coordinates[:, :n_joint], signs)
        for signs in combinations
    ]
    signs = np.ones(n_components)
    signs[:n_joint] = combinations[int(np.argmin(costs))]
    for axis in range(n_joint, n_components):
        costs = []
        for sign in (1.0, -1.0):
            signs[axis] = sign
            costs.append(
                _cross_distance(
                    leaked_coordinates[:, : axis + 1], public_coordinates[:, : axis + 1], signs[: axis + 1]
                )
            )
        signs[axis] = 1.0 if costs[0] <= costs[1] else -1.0
    return signs


def calibrate_principal_axes(leaked, public, *, n_components: int | None = None) -> np.ndarray:
    """Undo an unknown linear mixing of the genes by aligning principal axes with a public cohort.

    If every leaked vector is ``T(x) = x Q + o`` with a secret orthogonal ``Q`` (and offset ``o``), the
    leaked cohort's covariance is ``Q^T C Q``: its principal axes are the public cohort's axes carried by
    ``Q``, and the coordinates of each cell along them are unchanged. So:

    1. PCA both cohorts (centred); express each leaked vector in coordinates on its own leading axes;
    2. read coordinate ``j`` as a coordinate on public axis ``j`` (rank ``j`` matches rank ``j``), rescaled
       to the public spread along that axis (which also absorbs a uniform scale in ``T``);
    3. a principal axis has no sign: choose the signs so that the leaked cells' joint distribution in the
       principal subspace matches the public cells' (minimum energy distance; see :func:`_axis_signs` for
       why not the skewness of each axis alone);
    4. rotate back with the public axes and add the public mean.

    What it recovers: the components whose variance is well separated from their neighbours', which are
    the leading ones and carry the cell-type structure. Axes with nearly equal variances are mixed
    arbitrarily by sampling noise, so their coordinates come out rotated among themselves and keeping many
    components adds noise. Reconstructions are confined to the top-``n_components`` public subspace: a
    cell's deviation from the mean outside it is not recovered. Measured on PBMCs (200 leaked and 300 public
    cells, 765 genes, 30 random splits, ``n_components=3``): per-cell correlation of the top-3 principal
    coordinates with the truth 0.87-0.99, mean-subtracted Pearson 0.435-0.462 against 0.446-0.465 for the
    oracle projection of the true cells onto the same subspace.

    Parameters
    ----------
    leaked
        ``(n_leaked, n_genes)`` vectors leaked through the same transform.
    public
        ``(n_public, n_genes)`` real cells of the same tissue, in the original gene space.
    n_components
        Number of principal axes to match; default 5, at most ``min(n_leaked, n_public) - 1``.

    Returns
    -------
    numpy.ndarray
        ``(n_leaked, n_genes)``: the calibrated estimates of the original cells.
    """
    leaked, public = _leaked_and_public(leaked, public)
    limit = min(leaked.shape[0] - 1, public.shape[0] - 1, leaked.shape[1])
    if limit < 1:
        raise ValueError("Principal-axis calibration needs at least two leaked and two public vectors.")
    n_components = min(5 if n_components is None else int(n_components), limit)
    if n_components < 1:
        raise ValueError(f"n_components must be positive, got {n_components}.")

    leaked_mean, leaked_axes, leaked_spread = _principal_axes(leaked, n_components)
    public_mean, public_axes, public_spread = _principal_axes(public, n_components)
    with np.errstate(invalid="ignore", divide="ignore"):
        rescale = np.where(leaked_spread > 0, public_spread / leaked_spread, 0.0)
    leaked_coordinates = ((leaked - leaked_mean) @ leaked_axes.T) * rescale
    public_coordinates = (public - public_mean) @ public_axes.T
    signs = _axis_signs(leaked_coordinates, public_coordinates)
    return (leaked_coordinates * signs) @ public_axes + public_mean


def mean_input_from_statistics(weight, bias, running_mean) -> np.ndarray:
    """A site's mean first-layer input, from the running mean of the normalisation after that layer.

    A site-aware network (:class:`scinfl.nn.BatchwiseNorm`) keeps each site's statistics of its first
    layer's outputs ``W u + b`` and sends them; their running mean is about ``W mean(u) + b``. The server
    holds ``W`` and ``b``, so the least-norm solution is the site's mean input projected on ``W``'s row
    space (all of it when the layer is at least as wide as its input). ``u`` is the input as the shared
    weights read it: the cells' values for plain FedAvg, their key-mixed values under a hardened key.
    """
    weight = _as_array(weight, "weight", 2).astype(np.float64)
    bias = _as_array(bias, "bias", 1).astype(np.float64)
    running_mean = _as_array(running_mean, "running_mean", 1).astype(np.float64)
    return np.linalg.lstsq(weight, running_mean - bias, rcond=None)[0]


def site_mean_inputs(state) -> np.ndarray:
    """Every batch's (site's) mean first-layer input, one row each, as a server reads them from the
    ``state_dict`` of a site-aware autoencoder (``si.tasks.Embedding(site_effects=True)``): its encoder's
    first layer and the per-batch running means after it (:func:`mean_input_from_statistics`)."""
    names = [name for name in state if name.endswith("encoder.1.running_mean_0")]
    if len(names) != 1:
        raise ValueError("site_mean_inputs needs the state of one site-aware autoencoder.")
    stem = names[0][: -len("1.running_mean_0")]
    weight, bias = state[f"{stem}0.weight"], state[f"{stem}0.bias"]
    rows = []
    while f"{stem}1.running_mean_{len(rows)}" in state:
        rows.append(mean_input_from_statistics(weight, bias, state[f"{stem}1.running_mean_{len(rows)}"]))
    return np.stack(rows)
