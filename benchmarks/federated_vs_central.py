"""Wall time of keyed federated training against centralised training of the same model.

Both arms are the same call, :func:`scinfl.tl.train_federated` with a key, ``use_raw=True``,
``label_key="bulk_labels"`` and ``progress=False``, on scanpy's bundled ``pbmc68k_reduced`` (700 cells,
765 genes):

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

Run::

    python benchmarks/federated_vs_central.py
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import scanpy as sc
import torch
from anndata import AnnData

import scinfl as si
from scinfl.data import loader as data_loader
from scinfl.federation import engine
from scinfl.model import FederatedModel
from scinfl.train import TrainingPlan, site

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
        fresh, key=key, label_key="bulk_labels", use_raw=True, rounds=rounds, local_epochs=1, progress=False
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
        """The outermost wrapped scinfl phase in progress (to attribute batch loading)."""
        phases = [label for label, _ in self._stack if label.startswith(("fit", "evaluate", "predict"))]
        return phases[-1].split(":")[0] if phases else "other"


ROWS = (
    ("fit: Lightning fit_local, not in steps or batches", "Trainer build + fit loop and hooks"),
    ("fit: optimizer steps", "forward + backward + Adam (training_step inside optimizer_step)"),
    ("fit: batch loading", "SiteDataset.__getitem__ during local fits"),
    ("fit: SiteTrainer.fit, rest", "load global weights, build the loader, copy the state"),
    ("aggregate", "key-version check + FedAvg"),
    ("evaluate: SiteTrainer.evaluate, rest", "validation forward passes and metrics"),
    ("evaluate: batch loading", "SiteDataset.__getitem__ during evaluation"),
    ("run_local, rest", "round loop bookkeeping, history rows"),
    ("predict: FederatedModel.predict", "final predictions for every site (without batch loading)"),
    ("predict: batch loading", "SiteDataset.__getitem__ during predictions"),
    ("train_federated, rest", "validation, schema, matrices, network build, writing outputs"),
)


@contextmanager
def instrumented(recorder: Recorder) -> Iterator[None]:
    """Wrap the scinfl functions a federated run goes through, restoring them afterwards."""
    targets = [
        (si.tl, "run_local", "run_local, rest"),
        (site.SiteTrainer, "fit", "fit: SiteTrainer.fit, rest"),
        (site, "fit_local", "fit: Lightning fit_local, not in steps or batches"),
        (TrainingPlan, "optimizer_step", "fit: optimizer steps"),
        (engine, "aggregate", "aggregate"),
        (site.SiteTrainer, "evaluate", "evaluate: SiteTrainer.evaluate, rest"),
        (FederatedModel, "predict", "predict: FederatedModel.predict"),
    ]
    with ExitStack() as stack:
        for owner, attribute, label in targets:
            original = getattr(owner, attribute)  # TrainingPlan.optimizer_step: LightningModule's
            stack.enter_context(mock.patch.object(owner, attribute, recorder.wrap(label, original)))
        getitem = data_loader.SiteDataset.__getitem__
        stack.enter_context(
            mock.patch.object(
                data_loader.SiteDataset,
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
            call(fresh, key=key, label_key="bulk_labels", use_raw=True, rounds=rounds, progress=False)
            totals[arm] = time.perf_counter() - t0
        results[arm] = recorder

    print(f"  {'part (exclusive time, instrumented run)':<52} {'federated':>16} {'central':>16}  what")
    for label, what in ROWS:
        cells = []
        for arm in arms:
            seconds, calls = results[arm].seconds.get(label, 0.0), results[arm].calls.get(label, 0)
            cells.append(f"{1e3 * seconds:7.0f} ms ({calls:4d})")
        print(f"  {label:<52} {cells[0]:>16} {cells[1]:>16}  {what}")
    total_cells = [f"{1e3 * totals[arm]:7.0f} ms" for arm in arms]
    print(f"  {'total (instrumented)':<52} {total_cells[0]:>16} {total_cells[1]:>16}")
    print("  (calls in brackets)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds R (1 local epoch each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per arm and thread count")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="scinfl.settings.torch_threads"
    )
    parser.add_argument("--no-breakdown", action="store_true", help="skip the instrumented breakdown")
    args = parser.parse_args()

    logging.getLogger("scinfl").setLevel(logging.WARNING)  # no per-run "Selected round" line
    adata = sc.datasets.pbmc68k_reduced()
    arms = make_arms(adata)
    key = si.FederationKey.generate()
    sizes = ", ".join(str(a.n_obs) for a in arms["federated"].values())
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
        f"pbmc68k_reduced {adata.n_obs} cells x {adata.raw.n_vars} genes (.raw); federated: {N_SITES} sites "
        f"({sizes} cells), central: 1 site ({adata.n_obs} cells); {args.rounds} rounds x 1 local epoch, "
        "hidden 256, batch 128, keyed (scheme infl)"
    )
    train(arms["central"], key, 1)  # warm-up: imports, first Trainer, allocator

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
            f"{threads:>7} {medians['federated']:>12.2f} {medians['central']:>10.2f} {ratio:>6.2f}x  {verdict}"
        )
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
