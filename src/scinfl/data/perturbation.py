"""Perturbation designs: which cells are controls, the covariates, and each site's control profile.

A perturbation model reads, for every cell, its site's mean control profile (within the cell's covariate
group, e.g. stimulated or not), the perturbation's identity and the covariates, and predicts the cell's
expression. The control profile never leaves the site: it is an input of the site's own batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from .._warnings import warn
from .schema import FederationSchema, label_codes

__all__ = [
    "PerturbationDesign",
    "PerturbationMatrix",
    "control_profiles",
    "group_moments",
    "perturbation_matrix",
]


@dataclass(frozen=True)
class PerturbationDesign:
    """The perturbation column, its control label and the covariates, with their categories.

    The categories are agreed from metadata only (:class:`~scinfl.data.FederationSchema`'s ``covariates``).
    """

    perturbation_key: str
    control: str
    covariate_keys: tuple[str, ...] = ()
    covariate_categories: tuple[tuple[str, ...], ...] = ()

    @property
    def n_covariates(self) -> int:
        """Width of the covariates' one-hot encoding (every key's categories, side by side)."""
        return sum(len(c) for c in self.covariate_categories)

    def covariate_codes(self, adata: AnnData, site: str) -> np.ndarray:
        """``(n_obs, n_keys)`` index of every cell's value in each covariate's categories."""
        codes = np.zeros((adata.n_obs, len(self.covariate_keys)), dtype=np.int64)
        for j, (key, categories) in enumerate(
            zip(self.covariate_keys, self.covariate_categories, strict=True)
        ):
            values = _column(adata, key, site)
            column = pd.Categorical(values.astype(str), categories=list(categories)).codes
            if (column < 0).any():
                unknown = sorted(set(values.astype(str)) - set(categories))[:5]
                raise ValueError(
                    f"Site {site!r}: covariate {key!r} has values {unknown} the model does not know "
                    f"({', '.join(categories)})."
                )
            codes[:, j] = column
        return codes

    def covariate_onehot(self, codes: np.ndarray) -> np.ndarray:
        """The one-hot encoding of :meth:`covariate_codes`, ``(n, n_covariates)`` float32."""
        out = np.zeros((len(codes), self.n_covariates), dtype=np.float32)
        offset = 0
        for j, categories in enumerate(self.covariate_categories):
            out[np.arange(len(codes)), offset + codes[:, j]] = 1.0
            offset += len(categories)
        return out

    def is_control(self, adata: AnnData, site: str) -> np.ndarray:
        return (_column(adata, self.perturbation_key, site).astype(str) == self.control).to_numpy()

    @classmethod
    def from_schema(
        cls, schema: FederationSchema, *, perturbation_key: str, control: str, covariate_keys: Sequence[str]
    ) -> PerturbationDesign:
        """The design of a federation: the options, with the covariates' categories the sites agreed."""
        agreed = dict(schema.covariates)
        return cls(
            perturbation_key,
            str(control),
            tuple(covariate_keys),
            tuple(agreed[key] for key in covariate_keys),
        )


def _column(adata: AnnData, key: str, site: str) -> pd.Series:
    if key not in adata.obs:
        raise ValueError(f"Site {site!r}: column {key!r} is missing from .obs.")
    values = adata.obs[key]
    if values.isna().any():
        raise ValueError(f"Site {site!r}: {int(values.isna().sum())} cells have no value in {key!r}.")
    return values


def group_moments(
    matrix, cells: np.ndarray, group: np.ndarray, n_groups: int, *, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard error of the mean and count of rows ``cells`` of an aligned matrix in each group
    (``group[cell]`` in ``0 .. n_groups - 1``), read ``chunk`` rows at a time. NaN where a group is empty
    (and standard error NaN below 2 cells)."""
    sums = np.zeros((n_groups, matrix.n_features))
    squares = np.zeros_like(sums)
    counts = np.zeros(n_groups)
    for start in range(0, len(cells), chunk):
        rows = cells[start : start + chunk]
        values = matrix.rows(rows).astype(np.float64)
        np.add.at(sums, group[rows], values)
        np.add.at(squares, group[rows], values**2)
        np.add.at(counts, group[rows], 1)
    n = counts[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / n
        variance = np.maximum(squares / n - mean**2, 0) * n / (n - 1)
        se = np.sqrt(variance / n)
    return mean, se, counts


def control_profiles(
    matrix, is_control: np.ndarray, covariate_codes: np.ndarray, site: str
) -> tuple[np.ndarray, np.ndarray]:
    """Each covariate group's mean control profile, and every cell's group.

    ``matrix`` is an aligned matrix (``rows``, ``n_features``). Groups are the distinct rows of
    ``covariate_codes``, in sorted order. A group without control cells at the site gets the site's
    pooled control profile, with a warning.

    Returns
    -------
    ``(profiles, group)``: ``(n_groups, n_features)`` float32 profiles and each cell's row in them.
    """
    groups, group = np.unique(covariate_codes, axis=0, return_inverse=True)
    group = group.reshape(-1)
    mean, _, counts = group_moments(matrix, np.flatnonzero(is_control), group, len(groups))
    empty = counts == 0
    if empty.any():
        warn(
            f"Site {site!r}: {int(empty.sum())} covariate group(s) have no control cells; their cells read "
            "the site's pooled control profile."
        )
        pooled = (mean[~empty] * counts[~empty, None]).sum(axis=0) / counts.sum()
        mean[empty] = pooled
    return mean.astype(np.float32), group


class PerturbationMatrix:
    """An aligned matrix whose rows are ``[observed profile | control profile | perturbation | covariates]``.

    The first ``n_features`` columns are each cell's observed profile (the training target, never the
    network's input); the rest are the network's input: the mean control profile of the cell's covariate
    group at its site, the perturbation one-hot and the covariates' one-hot. Wraps
    :class:`~scinfl.data.AlignedMatrix` (``rows``, ``n_obs``, ``n_present``, ``matrix``, ``measured``).
    """

    def __init__(
        self,
        aligned,
        profiles: np.ndarray,
        group: np.ndarray,
        perturbation: np.ndarray,
        covariates: np.ndarray,
        n_perturbations: int,
    ) -> None:
        self.aligned = aligned
        self.profiles = profiles
        self.group = group
        self.perturbation = perturbation
        self.covariates = covariates
        self.n_perturbations = n_perturbations

    matrix = property(lambda self: self.aligned.matrix)
    n_obs = property(lambda self: self.aligned.n_obs)
    n_features = property(lambda self: self.aligned.n_features)
    n_present = property(lambda self: self.aligned.n_present)
    measured = property(lambda self: self.aligned.measured)

    def control_rows(self, index: np.ndarray) -> np.ndarray:
        """The control profile each of cells ``index`` reads."""
        return self.profiles[self.group[index]]

    def rows(self, index: np.ndarray) -> np.ndarray:
        onehot = np.zeros((len(index), self.n_perturbations), dtype=np.float32)
        onehot[np.arange(len(index)), self.perturbation[index]] = 1.0
        return np.concatenate(
            [self.aligned.rows(index), self.control_rows(index), onehot, self.covariates[index]], axis=1
        )


def perturbation_matrix(
    aligned, adata: AnnData, design: PerturbationDesign, schema: FederationSchema, site: str
):
    """``aligned`` (one site's :class:`~scinfl.data.AlignedMatrix`) as a :class:`PerturbationMatrix`:
    its control profiles, perturbation codes (``schema.categories``) and covariates."""
    is_control = design.is_control(adata, site)
    if not is_control.any():
        present = ", ".join(map(repr, _column(adata, design.perturbation_key, site).astype(str).unique()[:5]))
        raise ValueError(
            f"Site {site!r} has no control cells ({design.perturbation_key!r} == {design.control!r}; its "
            f"values include {present}): the model reads each site's control profile."
        )
    codes = design.covariate_codes(adata, site)
    profiles, group = control_profiles(aligned, is_control, codes, site)
    return PerturbationMatrix(
        aligned,
        profiles,
        group,
        label_codes(adata, schema, site),
        design.covariate_onehot(codes),
        schema.n_classes,
    )
