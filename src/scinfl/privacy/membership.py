"""Membership inference: was this cell in the training data of the released model?

Two attacks, as pure functions of model outputs (no training code here: the audit orchestrator trains the
reference models with its own ``train_fn`` and passes their outputs in):

* the loss threshold (Yeom et al. 2018): members have lower loss, so the score is ``-cross-entropy``;
* reference-model attacks, which calibrate each candidate's confidence against models trained with and
  without it: LiRA (Carlini et al. 2022, "Membership inference attacks from first principles"), online
  and offline, and RMIA (Zarifzadeh et al. 2024, "Low-cost high-power membership inference attacks").
  Calibration matters because some cells are easy (a typical T cell is confidently right whether or not it
  was trained on) and some hard; a raw loss threshold confuses "easy" with "member".

Every score is "higher = more likely a member"; :func:`scinfl.privacy.metrics.membership_metrics` turns
member and non-member scores into AUC and TPR at low FPR.

The reference-model protocol: pick ``K`` models and a boolean matrix ``included[k, i]`` saying whether
candidate ``i`` is in model ``k``'s training data (:func:`split_inclusion` makes the usual one: every
candidate in exactly half of the models); train each model on its candidates plus any other population
data; pass each model's probability of the true label for every candidate as
``reference_confidences[k, i]``, and the target model's as ``target_confidence[i]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "lira_scores",
    "logit_confidence",
    "loss_scores",
    "reference_model_scores",
    "rmia_scores",
    "split_inclusion",
    "true_label_confidence",
]

# Per-example variances need enough models on each side; below this LiRA's authors found one shared
# variance works better (their "fixed variance" variant, recommended below 64 reference models).
MIN_MODELS_PER_SIDE_FOR_PER_EXAMPLE_VARIANCE = 32


@torch.no_grad()
def true_label_confidence(
    predict_proba: Callable[[Tensor], Tensor], x: Tensor, y, *, batch_size: int = 4096
) -> np.ndarray:
    """The model's probability of the true label for every row of ``x``, as float64.

    ``predict_proba`` maps a batch of inputs to class probabilities ``(batch, n_classes)``; wrap a network
    with the key context and ``softmax`` as needed (and put it in evaluation mode).
    """
    labels = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must hold one label per row of x ({x.shape[0]}), got shape {tuple(labels.shape)}."
        )
    out = []
    for start in range(0, x.shape[0], batch_size):
        probabilities = predict_proba(x[start : start + batch_size])
        batch_labels = labels[start : start + batch_size].to(probabilities.device)
        out.append(probabilities.gather(1, batch_labels[:, None])[:, 0].double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def loss_scores(
    predict_proba: Callable[[Tensor], Tensor], x: Tensor, y, *, batch_size: int = 4096
) -> np.ndarray:
    """Loss-threshold membership scores: ``-cross-entropy = log p(true label)`` per sample.

    A probability that underflows to 0 is clamped to the smallest positive float64, so scores stay finite.
    """
    confidence = true_label_confidence(predict_proba, x, y, batch_size=batch_size)
    return np.log(np.maximum(confidence, np.finfo(np.float64).tiny))


def logit_confidence(confidence, *, eps: float = 1e-12) -> np.ndarray:
    """LiRA's logit scaling ``log(p / (1 - p))`` of true-label probabilities.

    Probabilities pile up near 1 for training data; the logit spreads them out so that a Gaussian fits the
    distribution over models well. ``p`` is clipped to ``[eps, 1 - eps]`` so that saturated probabilities
    (float32 rounds ``1 - 1e-8`` to 1) stay finite.
    """
    p = np.clip(np.asarray(confidence, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def split_inclusion(n_models: int, n_candidates: int, *, seed: int = 0) -> np.ndarray:
    """``included[k, i]``: candidate ``i`` trains reference model ``k``, for exactly half of the models each.

    Balanced per candidate (``n_models // 2`` models in, the rest out), so every candidate has both in and
    out models once ``n_models >= 2``; each model sees about half of the candidates.
    """
    if n_models < 2:
        raise ValueError(f"Reference-model attacks need at least 2 models, got {n_models}.")
    rng = np.random.default_rng(seed)
    return rng.random((n_models, n_candidates)).argsort(axis=0) < n_models // 2


def _check_reference(target_confidence, reference_confidences, included) -> tuple[np.ndarray, ...]:
    target = np.asarray(target_confidence, dtype=np.float64)
    reference = np.asarray(reference_confidences, dtype=np.float64)
    if target.ndim != 1:
        raise ValueError(
            f"target_confidence must be 1-D (one value per candidate), got shape {target.shape}."
        )
    if reference.ndim != 2 or reference.shape[1] != target.shape[0]:
        raise ValueError(
            f"reference_confidences must be (n_models, {target.shape[0]} candidates), got {reference.shape}."
        )
    if included is None:
        mask = np.zeros(reference.shape, dtype=bool)
    else:
        mask = np.asarray(included)
        if mask.shape != reference.shape or mask.dtype != bool:
            raise ValueError(
                f"included must be a boolean array of shape {reference.shape}, got {mask.shape}."
            )
    for name, values in (("target_confidence", target), ("reference_confidences", reference)):
        if np.isnan(values).any() or (values < 0).any() or (values > 1).any():
            raise ValueError(f"{name} must hold probabilities in [0, 1].")
    return target, reference, mask


def _side_statistics(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-candidate count, mean and sum of squared deviations of the entries selected by ``mask``."""
    count = mask.sum(axis=0)
    total = np.where(mask, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
    squares = np.where(mask, (values - np.nan_to_num(mean)) ** 2, 0.0).sum(axis=0)
    return count, mean, squares


def _normal_logpdf(x: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2.0 * np.pi * variance) + (x - mean) ** 2 / variance)


def lira_scores(
    target_confidence,
    reference_confidences,
    included=None,
    *,
    online: bool = True,
    variance: Literal["auto", "per_example", "global"] = "auto",
    min_variance: float = 1e-6,
) -> np.ndarray:
    """LiRA membership scores from reference models (Carlini et al. 2022).

    Each candidate's logit-scaled confidence under the reference models that trained on it (IN) and those
    that did not (OUT) is fitted by a Gaussian; the target model's value is scored against them.

    * online: the log likelihood ratio ``log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)``;
    * offline (OUT models only, e.g. when the reference models may not train on the candidates): the
      one-sided statistic ``(phi - mu_out) / s_out``, which ranks candidates as the paper's ``Phi(.)`` does.

    Parameters
    ----------
    target_confidence
        ``(n_candidates,)`` the target model's probability of each candidate's true label.
    reference_confidences
        ``(n_models, n_candidates)`` the same for every reference model.
    included
        ``(n_models, n_candidates)`` boolean: candidate ``i`` was in model ``k``'s training data. ``None``
        means no reference model saw any candidate (offline only).
    online
        Use IN and OUT models (needs ``included``), or OUT models only.
    variance
        ``"per_example"`` fits each candidate's own variances; ``"global"`` one variance shared by every
        candidate and both sides, pooled from the deviations of each value from its candidate's mean (far
        better with few models); ``"auto"`` picks per-example only when every candidate has at least
        ``MIN_MODELS_PER_SIDE_FOR_PER_EXAMPLE_VARIANCE`` models on each side used.
    min_variance
        Floor on the variances (logit scale), so that identical reference values do not give infinities.

    Returns
    -------
    numpy.ndarray
        ``(n_candidates,)`` scores, higher = more likely a member. A candidate with no IN (or no OUT) model
        borrows the average IN-OUT shift of the candidates that have both.
    """
    target, reference, mask = _check_reference(target_confidence, reference_confidences, included)
    if online and included is None:
        raise ValueError("Online LiRA needs `included`: which reference models trained on each candidate.")
    if variance not in ("auto", "per_example", "global"):
        raise ValueError(f"variance must be 'auto', 'per_example' or 'global', got {variance!r}.")
    phi_target = logit_confidence(target)
    phi = logit_confidence(reference)

    n_out, mean_out, squares_out = _side_statistics(phi, ~mask)
    n_in, mean_in, squares_in = _side_statistics(phi, mask)
    sides = [(n_out, squares_out)] + ([(n_in, squares_in)] if online else [])
    if variance == "auto":
        smallest = min(int(count.min()) for count, _ in sides)
        variance = "per_example" if smallest >= MIN_MODELS_PER_SIDE_FOR_PER_EXAMPLE_VARIANCE else "global"

    if online:
        both = (n_in > 0) & (n_out > 0)
        if not both.any():
            raise ValueError(
                "No candidate has both an IN and an OUT reference model: cannot fit LiRA online."
            )
        # Candidates missing one side borrow the typical effect of training on a candidate.
        shift = float(np.mean(mean_in[both] - mean_out[both]))
        mean_in = np.where(n_in > 0, mean_in, mean_out + shift)
        mean_out = np.where(n_out > 0, mean_out, mean_in - shift)
    elif (n_out == 0).any():
        raise ValueError("Offline LiRA needs at least one OUT reference model for every candidate.")

    if variance == "global":
        degrees = sum(int(np.maximum(count - 1, 0).sum()) for count, _ in sides)
        if degrees == 0:
            raise ValueError("A global variance needs some candidate with two reference models on one side.")
        pooled = max(sum(float(squares[count > 0].sum()) for count, squares in sides) / degrees, min_variance)
        var_out = var_in = np.full(target.shape, pooled)
    else:
        if online and ((n_in < 2) | (n_out < 2)).any():
            raise ValueError("Per-example variances need at least 2 IN and 2 OUT models for every candidate.")
        if not online and (n_out < 2).any():
            raise ValueError("Per-example variances need at least 2 OUT models for every candidate.")
        with np.errstate(invalid="ignore", divide="ignore"):  # n_in may be 0 offline: unused then
            var_out = np.maximum(squares_out / (n_out - 1), min_variance)
            var_in = np.maximum(squares_in / (n_in - 1), min_variance)

    if not online:
        return (phi_target - mean_out) / np.sqrt(var_out)
    return _normal_logpdf(phi_target, mean_in, var_in) - _normal_logpdf(phi_target, mean_out, var_out)


def rmia_scores(
    target_confidence,
    reference_confidences,
    included=None,
    *,
    online: bool = True,
    offline_a: float = 0.3,
    gamma: float = 1.0,
    population_target_confidence=None,
    population_reference_confidences=None,
) -> np.ndarray:
    """RMIA-style membership scores from reference models (Zarifzadeh et al. 2024).

    The likelihood ratio of a candidate ``x`` is ``r(x) = p_target(x) / p(x)`` where ``p(x)`` is its
    true-label probability averaged over reference models: over all of them online (about half trained on
    ``x``: the marginal over membership), or over the OUT models offline with the paper's linear correction
    for the missing IN models, ``p(x) = ((1 + a) * p_out(x) + (1 - a)) / 2``. The score of ``x`` is the
    fraction of population samples ``z`` it dominates: ``r(x) / r(z) > gamma``.

    Parameters
    ----------
    target_confidence, reference_confidences, included
        As for :func:`lira_scores`; ``included`` is needed offline to pick OUT models (``None``: no
        reference model saw any candidate).
    online
        Average over all reference models, or over OUT models with the offline correction.
    offline_a
        The offline correction ``a`` (the paper tunes it on reference models; 0.3 is a common default).
    gamma
        Dominance threshold on the likelihood-ratio quotient.
    population_target_confidence, population_reference_confidences
        ``(n_population,)`` and ``(n_models, n_population)``: the comparison samples ``z``, which are
        treated as OUT for every reference model. Default: the candidates themselves.

    Returns
    -------
    numpy.ndarray
        ``(n_candidates,)`` scores in [0, 1], higher = more likely a member.
    """
    target, reference, mask = _check_reference(target_confidence, reference_confidences, included)
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}.")
    tiny = np.finfo(np.float64).tiny

    def marginal(reference_values: np.ndarray, out_mask: np.ndarray) -> np.ndarray:
        if online:
            return reference_values.mean(axis=0)
        n_out = out_mask.sum(axis=0)
        if (n_out == 0).any():
            raise ValueError("Offline RMIA needs at least one OUT reference model for every sample.")
        p_out = np.where(out_mask, reference_values, 0.0).sum(axis=0) / n_out
        return 0.5 * ((1.0 + offline_a) * p_out + (1.0 - offline_a))

    ratio = target / np.maximum(marginal(reference, ~mask), tiny)
    if population_target_confidence is None:
        population_ratio = ratio
    else:
        population_target, population_reference, _ = _check_reference(
            population_target_confidence, population_reference_confidences, None
        )
        if population_reference.shape[0] != reference.shape[0]:
            raise ValueError("The population needs confidences from the same reference models.")
        population_ratio = population_target / np.maximum(
            marginal(population_reference, np.ones(population_reference.shape, dtype=bool)), tiny
        )
    # r(x) / r(z) > gamma  <=>  r(z) < r(x) / gamma, counted by binary search on the sorted population.
    return np.searchsorted(np.sort(population_ratio), ratio / gamma, side="left") / population_ratio.size


def reference_model_scores(
    target_confidence, reference_confidences, included, **rmia_options
) -> dict[str, np.ndarray]:
    """Every reference-model score at once: ``lira_online``, ``lira_offline``, ``rmia`` (online).

    Variances are chosen as by :func:`lira_scores` with ``variance="auto"``; ``rmia_options`` go to
    :func:`rmia_scores`.
    """
    return {
        "lira_online": lira_scores(target_confidence, reference_confidences, included, online=True),
        "lira_offline": lira_scores(target_confidence, reference_confidences, included, online=False),
        "rmia": rmia_scores(target_confidence, reference_confidences, included, **rmia_options),
    }
