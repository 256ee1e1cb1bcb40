"""What secure aggregation costs: round time, bytes per site, and accuracy, masked against in the clear.

Sites: scanpy's bundled ``pbmc68k_reduced`` (700 real PBMCs, 765 log-normalised genes in ``.raw``), split
into N label-skewed sites (``scinfl.pp.split_sites(alpha=0.5)``) after holding out 20% of the cells;
classification of ``bulk_labels`` with the default network under a hardened key, R rounds x 1 local epoch.

``round time``
    :func:`scinfl.tl.train_federated` in-process, ``secure_aggregation=True`` (the default: every site
    masks its update, the server sums) against ``False`` (updates in the clear), per round, median of
    repeated runs; 3 and 10 sites.
``masking alone``
    One site's :func:`scinfl.federation.secure.mask_update` and the server's
    :func:`~scinfl.federation.secure.unmask_sum` for the default network at 765 and 2,000 genes, in a
    cohort of 3 and of 10.
``bytes per site``
    A site's reply as Flower serialises it (:func:`scinfl.federation.flower.protocol.encode_reply`), masked
    against in the clear, and the global weights every site receives.
``accuracy``
    Held-out accuracy and the largest weight difference of the two, over 3 seeds.
``deployment`` (``--deployment``)
    The median round of a loopback deployment (``LocalDeployment``: a SuperLink and a SuperNode per site,
    one ClientApp process per message), masked and in the clear.

Run::

    python benchmarks/secure_aggregation.py                  # about 1 minute
    python benchmarks/secure_aggregation.py --deployment     # plus two loopback deployments (minutes)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import scanpy as sc
import torch

import scinfl as si
from scinfl.federation.secure import MaskedUpdate, MaskingKey, SecureRound, mask_update, unmask_sum

KEY = si.FederationKey(hashlib.sha256(b"secure aggregation benchmark").digest(), scheme="hardened")
TIME_GOAL = 1.3  # x the round time in the clear
BYTES_GOAL = 2.0  # x the bytes per site in the clear


def _sites(n_sites: int, seed: int = 0):
    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)
    train, held_out = si.pp.split_holdout(adata, label_key="bulk_labels", fraction=0.2, seed=seed)
    return si.pp.split_sites(train, n_sites=n_sites, label_key="bulk_labels", alpha=0.5, seed=seed), held_out


def _accuracy(model, held_out) -> float:
    query = held_out.copy()
    si.tl.predict(query, model, key=KEY)
    return float((query.obs["scinfl_prediction"].astype(str) == query.obs["bulk_labels"].astype(str)).mean())


def round_times(n_sites: int, rounds: int, repeats: int) -> dict[bool, float]:
    sites, _ = _sites(n_sites)
    out = {}
    for secure in (False, True):
        per_round = []
        for _ in range(repeats):
            started = time.perf_counter()
            si.tl.train_federated(
                sites, key=KEY, label_key="bulk_labels", rounds=rounds, copy=True, secure_aggregation=secure
            )
            per_round.append((time.perf_counter() - started) / rounds)
        out[secure] = statistics.median(per_round)
    return out


def masking_alone(n_genes: int, cohort: int, repeats: int = 5) -> tuple[float, float, int]:
    """Seconds for one site to mask and for the server to unmask the cohort's sum; parameters."""
    network = si.nn.ResidualMLPClassifier(n_genes, 10)  # the default classifier's shape
    state = network.state_dict()
    names = [f"site_{i}" for i in range(cohort)]
    keys = {name: MaskingKey.generate() for name in names}
    secure = SecureRound(1, 0, tuple(names), {n: k.public for n, k in keys.items()}, run="benchmark")
    mask_seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        vector = mask_update(state, 100, state, secure, names[0], keys[names[0]])
        mask_seconds.append(time.perf_counter() - started)
    updates = [MaskedUpdate(vector, 100, None)] + [
        MaskedUpdate(mask_update(state, 100, state, secure, n, keys[n]), 100, None) for n in names[1:]
    ]
    started = time.perf_counter()
    unmask_sum(updates, state)
    return (
        statistics.median(mask_seconds),
        time.perf_counter() - started,
        sum(t.numel() for t in state.values()),
    )


def reply_bytes(n_genes: int) -> tuple[int, int, int]:
    """A site's reply in the clear and masked, and the global weights a site receives, as Flower's
    serialised records (bytes)."""
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from scinfl.federation import Reply
    from scinfl.federation.flower import protocol
    from scinfl.train import LocalFitResult

    def size(content: RecordDict) -> int:  # the serialised objects a message carries
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())

    state = si.nn.ResidualMLPClassifier(n_genes, 10).state_dict()
    metrics = {"train_loss": 1.0}
    clear = Reply(100, "f" * 16, LocalFitResult(state, 100, "f" * 16, metrics))
    names = ("a", "b", "c")
    keys = {n: MaskingKey.generate() for n in names}
    secure = SecureRound(1, 0, names, {n: k.public for n, k in keys.items()}, run="benchmark")
    masked = Reply(
        100,
        "f" * 16,
        MaskedUpdate(mask_update(state, 100, state, secure, "a", keys["a"]), 100, "f" * 16, metrics),
    )
    weights = RecordDict({protocol.WEIGHTS: protocol.state_to_arrays(state)})
    return size(protocol.encode_reply("a", clear)), size(protocol.encode_reply("a", masked)), size(weights)


def accuracy_over_seeds(seeds: tuple[int, ...], rounds: int) -> list[tuple[int, float, float, float]]:
    rows = []
    for seed in seeds:
        sites, held_out = _sites(3, seed)
        models = {
            secure: si.tl.train_federated(
                sites,
                key=KEY,
                label_key="bulk_labels",
                rounds=rounds,
                seed=seed,
                copy=True,
                secure_aggregation=secure,
            )
            for secure in (False, True)
        }
        difference = max(
            float((models[True].network.state_dict()[n].double() - t.double()).abs().max())
            for n, t in models[False].network.state_dict().items()
        )
        rows.append((seed, _accuracy(models[False], held_out), _accuracy(models[True], held_out), difference))
    return rows


def deployment_round(n_sites: int, rounds: int, secure: bool) -> float:
    from scinfl.deployment import LocalDeployment, run_config, site_nodes

    sites, _ = _sites(n_sites)
    spec = si.tl.train_federated(
        sites, key=KEY, label_key="bulk_labels", rounds=1, copy=True, secure_aggregation=secure
    ).spec.replace(rounds=rounds)
    with tempfile.TemporaryDirectory(prefix="scinfl-secagg-bench-") as tmp:
        tmp = Path(tmp)
        nodes = site_nodes(sites, tmp, KEY.save(tmp / "consortium.key"))
        with LocalDeployment(tmp / "flower", nodes) as deployment:
            completed = deployment.run(run_config(spec, tmp / "run"), timeout=1800)
    if completed.returncode != 0:
        raise SystemExit(f"flwr run failed:\n{completed.stdout[-3000:]}")
    per_round = [float(s) for s in re.findall(r"Round \d+ of \d+: .*\(([\d.]+) s\)", completed.stdout)]
    return statistics.median(per_round)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deployment", action="store_true", help="also time loopback deployments")
    args = parser.parse_args()
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    # 10 label-skewed sites of 558 cells: one has 6 (train_federated warns; the timing is the point here)
    warnings.filterwarnings("ignore", message=r"Site .* has \d+ cells")
    si.settings.progress = False
    torch.set_num_threads(1)
    print(f"pbmc68k_reduced, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    print("\nround time in-process (median per round)")
    for n_sites in (3, 10):
        times = round_times(n_sites, args.rounds, args.repeats)
        ratio = times[True] / times[False]
        print(
            f"  {n_sites:2d} sites: clear {times[False] * 1e3:7.1f} ms, masked {times[True] * 1e3:7.1f} ms, "
            f"{ratio:.2f}x (goal <= {TIME_GOAL}x: {'met' if ratio <= TIME_GOAL else 'missed'})"
        )

    print("\nmasking alone (default network)")
    for n_genes in (765, 2000):
        for cohort in (3, 10):
            mask, unmask, parameters = masking_alone(n_genes, cohort)
            print(
                f"  {n_genes:5d} genes ({parameters:,} parameters), cohort {cohort:2d}: one site masks in "
                f"{mask * 1e3:6.1f} ms, the server unmasks the sum in {unmask * 1e3:6.1f} ms"
            )

    print("\nbytes per site and round (Flower's serialised records)")
    for n_genes in (765, 2000):
        clear, masked, weights = reply_bytes(n_genes)
        ratio = masked / clear
        both = (masked + weights) / (clear + weights)
        print(
            f"  {n_genes:5d} genes: reply clear {clear / 1e6:.3f} MB, masked {masked / 1e6:.3f} MB ({ratio:.4f}x, "
            f"goal <= {BYTES_GOAL}x: {'met' if ratio <= BYTES_GOAL else 'missed'}: 8-byte integers for 4-byte "
            f"floats, plus one count per tensor); with the global weights received ({weights / 1e6:.3f} MB) "
            f"{both:.3f}x"
        )

    print("\naccuracy, 3 sites, held-out 20% (clear vs masked; largest weight difference)")
    for seed, clear, masked, difference in accuracy_over_seeds((0, 1, 2), rounds=10):
        print(
            f"  seed {seed}: clear {clear:.3f}, masked {masked:.3f}, max |weight difference| {difference:.2e}"
        )

    if args.deployment:
        print("\nloopback deployment, 3 sites, median round")
        rounds = {secure: deployment_round(3, args.rounds, secure) for secure in (False, True)}
        print(
            f"  clear {rounds[False]:.2f} s, masked {rounds[True]:.2f} s, {rounds[True] / rounds[False]:.2f}x "
            f"(goal <= {TIME_GOAL}x: {'met' if rounds[True] <= TIME_GOAL * rounds[False] else 'missed'})"
        )


if __name__ == "__main__":
    main()
