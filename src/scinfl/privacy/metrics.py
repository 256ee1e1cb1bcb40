"""How much an attack learned: reconstruction metrics beside what an attacker gets for free, membership AUC.

Every number here is meant to be read against a baseline. On ``pbmc68k_reduced`` the public mean profile
alone has a Pearson correlation of about 0.58 with a real cell, so raw Pearson flatters any reconstruction;
:func:`prior_baselines` reports the same metrics for the public mean and the cell-type mean, and the
mean-subtracted Pearson (``pearson_minus_mean``) asks how much of the cell's *deviation* from the population
a reconstruction captured.

All inputs are plain arrays (numpy, or anything ``np.asarray`` accepts, e.g. CPU tensors): one cell is a
1-D array over genes. Nothing here knows AnnData.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap, pearsonr, rankdata
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "bootstrap_ci",
    "membership_metrics",
    "nearest_reference",
    "pearson",
    "prior_baselines",
    "reconstruction_metrics",
    "spearman",
]


def _vector(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array over genes, got shape {array.shape}.")
    return array


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors (``scipy.stats.pearsonr``); NaN, without a warning, if either is
    constant or non-finite (a no-change prediction, a reconstruction that did not move)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    # Test constancy on the raw values: centring a constant vector can leave rounding residue.
    if a.size < 2 or np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        return float("nan")
    return float(pearsonr(a, b).statistic)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if either vector is constant."""
    return pearson(rankdata(a), rankdata(b))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float("nan") if norm == 0.0 else float(np.clip((a @ b) / norm, -1.0, 1.0))


def _pearson_of_deviation(reconstructed: np.ndarray, truth: np.ndarray, prior: np.ndarray) -> float:
    """Pearson of (reconstructed - prior) vs (truth - prior).

    A reconstruction that adds no deviation of its own (it *is* the prior, up to an offset) explains none
    of the cell's deviation: 0.0 by definition, so a prior scored against itself reads as "nothing learned"
    rather than as a missing value. NaN only if the truth itself has no deviation from the prior.
    """
    deviation_true = truth - prior
    deviation_rec = reconstructed - prior
    if np.ptp(deviation_true) == 0.0:
        return float("nan")
    if np.ptp(deviation_rec) <= 1e-12 * max(np.abs(reconstructed).max(), 1.0):
        return 0.0
    return pearson(deviation_rec, deviation_true)


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    # Stable sort on the negated values: ties are broken by gene order, the same way for both vectors.
    return np.argsort(-values, kind="stable")[:k]


def _fit_affine(reconstructed: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Least-squares ``scale * reconstructed + offset`` to ``truth`` with ``scale >= 0``.

    The scale is not allowed to go negative: that would silently forgive a sign error, which an attack has
    to resolve by itself (e.g. from the non-negativity of expression). With the best non-negative scale at
    0 the fitted reconstruction is the constant ``mean(truth)``: the attacker learned nothing.
    """
    centred = reconstructed - reconstructed.mean()
    spread = centred @ centred
    scale = 0.0 if spread == 0.0 else max(0.0, float(centred @ (truth - truth.mean())) / spread)
    return scale * centred + truth.mean()


def nearest_reference(reconstructions, reference) -> np.ndarray:
    """For each reconstruction, the row of ``reference`` it is uniquely nearest to by correlation distance.

    Returns
    -------
    numpy.ndarray
        ``(n_reconstructions,)`` row indices; -1 where the nearest row is tied with another or the
        reconstruction is constant (it then points at nobody). Constant reference rows have no defined
        correlation and are never the nearest.
    """
    reconstructions = np.atleast_2d(np.asarray(reconstructions, dtype=np.float64))
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 2 or reference.shape[1] != reconstructions.shape[1]:
        raise ValueError(
            f"reference must be (n_cells, {reconstructions.shape[1]} genes), got shape {reference.shape}."
        )
    rec = reconstructions - reconstructions.mean(axis=1, keepdims=True)
    rec_norms = np.linalg.norm(rec, axis=1)
    centred = reference - reference.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = (rec @ centred.T) / np.outer(rec_norms, norms)
    correlation = np.where(norms[None, :] > 0, correlation, -np.inf)
    best = correlation.max(axis=1, keepdims=True)
    nearest = np.argmax(correlation, axis=1)
    unique = np.count_nonzero(correlation == best, axis=1) == 1
    return np.where(unique & (rec_norms > 0), nearest, -1)


def _reidentified(reconstructed: np.ndarray, reference: np.ndarray, victim_index: int) -> float:
    """1.0 if the victim is the unique nearest reference row by correlation distance, else 0.0."""
    reference = np.asarray(reference, dtype=np.float64)
    if not 0 <= victim_index < reference.shape[0]:
        raise ValueError(f"victim_index {victim_index} is outside the {reference.shape[0]} reference rows.")
    return float(nearest_reference(reconstructed, reference)[0] == victim_index)


def reconstruction_metrics(
    reconstructed,
    truth,
    *,
    public_mean,
    celltype_mean=None,
    reference=None,
    victim_index: int | None = None,
    top_k: int = 50,
    scale_invariant: bool = False,
) -> dict[str, float]:
    """Metrics of one reconstructed cell against the true cell.

    Parameters
    ----------
    reconstructed, truth
        1-D arrays over the same genes.
    public_mean
        The mean profile of a public cohort of the same tissue: what any attacker knows for free. ``None``
        gives NaN for ``pearson_minus_mean``.
    celltype_mean
        The mean profile of the victim's cell type (an attacker who guesses the label knows it). ``None``
        gives NaN for ``pearson_minus_celltype_mean``.
    reference
        ``(n_cells, n_genes)`` real cells that contain the victim at row ``victim_index``: the population
        the attacker tries to single the victim out of. Both ``None`` gives NaN for ``reidentified``.
    top_k
        Size of the top-gene sets compared by the overlap metric (its key is ``f"top{top_k}_overlap"``).
    scale_invariant
        The reconstruction is known only up to a positive scale and an offset (analytic attacks, calibrated
        leaks): MSE, normalised MSE, cosine and the mean-subtracted Pearsons are computed on the
        least-squares fit ``a * reconstructed + b`` to the truth, with ``a >= 0`` so that a wrong sign is not
        forgiven. The other metrics are invariant to a positive scale and an offset anyway.

    Returns
    -------
    dict
        ``mse``; ``nmse`` (MSE divided by the mean square of the truth); ``cosine``; ``pearson``;
        ``spearman``; ``pearson_minus_mean`` (Pearson of ``reconstructed - public_mean`` vs
        ``truth - public_mean``; 0.0 for a reconstruction equal to the public mean up to an offset, since
        it captures none of the cell's deviation); ``pearson_minus_celltype_mean`` (the same against the
        cell-type mean); ``top{k}_overlap`` (the fraction of the truth's top-k genes among the
        reconstruction's top-k; NaN unless ``top_k`` is below the number of genes); ``reidentified`` (1.0 if the victim is the unique nearest ``reference``
        row by correlation distance, else 0.0). Undefined correlations (a constant vector) are NaN.
    """
    rec = _vector(reconstructed, "reconstructed")
    true = _vector(truth, "truth")
    if rec.shape != true.shape:
        raise ValueError(f"reconstructed has {rec.shape[0]} genes but truth has {true.shape[0]}.")
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}.")
    if (reference is None) != (victim_index is None):
        raise ValueError("Re-identification needs both `reference` and `victim_index`.")

    fitted = _fit_affine(rec, true) if scale_invariant else rec
    mse = float(np.mean((fitted - true) ** 2))
    mean_square = float(np.mean(true**2))
    metrics = {
        "mse": mse,
        "nmse": mse / mean_square if mean_square > 0 else float("nan"),
        "cosine": _cosine(fitted, true),
        "pearson": pearson(rec, true),
        "spearman": spearman(rec, true),
        "pearson_minus_mean": float("nan"),
        "pearson_minus_celltype_mean": float("nan"),
        # With top_k >= the number of genes every gene is "top": the overlap would be a trivial 1.
        f"top{top_k}_overlap": (
            len(np.intersect1d(_top_k(rec, top_k), _top_k(true, top_k))) / top_k
            if top_k < true.shape[0]
            else float("nan")
        ),
        "reidentified": float("nan"),
    }
    if public_mean is not None:
        metrics["pearson_minus_mean"] = _pearson_of_deviation(
            fitted, true, _vector(public_mean, "public_mean")
        )
    if celltype_mean is not None:
        metrics["pearson_minus_celltype_mean"] = _pearson_of_deviation(
            fitted, true, _vector(celltype_mean, "celltype_mean")
        )
    if reference is not None:
        metrics["reidentified"] = _reidentified(rec, reference, int(victim_index))
    return metrics


def prior_baselines(
    truth,
    *,
    public_mean,
    celltype_mean,
    reference=None,
    victim_index: int | None = None,
    top_k: int = 50,
    scale_invariant: bool = False,
) -> dict[str, dict[str, float]]:
    """The metrics of the trivial "reconstructions" an attacker has for free.

    Returns ``{"public_mean": metrics, "celltype_mean": metrics}`` (as :func:`reconstruction_metrics`, with
    the same keyword arguments, so they sit beside an attack's row in a table). A baseline whose profile is
    ``None`` gets NaN everywhere. An attack is worth reporting only where it beats these.
    """
    baselines = {}
    for name, profile in (("public_mean", public_mean), ("celltype_mean", celltype_mean)):
        if profile is None:
            template = reconstruction_metrics(truth, truth, public_mean=None, top_k=top_k)
            baselines[name] = dict.fromkeys(template, float("nan"))
            continue
        baselines[name] = reconstruction_metrics(
            profile,
            truth,
            public_mean=public_mean,
            celltype_mean=celltype_mean,
            reference=reference,
            victim_index=victim_index,
            top_k=top_k,
            scale_invariant=scale_invariant,
        )
    return baselines


def bootstrap_ci(
    values, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap confidence interval, resampling the items
    (``scipy.stats.bootstrap``, ``method="percentile"``).

    NaN items are ignored (an undefined metric is not a zero). All NaN (or empty) gives three NaNs; a single
    item gives a zero-width interval.

    Returns
    -------
    (mean, low, high)
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}.")
    items = np.asarray(values, dtype=np.float64).ravel()
    items = items[~np.isnan(items)]
    if items.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(items.mean())
    if items.size == 1 or np.ptp(items) == 0.0:  # every resample has the same mean
        return mean, mean, mean
    result = bootstrap(
        (items,),
        np.mean,
        n_resamples=n_boot,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


def membership_metrics(scores_members, scores_nonmembers) -> dict[str, float]:
    """How well scores separate members from non-members (a higher score means "more likely a member").

    Returns
    -------
    dict
        ``auc`` (probability that a random member outscores a random non-member, ties counting one half);
        ``tpr_at_1pct_fpr`` and ``tpr_at_0.1pct_fpr`` (the largest true-positive rate among the exact ROC
        points whose false-positive rate is at most 1% / 0.1%, i.e. the most permissive threshold that
        still keeps the FPR within the target; with fewer than 1000 non-members 0.1% FPR means no false
        positive at all); ``advantage`` (max TPR - FPR over thresholds, Yeom et al.'s membership advantage).
    """
    members = np.asarray(scores_members, dtype=np.float64).ravel()
    nonmembers = np.asarray(scores_nonmembers, dtype=np.float64).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("Membership metrics need at least one member and one non-member score.")
    if np.isnan(members).any() or np.isnan(nonmembers).any():
        raise ValueError("Membership scores contain NaN: drop or impute the undefined candidates first.")
    truth = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    scores = np.concatenate([members, nonmembers])
    # the exact ROC: every distinct threshold, from (0, 0) to (1, 1)
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    return {
        "auc": float(roc_auc_score(truth, scores)),
        "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
        "tpr_at_0.1pct_fpr": float(tpr[fpr <= 0.001].max()),
        "advantage": float(np.max(tpr - fpr)),
    }
