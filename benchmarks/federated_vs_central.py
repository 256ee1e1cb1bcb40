"""Wall time of keyed federated training against centralised training of the same model.

Both arms are the same call, :func:`scinfl.tl.train_federated` with a key and ``label_key="bulk_labels"``
(``scinfl.settings.progress = False``, ``secure_aggregation=False``: one site cannot be masked), on scanpy's bundled ``pbmc68k_reduced`` (700 cells, 765 genes),
registered with ``scinfl.pp.register_site(adata, use_raw=True)`` (its log-normalised values are in ``.raw``;
the sites split from it inherit the registration):

``federated``
    5 label-skewed sites (``scinfl.pp.split_sites(adata, n_sites=5, label_key="bulk_labels", alpha=0.5,
    seed=0)``), R rounds x 1 local epoch.
``central``
    One site holding all 700 cells, R rounds x 1 local epoch: the same total epochs through the same code
    path (local fit, aggregation, evaluation, final predictions), with the same hidden size and batch size.

The time of each call (setup and writing the predictions included) is measured ``--repeats`` times per arm
and per torch thread count (``scinfl.settings.torch_threads``), interleaving the arms, and reported as
medians with their ratio. Every call gets fresh copies of the AnnData objects, made outside the timing.

A separate, instrumented call per arm then splits the time: scinfl functions are wrapped in this script
(monkeypatching, nothing in ``src/`` changes) and each wrapper records its time minus that of the wrapped
calls inside it. The instrumented calls are not part of the timing above.

With ``--profile``, one more federated call runs under cProfile and its 15 costliest functions (own time)
are printed, then the cumulative time of seeding and of the updates' finiteness check.

Run::

    python benchmarks/federated_vs_central.py
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import logging
import os
import pstats
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import numpy as np
import scanpy as sc
import torch
from anndata import AnnData

import scinfl as si
from scinfl import FederatedModel
from scinfl.data import SiteDataset
from scinfl.federation import federate
from scinfl.train import SiteTrainer, TrainingPlan

GOAL = 1.25
N_SITES = 5


def make_arms(adata: AnnData) -> dict[str, dict[str, AnnData]]:
    """The two arms' sites: 5 label-skewed sites, and one site with every cell."""
    sites = si.pp.split_sites(adata, n_sites=N_SITES, label_key="bulk_labels", alpha=0.5, seed=0)
    return {"federated": sites, "central": {"all": adata.copy()}}


def train(sites: dict[str, AnnData], key: si.FederationKey, rounds: int) -> float:
    """Seconds taken by one ``train_federated`` call on fresh copies of ``sites``."""
    fresh = {name: adata.copy() for name, adata in sites.items()}
    t0 = time.perf_counter()
    si.tl.train_federated(
        fresh,
        key=key,
        label_key="bulk_labels",
        rounds=rounds,
        fit={"local_epochs": 1},
        secure_aggregation=False,
    )
    return time.perf_counter() - t0


# --- Instrumentation (benchmark only): exclusive time of wrapped scinfl functions --------------------------


class Recorder:
    """Exclusive seconds and call counts per label; a wrapped call's time excludes wrapped calls inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []  # [label, seconds spent in wrapped children]

    def wrap(self, label: str | Callable[[], str], function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            name = label() if callable(label) else label
            self._stack.append([name, 0.0])
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                _, children = self._stack.pop()
                self.seconds[name] += elapsed - children
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1][1] += elapsed

        return wrapper

    def phase(self) -> str:
        """The innermost wrapped fit, evaluate or predict phase in progress (to attribute batch loading)."""
        phases = [label for label, _ in self._stack if label.startswith(("fit", "evaluate", "predict"))]
        return phases[-1].split(":")[0] if phases else "other"


ROWS = (
    ("fit: fit_plan, rest", "optimiser set-up, batches to the device, backward, Adam step, loop"),
    ("fit: training_step", "forward + loss"),
    ("fit: batch loading", "SiteDataset.__getitem__ during local fits"),
    ("fit: SiteTrainer.fit, rest", "load global weights, build the loader, copy the state"),
    ("aggregate", "key-version check + FedAvg"),
    ("evaluate: SiteTrainer.evaluate, rest", "validation forward passes and metrics"),
    ("evaluate: batch loading", "SiteDataset.__getitem__ during evaluation"),
    ("federate, rest", "round loop bookkeeping, history rows"),
    ("predict: FederatedModel.predict", "final predictions for every site (without batch loading)"),
    ("predict: batch loading", "SiteDataset.__getitem__ during predictions"),
    ("train_federated, rest", "validation, schema, matrices, network build, writing outputs"),
)


@contextmanager
def instrumented(recorder: Recorder) -> Iterator[None]:
    """Wrap the scinfl functions a federated run goes through, restoring them afterwards."""
    # Patch each name where its caller looks it up (the module that defines the caller).
    tl_module = sys.modules[si.tl.train_federated.__module__]
    site_module = sys.modules[SiteTrainer.__module__]
    rounds_module = sys.modules[federate.__module__]
    targets = [
        (tl_module, "federate", "federate, rest"),
        (SiteTrainer, "fit", "fit: SiteTrainer.fit, rest"),
        (site_module, "fit_plan", "fit: fit_plan, rest"),
        (TrainingPlan, "training_step", "fit: training_step"),
        (rounds_module, "aggregate", "aggregate"),
        (SiteTrainer, "evaluate", "evaluate: SiteTrainer.evaluate, rest"),
        (FederatedModel, "predict", "predict: FederatedModel.predict"),
    ]
    with ExitStack() as stack:
        for owner, attribute, label in targets:
            original = getattr(owner, attribute, None)
            if original is None:  # scinfl was refactored: say so rather than fail
                print(
                    f"  (not instrumented: {getattr(owner, '__name__', owner)}.{attribute} no longer exists)"
                )
                continue
            stack.enter_context(mock.patch.object(owner, attribute, recorder.wrap(label, original)))
        getitem = SiteDataset.__getitem__
        stack.enter_context(
            mock.patch.object(
                SiteDataset,
                "__getitem__",
                recorder.wrap(lambda: f"{recorder.phase()}: batch loading", getitem),
            )
        )
        yield


def breakdown(arms: dict[str, dict[str, AnnData]], key: si.FederationKey, rounds: int) -> None:
    """One instrumented call per arm; print the exclusive time of each part side by side."""
    results: dict[str, Recorder] = {}
    totals: dict[str, float] = {}
    for arm, sites in arms.items():
        recorder = Recorder()
        with instrumented(recorder):
            fresh = {name: adata.copy() for name, adata in sites.items()}
            call = recorder.wrap("train_federated, rest", si.tl.train_federated)
            t0 = time.perf_counter()
            call(fresh, key=key, label_key="bulk_labels", rounds=rounds, secure_aggregation=False)
            totals[arm] = time.perf_counter() - t0
        results[arm] = recorder

    print(
        f"  {'part (exclusive ms, instrumented calls)':<50} {'federated':>18} {'central':>18} "
        f"{'extra':>6}  what"
    )
    for label, what in ROWS:
        cells, ms = [], []
        for arm in arms:
            seconds, calls = results[arm].seconds.get(label, 0.0), results[arm].calls.get(label, 0)
            ms.append(1e3 * seconds)
            per_call = f"{1e3 * seconds / calls:5.1f}/call" if calls else ""
            cells.append(f"{1e3 * seconds:5.0f} {per_call:>10}")
        print(f"  {label:<50} {cells[0]:>18} {cells[1]:>18} {ms[0] - ms[1]:>6.0f}  {what}")
    ms = [1e3 * totals[arm] for arm in arms]
    print(f"  {'total':<50} {ms[0]:>18.0f} {ms[1]:>18.0f} {ms[0] - ms[1]:>6.0f}")
    calls = {arm: results[arm].calls.get("fit: training_step", 0) for arm in arms}
    fits = {arm: results[arm].calls.get("fit: SiteTrainer.fit, rest", 0) for arm in arms}
    print(
        f"  local fits: {fits['federated']} vs {fits['central']}; optimizer steps: "
        f"{calls['federated']} vs {calls['central']} (a site's last, partial batch is a step of its own)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds R (1 local epoch each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per arm and thread count")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="scinfl.settings.torch_threads"
    )
    parser.add_argument("--no-breakdown", action="store_true", help="skip the instrumented breakdown")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one federated call (cProfile, top functions)"
    )
    parser.add_argument(
        "--replicate",
        type=int,
        default=1,
        help="resample the real cells N-fold (with replacement) so that sites hold realistic numbers of cells",
    )
    args = parser.parse_args()

    logging.getLogger("scinfl").setLevel(logging.WARNING)  # no per-run "Selected round" line
    si.settings.progress = False
    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)  # its log-normalised values; copies and splits inherit it
    if args.replicate > 1:
        # Real profiles drawn with replacement: more cells per site, the same biology and sparsity.
        rows = np.random.default_rng(0).integers(0, adata.n_obs, size=args.replicate * adata.n_obs)
        adata = adata[rows].copy()
        adata.obs_names_make_unique()
    arms = make_arms(adata)
    key = si.FederationKey.generate(scheme="infl")
    sizes = ", ".join(str(a.n_obs) for a in arms["federated"].values())
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
        f"pbmc68k_reduced {adata.n_obs} cells x {adata.raw.n_vars} genes (.raw); federated: {N_SITES} sites "
        f"({sizes} cells), central: 1 site ({adata.n_obs} cells); {args.rounds} rounds x 1 local epoch, "
        "hidden 256, batch 128, keyed (scheme infl)"
    )
    train(arms["central"], key, 1)  # warm-up: imports, first fit, allocator

    summary = []
    for threads in args.threads:
        si.settings.torch_threads = threads
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for r in range(args.repeats):
            for arm in list(arms)[:: 1 if r % 2 == 0 else -1]:  # alternate which arm runs first
                times[arm].append(train(arms[arm], key, args.rounds))
        medians = {arm: statistics.median(t) for arm, t in times.items()}
        ratio = medians["federated"] / medians["central"]
        summary.append((threads, medians, ratio))
        print(f"\ntorch threads {threads}: {args.repeats} calls per arm")
        for arm, t in times.items():
            print(f"  {arm:<10} median {medians[arm]:6.2f} s   runs {', '.join(f'{x:.2f}' for x in t)} s")
        print(f"  ratio federated / central {ratio:.2f}x (goal <= {GOAL:.2f}x)")
        if not args.no_breakdown:
            breakdown(arms, key, args.rounds)

    print(f"\n{'threads':>7} {'federated s':>12} {'central s':>10} {'ratio':>7}  goal <= {GOAL:.2f}x")
    for threads, medians, ratio in summary:
        verdict = "met" if ratio <= GOAL else "MISSED"
        print(
            f"{threads:>7} {medians['federated']:>12.2f} {medians['central']:>10.2f} "
            f"{ratio:>6.2f}x  {verdict}"
        )
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.profile:
        si.settings.torch_threads = args.threads[0]
        profiler = cProfile.Profile()
        profiler.runcall(train, arms["federated"], key, args.rounds)
        print(f"\nOne federated call under cProfile ({args.threads[0]} thread(s)), by own time:")
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(15)
        print("Seeding and the finiteness check of updates (cumulative):")
        stats.sort_stats("cumulative").print_stats("manual_seed|check_finite|format_stack")


if __name__ == "__main__":
    main()
