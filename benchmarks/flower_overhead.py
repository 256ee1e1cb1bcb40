"""What running the rounds on Flower costs, against the in-process engine.

Sites: scanpy's bundled ``pbmc68k_reduced`` split into 3 label-skewed sites
(``scinfl.pp.split_sites(adata, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=0)``), registered with
``use_raw=True`` (``scinfl.pp.register_site``), trained with :func:`scinfl.tl.train_federated` (a key,
``label_key="bulk_labels"``, default network, R rounds x 1 local epoch):

``in-process``
    ``engine="local"``.
``simulation``
    ``engine="flower"``: Flower's simulation runtime (ServerApp in this process, ClientApps in Ray workers).
    Its weights are checked to equal the in-process run's.
``deployment``
    A SuperLink and one SuperNode per site on 127.0.0.1 (:class:`scinfl.deployment.
    LocalDeployment`) running ``scinfl.flower_apps``, then ``flwr run`` with the in-process run's spec as
    run config (:func:`scinfl.deployment.run_config`): the time of the whole ``flwr run``,
    and per round as the ServerApp logs it (each round's exchange: the SuperNodes' poll, one ClientApp
    process per site and message, the local fit, the reply). Its weights are checked to equal the
    in-process run's.

Each call's wall time includes setup and writing predictions; the simulation's includes Ray's start-up.

Per phase:

``ClientApp imports``
    A fresh interpreter importing ``scinfl.flower_apps``, building one Adam optimiser (torch imports
    ``torch._dynamo`` there) and importing the training plan (Lightning), as every deployed training
    message's process does: each step's seconds, the whole process's wall and CPU seconds (with
    interpreter start-up and exit), and each heavy package's share by ``python -X importtime`` (cumulative, so nested packages overlap). Beside it, the wall time of
    ``python -c "import scinfl"`` and of ``python -m scinfl`` (its usage message), as a user meets them.
``deployment phases``
    From each site's log (one line per training message, :func:`scinfl.federation.flower.client.
    answer_train`): the ClientApp process's age when the message reached scinfl (its imports and Flower's
    set-up, with the sites' processes sharing the cores), the site's data and trainer, and its answer; the
    rest of a round (the slowest site's sum subtracted from the round) is the SuperNode's poll, transfers
    and aggregation.

Run::

    python benchmarks/flower_overhead.py               # 3 sites x 5 rounds
    python benchmarks/flower_overhead.py --rounds 10 --skip-deployment
    python benchmarks/flower_overhead.py --imports-only   # the ClientApp import alone
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import scanpy as sc
import torch

import scinfl as si
from scinfl.deployment import LocalDeployment, run_config, site_nodes

SIMULATION_GOAL = 1.5  # x the in-process wall time
DEPLOYMENT_GOAL = 5.0  # seconds per round
# A training message's process: the ClientApp's imports, its first optimiser (torch._dynamo), then the
# training plan (Lightning; absent before 2026-12-08, when a site trained without Lightning).
CLIENT_IMPORT = (
    "import time; t = time.perf_counter(); import scinfl.flower_apps, torch; i = time.perf_counter(); "
    "torch.optim.Adam([torch.zeros(1, requires_grad=True)]); o = time.perf_counter()\n"
    "try:\n    import scinfl.train.plan\nexcept ImportError:\n    pass\n"
    "print(i - t, o - i, time.perf_counter() - o)"
)
HEAVY = (
    "torch",
    "torch._dynamo",
    "lightning",
    "anndata",
    "flwr",
    "sklearn",
    "matplotlib",
    "scanpy",
    "scinfl",
)
PHASE = re.compile(
    r"Site '([^']+)': data and trainer ([\d.]+) s, answer ([\d.]+) s; the message reached scinfl ([\d.]+) s"
)


def client_import(repeats: int = 3) -> None:
    """Wall and CPU seconds of a fresh ClientApp process's imports, and the heavy packages' shares."""
    walls, cpus, imports, optimisers, plans = [], [], [], [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", CLIENT_IMPORT], check=True, capture_output=True, text=True
        )
        walls.append(time.perf_counter() - started)
        imported, optimiser, plan = (float(v) for v in child.stdout.split())
        imports.append(imported)
        optimisers.append(optimiser)
        plans.append(plan)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    for label, command in (
        ("import scinfl", ["-c", "import scinfl"]),
        ("python -m scinfl", ["-m", "scinfl"]),
    ):
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, *command], capture_output=True, check=False)
            seconds.append(time.perf_counter() - started)
        print(
            f"{label:<23} {statistics.median(seconds):7.2f} s wall, the whole process (median of {repeats})"
        )
    trace = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", CLIENT_IMPORT], check=True, capture_output=True, text=True
    ).stderr
    cumulative: dict[str, float] = {}
    for line in trace.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            cumulative[parts[2].strip()] = max(cumulative.get(parts[2].strip(), 0.0), int(parts[1]) / 1e6)
    shares = ", ".join(f"{name} {cumulative[name]:.2f}" for name in HEAVY if name in cumulative)
    print(
        f"ClientApp imports       {statistics.median(imports):7.2f} s, first optimiser "
        f"{statistics.median(optimisers):.2f} s, training plan (Lightning) {statistics.median(plans):.2f} s; the whole process (interpreter start and exit included) "
        f"{statistics.median(walls):.2f} s wall, {statistics.median(cpus):.2f} s CPU (medians of {repeats}); "
        f"by -X importtime, cumulative s: {shares}"
    )


def deployment_phases(logs: list[str], per_round: list[float]) -> None:
    """The phases of a deployed round, from the sites' log texts (see the module docstring)."""
    by_site: dict[str, list[tuple[float, float, float]]] = {}
    for log in logs:
        for site, ready, answer, age in PHASE.findall(log):
            by_site.setdefault(site, []).append((float(age), float(ready), float(answer)))
    rounds = min((len(v) for v in by_site.values()), default=0)
    if not rounds:
        print("  (no phase lines in the sites' logs)")
        return
    # The last line of each site is the final evaluation; the first `len(per_round)` are the rounds.
    n = min(rounds, len(per_round))
    ages = [v[i][0] for v in by_site.values() for i in range(n)]
    readies = [v[i][1] for v in by_site.values() for i in range(n)]
    answers = [v[i][2] for v in by_site.values() for i in range(n)]
    rest = [per_round[i] - max(sum(v[i]) for v in by_site.values()) for i in range(n)]
    print(
        f"  per site and round (median over {len(by_site)} sites x {n} rounds): ClientApp start-up until the "
        f"message reached scinfl {statistics.median(ages):.2f} s, data and trainer "
        f"{statistics.median(readies):.2f} s, answer {statistics.median(answers):.2f} s; rest of the round "
        f"(SuperNode poll, transfers, aggregation) {statistics.median(rest):.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--skip-deployment", action="store_true")
    parser.add_argument("--imports-only", action="store_true", help="measure the ClientApp import alone")
    args = parser.parse_args()
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    si.settings.progress = False
    torch.set_num_threads(1)
    client_import()
    if args.imports_only:
        return

    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)  # its log-normalised values; the sites inherit the registration
    sites = si.pp.split_sites(adata, n_sites=args.sites, label_key="bulk_labels", alpha=0.5, seed=0)
    # Every engine starts from the same weights (a hardened run's are drawn by the first site, with the key),
    # so the weights of the three arms compare bit for bit. scheme="infl", as in the earlier measurements.
    key = si.FederationKey(hashlib.sha256(b"flower overhead benchmark").digest(), scheme="infl")
    common = {"key": key, "label_key": "bulk_labels", "rounds": args.rounds, "seed": 0}
    print(
        f"{args.sites} sites x {args.rounds} rounds, pbmc68k_reduced, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )

    # The first optimiser a process builds imports torch._dynamo (about 1.3 s here): done before the timing,
    # as in a notebook after its first run; the simulation's workers and a deployment's ClientApps pay it.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    times = {}
    models = {}
    # The 1-round simulation separates Flower's fixed cost (Ray, workers importing scinfl) from its
    # cost per round.
    for arm, engine, rounds in (
        ("local", "local", args.rounds),
        ("flower", "flower", args.rounds),
        ("flower-1", "flower", 1),
    ):
        copies = {name: a.copy() for name, a in sites.items()}
        started = time.perf_counter()
        models[arm] = si.tl.train_federated(copies, engine=engine, **(common | {"rounds": rounds}))
        times[arm] = time.perf_counter() - started
    same = all(
        torch.equal(t, models["flower"].network.state_dict()[n])
        for n, t in models["local"].network.state_dict().items()
    )
    ratio = times["flower"] / times["local"]
    per_round = (times["flower"] - times["flower-1"]) / max(args.rounds - 1, 1)
    print(f"in-process            {times['local']:7.2f} s   ({times['local'] / args.rounds:.2f} s per round)")
    print(
        f"simulation            {times['flower']:7.2f} s   {ratio:.1f}x in-process "
        f"(goal <= {SIMULATION_GOAL}x: {'met' if ratio <= SIMULATION_GOAL else 'missed'}); "
        f"weights equal: {same}"
    )
    print(
        f"  of which fixed (1-round run minus one round) {times['flower-1'] - per_round:.2f} s, "
        f"per round {per_round:.2f} s"
    )

    if args.skip_deployment:
        return
    with tempfile.TemporaryDirectory(prefix="scinfl-flower-bench-") as tmp:
        tmp = Path(tmp)
        nodes = site_nodes(sites, tmp, key.save(tmp / "consortium.key"))
        # The in-process run's spec: the same task, sites, key version, rounds and seed.
        config = run_config(models["local"].spec, tmp / "run")
        with LocalDeployment(tmp / "flower", nodes) as deployment:
            started = time.perf_counter()
            completed = deployment.run(config, timeout=1800)
            total = time.perf_counter() - started
        if completed.returncode != 0:
            raise SystemExit(f"flwr run failed:\n{completed.stdout[-3000:]}")
        per_round = [float(s) for s in re.findall(r"Round \d+ of \d+: .*\(([\d.]+) s\)", completed.stdout)]
        deployed = si.FederatedModel.load(tmp / "run" / "model")
        site_logs = [
            log.read_text(errors="replace") for log in sorted((tmp / "flower").glob("supernode-*.log"))
        ]
        median = statistics.median(per_round)
    same = all(
        torch.equal(t, deployed.network.state_dict()[n])
        for n, t in models["local"].network.state_dict().items()
    )
    print(
        f"deployment (flwr run) {total:7.2f} s in all; per round median {median:.2f} s "
        f"(min {min(per_round):.2f}, max {max(per_round):.2f}; goal < {DEPLOYMENT_GOAL} s: "
        f"{'met' if median < DEPLOYMENT_GOAL else 'missed'}); "
        f"submit, ServerApp start, connect and final evaluation: {total - sum(per_round):.2f} s; "
        f"weights equal to in-process: {same}"
    )
    deployment_phases(site_logs, per_round)


if __name__ == "__main__":
    main()
