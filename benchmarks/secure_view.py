"""What a keyless server reads of single cells: one site's single-cell leaks, against the sum it receives
with secure aggregation (the geometry-matching attack of ``scinfl.privacy.geometry``).

Setup: scanpy's ``pbmc68k_reduced`` (700 PBMCs, 765 log-normalised genes in ``.raw``), 20% held out as the
attacker's public cohort (stratified), the rest split into 3 label-skewed sites
(``scinfl.pp.split_sites(alpha=0.5)``); a hardened classifier (default network) trained with secure
aggregation, R rounds. The attacker has no key.

Two views of the largest site's cells (its "members"):

``single-cell leaks`` (the positive control: a server that sees one site's single-cell gradients, the
    worst case of ``secure_aggregation=False``)
    For each victim, the first layer's ``dW / db`` of its gradient at the trained weights
    (:func:`scinfl.privacy.analytic.invert_first_layer`): the cell, mixed by the key. The geometry attack
    couples the leaked set with the public cohort, once with the public cells weighted equally and once
    weighted to the site's true cell-type mix (an attacker who knows or estimates it).
``secure sum``
    What the server receives with secure aggregation: each round's change of the global weights, the
    cohort's weighted sum of updates after a local epoch at every site. Its first layer gives one vector
    per hidden unit (``dW[i] / db[i]``), a mixture of the round's cells; every round's vectors go to the
    same attack (equal public weights: no per-site mix can be told from a sum).

Both views are scored the same way, on the attack's reconstructions (coupling-weighted public profiles):
``best match``: for each member, the best mean-subtracted Pearson over all reconstructions (an oracle
that knows which reconstruction to compare: an upper bound for the attacker), against the best over the
public cohort's cell-type mean profiles (free to the attacker). The single-cell view also has the
attack's own per-victim figures (cell type against the majority class, mean-subtracted Pearson against
the victim's cell-type mean profile, linkage in a pool of all cells), which a sum of many cells cannot
be scored by: none of its vectors belongs to one cell.

Run::

    python benchmarks/secure_view.py               # 20 rounds, 200 victims, about 2 minutes
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time

import numpy as np
import scanpy as sc
import torch

import scinfl as si
from scinfl.federation import InProcess, RunSpec, federate
from scinfl.privacy.analytic import invert_first_layer
from scinfl.privacy.geometry import geometry_attack, match_geometry, reconstruct
from scinfl.privacy.gradients import client_gradient
from scinfl.privacy.metrics import _pearson_of_deviation
from scinfl.tasks import build_network
from scinfl.train import key_material

FIRST_LAYER = "network.embedding.0"  # the hardened classifier's first linear layer


class Recording(InProcess):
    """In-process sites; keeps the global weights sent in every exchange (what the server holds)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.sent: list[dict[str, torch.Tensor]] = []

    def exchange(self, round_index, state, spec, config, instructions):
        self.sent.append({k: v.clone() for k, v in state.items()})
        return super().exchange(round_index, state, spec, config, instructions)


def dense(adata) -> np.ndarray:
    matrix = adata.raw.X
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float32)


def ratio_vectors(weight: torch.Tensor, bias: torch.Tensor, tolerance: float = 1e-3) -> np.ndarray:
    """``weight[i] / bias[i]`` for the rows whose ``|bias|`` is at least ``tolerance`` of the largest."""
    weight, bias = weight.double().numpy(), bias.double().numpy()
    keep = np.abs(bias) >= tolerance * np.abs(bias).max()
    return weight[keep] / bias[keep, None]


def scores(
    reconstructions: np.ndarray, members: np.ndarray, public: np.ndarray, public_y: np.ndarray
) -> dict[str, float]:
    """``best match``: per member, the best mean-subtracted Pearson over ``reconstructions`` (an oracle
    that knows which one to compare: an upper bound for the attacker), averaged over members; against
    ``best cell-type mean``: the same over the public cohort's cell-type mean profiles, which an attacker
    has for free (the reconstructions are averages of public profiles, so this is what they reach when
    they only find the cell type)."""
    public_mean = public.mean(0)
    type_means = np.stack([public[public_y == c].mean(0) for c in np.unique(public_y)])

    def best(candidates: np.ndarray) -> float:
        return float(
            np.mean([max(_pearson_of_deviation(c, m, public_mean) for c in candidates) for m in members])
        )

    return {"best match": best(reconstructions), "best cell-type mean": best(type_means)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--victims", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    si.settings.progress = False
    torch.set_num_threads(1)
    started = time.perf_counter()

    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)
    train, public_adata = si.pp.split_holdout(adata, label_key="bulk_labels", fraction=0.2, seed=args.seed)
    sites = si.pp.split_sites(train, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=args.seed)
    key = si.FederationKey(hashlib.sha256(f"secure view {args.seed}".encode()).digest(), scheme="hardened")
    spec = RunSpec(
        task=si.tasks.Classification(label_key="bulk_labels"),
        sites=tuple(sites),
        key_fingerprint=key.fingerprint,
        scheme=key.scheme,
        rounds=args.rounds,
        seed=args.seed,
    )
    transport = Recording(sites, dict.fromkeys(sites, key))
    run = federate(transport, spec)
    network = build_network(run.config)
    network.load_state_dict(run.final_state)
    material = key_material(key, network)

    site = max(sites, key=lambda s: sites[s].n_obs)
    members, public = dense(sites[site]), dense(public_adata)
    categories = run.config.schema.categories
    members_y = np.array([categories.index(v) for v in sites[site].obs["bulk_labels"].astype(str)])
    public_y = np.array([categories.index(v) for v in public_adata.obs["bulk_labels"].astype(str)])
    # the attacker-favourable public weights: the site's own cell-type mix
    site_mix = np.bincount(members_y, minlength=len(categories)) / len(members_y)
    public_count = np.bincount(public_y, minlength=len(categories))
    mix_weights = site_mix[public_y] / np.maximum(public_count[public_y], 1)
    mix_weights = mix_weights / mix_weights.sum()
    print(
        f"{len(sites)} sites, {args.rounds} rounds, secure aggregation; site {site!r}: {len(members)} cells; "
        f"public cohort {len(public)} cells; no key"
    )

    # Positive control: single-cell leaks of the site's cells.
    rng = np.random.default_rng(args.seed)
    victims, leaked = [], []
    for victim in rng.permutation(len(members))[: args.victims]:
        x = torch.from_numpy(members[victim : victim + 1])
        y = torch.tensor([members_y[victim]])
        grads = client_gradient(network, x, y, key_material=material)
        if torch.any(grads[f"{FIRST_LAYER}.bias"]):
            leaked.append(invert_first_layer(grads[f"{FIRST_LAYER}.weight"], grads[f"{FIRST_LAYER}.bias"]))
            victims.append(int(victim))
    leaked, victims = np.stack(leaked), np.array(victims)
    pool = np.concatenate([members, public])
    print(
        f"\nsingle-cell leaks of {len(victims)} of the site's cells (the worst case, no secure aggregation)"
    )
    for name, weights in (
        ("public cells weighted equally", None),
        ("weighted to the site's mix", mix_weights),
    ):
        found = geometry_attack(
            leaked,
            public,
            public_y,
            truth=members[victims],
            truth_labels=members_y[victims],
            pool=pool,
            pool_index=victims,
            public_weights=weights,
            seed=args.seed,
        )
        reconstructions = reconstruct(
            match_geometry(leaked, public, public_weights=weights, seed=args.seed), public
        )
        scored = scores(reconstructions, members[victims], public, public_y)
        print(
            f"  {name}: cell type {found['celltype_accuracy']:.3f} (majority {found['celltype_majority']:.3f}); "
            f"mean-subtracted Pearson {found['pearson_minus_mean']:.3f} (victim's cell-type mean "
            f"{found['prior_celltype_pearson_minus_mean']:.3f}); linkage top-1 "
            f"{found['linkage_geometry_top1_x_chance']:.1f}x chance; best match {scored['best match']:.3f} "
            f"(best cell-type mean {scored['best cell-type mean']:.3f})"
        )

    # What the server receives with secure aggregation: each round's sum of the cohort's updates.
    sums = []
    for before, after in zip(transport.sent[:-1], transport.sent[1:], strict=True):
        weight = after[f"{FIRST_LAYER}.weight"] - before[f"{FIRST_LAYER}.weight"]
        bias = after[f"{FIRST_LAYER}.bias"] - before[f"{FIRST_LAYER}.bias"]
        sums.append(ratio_vectors(weight, bias))
    candidates = np.concatenate(sums)
    reconstructions = reconstruct(match_geometry(candidates, public, seed=args.seed), public)
    scored = scores(reconstructions, members[victims], public, public_y)
    print(
        f"\nsecure sum: {len(sums)} rounds' sums, {len(candidates)} first-layer vectors\n"
        f"  best match {scored['best match']:.3f} (best cell-type mean {scored['best cell-type mean']:.3f})"
    )
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
