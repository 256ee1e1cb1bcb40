"""The full privacy audit on pbmc68k_reduced, for every configuration, written to docs/privacy.md.

Configurations: plain FedAvg (no key), the paper's scheme (``scheme="infl"``) at key strengths 1, 5 and 20,
scinfl's hardened scheme (``scheme="hardened"``), and DP-SGD (plain network) at epsilon 1, 3 and 8. Each is trained on the same 3 label-skewed sites (a
stratified 20% of the cells held out as the never-trained "public" cohort), then audited on the largest
site's cells with ``scinfl.tl.privacy_audit``: utility under wrong / near-miss / no keys, key recovery,
analytic first-layer inversion and calibration, gradient and update inversion.
Each figure is a mean over victims (or keys) and seeds with a 95% percentile-bootstrap interval.

    python benchmarks/privacy_audit.py                  # full audit, writes docs/privacy.md
    python benchmarks/privacy_audit.py --quick          # a few minutes, prints only
    python benchmarks/privacy_audit.py --configs "plain FedAvg" hardened --precision bf16-mixed  # prints only
    python benchmarks/privacy_audit.py --configs "embedding, plain FedAvg" "embedding, INFL s=1" \
        "embedding, hardened"                           # the embedding task, its own section
    python benchmarks/privacy_audit.py --configs "perturbation, plain FedAvg" "perturbation, INFL s=1" \
        "perturbation, hardened"                        # the perturbation task (needs ../shared/data)

Membership inference has its own section, measured like with like over keys, splits and sites:

    python benchmarks/privacy_audit.py --membership     # every classification configuration, ~10 min
    python benchmarks/privacy_audit.py --membership --quick

For each configuration and each of ``--repeats`` draws (a new split into sites and a new key), every site
keeps 25% of its cells (stratified) out of training; each site is then audited with those cells and its
validation cells as non-members (``privacy_audit(..., site=, nonmembers=)``), matched by label to its
trained-on cells. Figures are the mean over draws and sites, with the spread (min-max); the model-free
rows must sit at 0.5. Beside them, the earlier design's label-frequency score (public cells as
non-members, unmatched) shows what that design measured before any model was looked at.

The perturbation configurations use the Datlinger et al. 2021 screen of ``../shared/data`` as
benchmarks/perturbation.py prepares it (500 most expressed genes, log-normalised), 20% of every guide
(controls included: each role needs control profiles) held out as the public cohort, 2 sites.

Configurations run in parallel processes (one torch thread each).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import pandas as pd

CONFIGS: dict[str, dict] = {
    "plain FedAvg": {"key": False},
    "INFL s=1": {"key": True, "key_strength": 1.0},
    "INFL s=5": {"key": True, "key_strength": 5.0},
    "INFL s=20": {"key": True, "key_strength": 20.0},
    "hardened": {"key": True, "scheme": "hardened"},
    # DP-SGD with the settings that gave it its best utility in tests/test_dp.py (a smaller network, a
    # larger step size): the baseline deserves its best fair shot.
    **{
        f"DP-SGD eps={eps}": {
            "key": False,
            "hidden": 64,
            "fit": {"lr": 1e-2},
            "dp": {"epsilon": float(eps), "delta": 1e-5, "max_grad_norm": 1.0},
        }
        for eps in (1, 3, 8)
    },
    # The embedding task (a keyed autoencoder, 60 rounds as in benchmarks/embedding.py): audited with the
    # attacks that apply to a model without classes, into their own section of docs/privacy.md.
    **{
        f"embedding, {name}": {"task": "embedding", "hidden": 128, "n_latent": 16, "rounds": 60, **keying}
        for name, keying in (
            ("plain FedAvg", {"key": False}),
            ("INFL s=1", {"key": True}),
            ("hardened", {"key": True, "scheme": "hardened"}),
        )
    },
    # The perturbation task (80 rounds as in benchmarks/perturbation.py), its own section too.
    **{
        f"perturbation, {name}": {"task": "perturbation", "hidden": 128, "rounds": 80, **keying}
        for name, keying in (
            ("plain FedAvg", {"key": False}),
            ("INFL s=1", {"key": True}),
            ("hardened", {"key": True, "scheme": "hardened"}),
        )
    },
}

# (family, attack, view, metric) rows shown in the report, in order; views absent for a config print "-".
REPORT_METRICS = {
    "utility": ("accuracy", "balanced_accuracy", "pearson_delta"),  # kNN transfer / perturbation effects
    "key recovery": ("accuracy",),
    "prior": ("pearson_minus_mean", "reidentified"),
    "analytic": ("pearson_minus_mean", "reidentified", "accuracy"),  # accuracy: a cell's perturbation
    "inversion": ("pearson_minus_mean", "reidentified", "label_recovered"),
}


def audit_one(name: str, settings: dict, args: argparse.Namespace) -> tuple[str, pd.DataFrame, float, dict]:
    import scanpy as sc
    import torch

    import scinfl as si

    torch.set_num_threads(1)
    si.settings.progress = False
    si.settings.precision = args.precision
    start = time.perf_counter()
    key = si.FederationKey.generate(scheme=settings.get("scheme", "infl")) if settings["key"] else None
    options = {k: v for k, v in settings.items() if k not in ("key", "scheme", "task", "hidden", "n_latent")}
    rounds = options.pop("rounds", args.rounds)
    task = settings.get("task", "classification")
    network = {k: settings[k] for k in ("hidden", "n_latent") if k in settings}  # the task's options
    if task == "perturbation":
        from perturbation import load

        adata = load(500)
        train, public = si.pp.split_holdout(adata, label_key="perturbation", fraction=0.2, seed=0)
        sites = si.pp.split_sites(train, n_sites=2, label_key="perturbation", alpha=100.0, seed=0)
        options = {**options, "secure_aggregation": {"min_cohort": 2}}
        task = si.tasks.Perturbation(
            perturbation_key="perturbation", covariate_keys=("condition",), **network
        )
    else:
        adata = sc.datasets.pbmc68k_reduced()
        si.pp.register_site(adata, use_raw=True)  # log-normalised values in .raw; the splits inherit it
        train, public = si.pp.split_holdout(adata, label_key="bulk_labels", fraction=0.2, seed=0)
        sites = si.pp.split_sites(train, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=0)
        task = si.tasks.get_task(task).replace(label_key="bulk_labels", **network)
    model = si.tl.train_federated(sites, key=key, task=task, rounds=rounds, seed=0, **options)
    audited = max(sites, key=lambda s: sites[s].n_obs)
    # Membership inference has its own section (--membership): like with like, over draws and sites.
    attacks = (
        ("utility", "key_recovery", "analytic", "inversion") if model.task.name == "classification" else None
    )
    table = si.tl.privacy_audit(
        model,
        sites[audited],
        key=key,
        public=public,
        site=audited,
        attacks=attacks,
        settings={
            "n_victims": args.victims,
            "seeds": tuple(range(args.seeds)),
            "utility": {"n_wrong_keys": args.wrong_keys},
            "inversion": {
                "victims": args.inversion_victims,
                "batches": tuple(args.inversion_batches),
                "steps": args.inversion_steps,
            },
        },
    )
    info = {"audited site": f"{audited} ({sites[audited].n_obs} cells)", "dp": model.params.get("dp")}
    return name, table, time.perf_counter() - start, info


MEMBERSHIP_CONFIGS = (
    "plain FedAvg",
    "INFL s=1",
    "INFL s=5",
    "INFL s=20",
    "hardened",
    "DP-SGD eps=1",
    "DP-SGD eps=3",
    "DP-SGD eps=8",
)
SITE_HOLDOUT = 0.25  # of each site's cells, out of training: the site's own non-members


def membership_one(name: str, settings: dict, repeat: int, args: argparse.Namespace) -> pd.DataFrame:
    """One draw (split and key) of one configuration: every site's membership audit, like with like."""
    import numpy as np
    import scanpy as sc
    import torch

    import scinfl as si
    from scinfl.data import label_codes
    from scinfl.privacy.metrics import membership_metrics

    torch.set_num_threads(1)
    si.settings.progress = False
    si.settings.precision = args.precision
    key = si.FederationKey.generate(scheme=settings.get("scheme", "infl")) if settings["key"] else None
    options = {k: v for k, v in settings.items() if k not in ("key", "scheme", "hidden")}
    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)
    train, public = si.pp.split_holdout(adata, label_key="bulk_labels", fraction=0.2, seed=repeat)
    sites = si.pp.split_sites(train, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=repeat)
    kept, held = {}, {}
    for site, cells in sites.items():
        kept[site], held[site] = si.pp.split_holdout(
            cells, label_key="bulk_labels", fraction=SITE_HOLDOUT, seed=repeat
        )
    task = si.tasks.Classification(label_key="bulk_labels", hidden=settings.get("hidden", 256))
    model = si.tl.train_federated(kept, key=key, task=task, rounds=args.rounds, seed=repeat, **options)
    rows = []
    for site in kept:
        table = si.tl.privacy_audit(
            model,
            kept[site],
            key=key,
            public=public,
            site=site,
            nonmembers=held[site],
            attacks=("membership",),
            settings={"seeds": tuple(range(args.seeds))},
        )
        rows.append(table.assign(config=name, repeat=repeat, site=site))
        # The earlier design: public cells as non-members, unmatched, scored by the site's label mix.
        members = label_codes(kept[site], model.schema, site)
        outside = label_codes(public, model.schema, "public")
        frequency = np.bincount(members, minlength=model.schema.n_classes) / len(members)
        rng = np.random.default_rng(repeat)
        n = min(len(members), len(outside), 250)
        auc = membership_metrics(
            frequency[rng.choice(members, n, replace=False)], frequency[rng.choice(outside, n, replace=False)]
        )["auc"]
        rows.append(
            pd.DataFrame(
                [["membership", "label frequency, earlier design", "no model", "auc", auc, auc, auc, 1]],
                columns=table.columns,
            ).assign(config=name, repeat=repeat, site=site)
        )
    return pd.concat(rows, ignore_index=True)


def membership_report(table: pd.DataFrame, configs: list[str]) -> str:
    """Mean [min, max] over draws and sites of each membership row, one column per configuration."""
    lines = []
    for metric in ("auc", "tpr_at_1pct_fpr"):
        part = table[table["metric"] == metric]
        summary = part.groupby(["attack", "view", "config"], sort=False)["mean"].agg(
            ["mean", "min", "max", "count"]
        )
        cells = summary.apply(lambda r: f"{r['mean']:.3f} [{r['min']:.2f}, {r['max']:.2f}]", axis=1)
        wide = cells.unstack("config").reindex(columns=configs)
        lines += [
            f"### {metric}",
            "",
            "| attack | attacker view | " + " | ".join(configs) + " |",
            "|" + "---|" * (2 + len(configs)),
        ]
        for (attack, view), row in wide.iterrows():
            lines.append(f"| {attack} | {view} | " + " | ".join("-" if pd.isna(v) else v for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def run_membership(args: argparse.Namespace) -> int:
    configs = (
        [c for c in args.configs if c in MEMBERSHIP_CONFIGS]
        if args.configs != list(CONFIGS)
        else list(MEMBERSHIP_CONFIGS)
    )
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [
            pool.submit(membership_one, name, CONFIGS[name], repeat, args)
            for name in configs
            for repeat in range(args.repeats)
        ]
        table = pd.concat([future.result() for future in futures], ignore_index=True)
    elapsed = time.perf_counter() - start
    command = "python benchmarks/privacy_audit.py " + shlex.join(sys.argv[1:])
    n_members = "members and non-members matched by label, at most 250 a side"
    header = (
        f"Measured {date.today().isoformat()} with `{command}` in {elapsed / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), {args.workers} worker processes. "
        f"{args.repeats} draws (split into 3 sites at Dirichlet 0.5, key) x 3 sites per configuration; "
        f"{int(SITE_HOLDOUT * 100)}% of each site held out of training; {args.rounds} federated rounds; "
        f"{args.seeds} audit seeds per site ({n_members}; 4 reference models of 30 epochs per seed). "
        "Cells: mean [min, max] over draws and sites."
    )
    body = membership_report(table, configs)
    print(header)
    print(body)
    if not args.quick and args.output is not None:
        _replace_section(Path(args.output), f"{header}\n\n{body}", *MEMBERSHIP_MARKERS)
        print(f"wrote {args.output}")
    return 0


def _cell(row: pd.Series) -> str:
    if pd.isna(row["mean"]):
        return "-"
    if row["ci_low"] == row["ci_high"]:
        return f"{row['mean']:.3f}"
    return f"{row['mean']:.3f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"


def report(tables: dict[str, pd.DataFrame]) -> str:
    frames = []
    for name, table in tables.items():
        frames.append(table.assign(config=name, cell=table.apply(_cell, axis=1)))
    combined = pd.concat(frames)
    lines = []
    for family, metrics in REPORT_METRICS.items():
        part = combined[(combined["family"] == family) & combined["metric"].isin(metrics)]
        if part.empty:
            continue
        wide = part.pivot_table(
            index=["attack", "view", "metric"], columns="config", values="cell", aggfunc="first", sort=False
        ).reindex(columns=[c for c in tables if c in set(part["config"])])
        lines += [
            f"### {family}",
            "",
            "| attack | attacker view | metric | " + " | ".join(wide.columns) + " |",
        ]
        lines.append("|" + "---|" * (3 + len(wide.columns)))
        for (attack, view, metric), row in wide.iterrows():
            cells = " | ".join("-" if pd.isna(v) else str(v) for v in row)
            lines.append(f"| {attack} | {view} | {metric} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes; print only")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help="subset of configurations")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--victims", type=int, default=32, help="victims per seed (analytic attacks)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--wrong-keys", type=int, default=20, help="wrong keys and one-bit flips per seed")
    parser.add_argument("--inversion-victims", type=int, default=8, help="victims per seed (inversion)")
    parser.add_argument("--inversion-steps", type=int, default=300)
    parser.add_argument("--inversion-batches", type=int, nargs="+", default=[8, 32], help="batch sizes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--membership", action="store_true", help="membership inference over draws and sites")
    parser.add_argument("--repeats", type=int, default=3, help="draws (split and key) with --membership")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "privacy.md"))
    parser.add_argument(
        "--precision",
        default="32",
        choices=["32", "bf16-mixed"],
        help="scinfl.settings.precision of training and prediction; other than 32, prints only",
    )
    args = parser.parse_args()
    if args.precision != "32":  # docs/privacy.md holds the float32 audit
        args.output = None
    if args.quick:
        args.victims, args.seeds, args.wrong_keys, args.inversion_victims, args.inversion_steps = (
            4,
            1,
            3,
            2,
            100,
        )
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}")
    if args.membership:
        if args.quick:
            args.repeats, args.seeds, args.rounds = 1, 1, 5
        return run_membership(args)
    tasks = {CONFIGS[name].get("task", "classification") for name in args.configs}
    if len(tasks) > 1:
        parser.error("run classification, embedding and perturbation configurations separately (own tables)")
    markers = MARKERS[tasks.pop()]
    start = time.perf_counter()
    tables, infos = {}, {}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(audit_one, name, CONFIGS[name], args) for name in args.configs]
        for future in futures:
            name, table, seconds, info = future.result()
            tables[name], infos[name] = table, info
            print(f"{name}: audited in {seconds:.0f} s", flush=True)
    tables = {name: tables[name] for name in args.configs}
    body = report(tables)
    elapsed = time.perf_counter() - start
    command = "python benchmarks/privacy_audit.py" + (
        "" if len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:])
    )
    header = (
        f"Measured {date.today().isoformat()} with `{command}` in {elapsed / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), {args.workers} worker processes. "
        f"{args.seeds} seeds; {args.victims} victims per seed for the analytic attacks, "
        f"{args.inversion_victims} per seed and view for single-cell inversion ({args.inversion_steps} "
        f"Adam steps, 2 restarts), one batch of each of {args.inversion_batches} cells per seed and view for "
        f"batch inversion; {args.wrong_keys} wrong keys and one-bit flips per seed; "
        + ", ".join(
            sorted({f"{CONFIGS[name].get('rounds', args.rounds)} federated rounds" for name in args.configs})
        )
        + ". Audited site: "
        + "; ".join(f"{k}: {v['audited site']}" for k, v in infos.items())
        + ". Cells: mean [95% bootstrap CI]."
    )
    print(header)
    print(body)
    if not args.quick and args.output is not None:
        dp = "; ".join(f"{k}: {v['dp']}" for k, v in infos.items() if v.get("dp"))
        section = f"{header}\n\nDP-SGD accounting: {dp or 'no DP configuration run'}.\n\n{body}"
        _replace_section(Path(args.output), section, *markers)
        print(f"wrote {args.output}")
    return 0


MEMBERSHIP_MARKERS = ("<!-- privacy-membership:start -->", "<!-- privacy-membership:end -->")
MARKERS = {
    "classification": ("<!-- privacy-audit:start -->", "<!-- privacy-audit:end -->"),
    "embedding": ("<!-- privacy-audit-embedding:start -->", "<!-- privacy-audit-embedding:end -->"),
    "perturbation": ("<!-- privacy-audit-perturbation:start -->", "<!-- privacy-audit-perturbation:end -->"),
}


def _replace_section(path: Path, section: str, start: str, end: str) -> None:
    """Rewrite only the generated part of the page; the prose around it is written by hand."""
    text = path.read_text() if path.exists() else f"# Privacy audit\n\n{start}\n{end}\n"
    if start not in text or end not in text:
        raise SystemExit(f"{path} lacks the markers {start} ... {end}")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    path.write_text(f"{before}{start}\n{section}\n{end}{after}")


if __name__ == "__main__":
    sys.exit(main())
