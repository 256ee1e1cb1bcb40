"""Index splits that survive label skew (classes with one cell, sites with one class)."""

from __future__ import annotations

import numpy as np

__all__ = ["dirichlet_partition", "stratified_split"]


def stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held out), holding out ``fraction`` of every class that has >= 2 members.

    A class with a single member stays in the kept part, so a site with rare classes still trains on them.
    Both parts are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"The held-out fraction must be in [0, 1), got {fraction}.")
    held_out: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < 2 or fraction == 0.0:
            continue
        n_out = min(len(members) - 1, max(1, round(fraction * len(members))))
        held_out.append(rng.choice(members, size=n_out, replace=False))
    out = np.sort(np.concatenate(held_out)) if held_out else np.empty(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), out)
    return kept, out


def dirichlet_partition(
    labels: np.ndarray, n_sites: int, alpha: float, rng: np.random.Generator, *, min_size: int = 2
) -> list[np.ndarray]:
    """Label-skewed partition into sites: each class is spread with Dirichlet(alpha) proportions.

    Small ``alpha`` gives strongly skewed sites; large ``alpha`` approaches an even split. Draws again
    (up to 100 times) until every site has at least ``min_size`` members.
    """
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}.")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}.")
    if len(labels) < n_sites * min_size:
        raise ValueError(f"{len(labels)} cells cannot make {n_sites} sites of at least {min_size} cells.")
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_sites, alpha))) * len(members)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(members, cuts), strict=True):
                part.append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return merged
    raise ValueError(
        f"Could not draw {n_sites} label-skewed sites of at least {min_size} cells with alpha={alpha}; "
        "raise alpha or lower n_sites."
    )
