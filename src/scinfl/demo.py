"""``scinfl demo``: the whole story on real PBMCs in a couple of minutes.

pbmc68k_reduced (scanpy's bundled real scRNA-seq: 700 PBMCs, log-normalised ``.raw``, 10 ``bulk_labels``)
is split into a stratified 20% held-out test set and 3 label-skewed sites. Every model is scored on the
same test set: centralised training, each site alone, plain FedAvg, and the two key schemes (the paper's
``"infl"`` and scinfl's ``"hardened"``), each with the right key, with wrong keys from the same generator and
with no key at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from . import pl, pp, tasks, tl
from ._settings import logger, settings
from .key import FederationKey
from .model import FederatedModel

__all__ = ["DemoResult", "run_demo"]

LABEL_KEY = "bulk_labels"


@dataclass
class DemoResult:
    table: pd.DataFrame
    test: AnnData
    model: FederatedModel
    seconds: float


def _scores(model: FederatedModel, test: AnnData, key: FederationKey | None) -> tuple[float, float]:
    predicted = model.predict(test, key=key, check_key=False, site="test").labels.astype(str)
    truth = test.obs[LABEL_KEY].astype(str).to_numpy()
    return accuracy_score(truth, predicted), balanced_accuracy_score(truth, predicted)


def _summarise(name: str, values: list[tuple[float, float]], note: str = "") -> dict:
    acc, bal = np.array(values).T
    return {
        "model": name,
        "accuracy": acc.mean(),
        "accuracy_sd": acc.std(ddof=1) if len(acc) > 1 else 0.0,
        "balanced_accuracy": bal.mean(),
        "balanced_accuracy_sd": bal.std(ddof=1) if len(bal) > 1 else 0.0,
        "n": len(values),
        "note": note,
    }


def run_demo(
    *,
    rounds: int = 20,
    seeds: int = 3,
    n_wrong_keys: int = 10,
    hidden: int = 256,
    output_dir: str | Path | None = ".",
    verbose: bool = True,
) -> DemoResult:
    """Run the demo and return its table; write ``scinfl_demo.h5ad`` and a history PNG to ``output_dir``.

    Each model is trained with ``seeds`` seeds (splits stay fixed); the table holds the mean and standard
    deviation over seeds (and, for wrong keys, over seeds x keys).
    """
    start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    logger.setLevel(logging.WARNING)  # the demo prints one table instead of a line per training run
    progress, settings.progress = settings.progress, False
    try:
        return _run_demo(rounds, seeds, n_wrong_keys, hidden, output_dir, say, start)
    finally:
        logger.setLevel(logging.INFO)
        settings.progress = progress


def _run_demo(rounds, seeds, n_wrong_keys, hidden, output_dir, say, start) -> DemoResult:
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    pp.register_site(adata, use_raw=True)  # its log-normalised values are in .raw; the sites inherit this
    train, test = pp.split_holdout(adata, label_key=LABEL_KEY, fraction=0.2, seed=0)
    sites = pp.split_sites(train, n_sites=3, label_key=LABEL_KEY, alpha=0.5, seed=0)
    say(
        f"pbmc68k_reduced: {train.n_obs} training cells in 3 label-skewed sites "
        f"({', '.join(f'{k}: {v.n_obs}' for k, v in sites.items())}), {test.n_obs} held-out test cells."
    )
    common = {
        "task": tasks.Classification(label_key=LABEL_KEY, hidden=hidden),
        "rounds": rounds,
        "copy": True,
    }
    schemes = ("infl", "hardened")
    rows: dict[str, list[tuple[float, float]]] = {
        k: []
        for k in (
            "centralised",
            "site alone",
            "fedavg",
            *(f"{s} {v}" for s in schemes for v in ("right", "wrong", "none")),
        )
    }
    keys = {scheme: FederationKey.generate(scheme=scheme) for scheme in schemes}
    model = None
    for seed in range(seeds):
        say(f"seed {seed}: centralised, each site alone, plain FedAvg, INFL, hardened ...")
        # One site: no federation, nothing for secure aggregation to hide in.
        central = tl.train_federated({"all": train}, key=None, seed=seed, secure_aggregation=False, **common)
        rows["centralised"].append(_scores(central, test, None))
        alone = [
            _scores(
                tl.train_federated({n: s}, key=None, seed=seed, secure_aggregation=False, **common),
                test,
                None,
            )
            for n, s in sites.items()
        ]
        rows["site alone"].append(tuple(np.mean(alone, axis=0)))
        fedavg = tl.train_federated(sites, key=None, seed=seed, **common)
        rows["fedavg"].append(_scores(fedavg, test, None))
        for scheme, key in keys.items():
            keyed = tl.train_federated(sites, key=key, seed=seed, **common)
            rows[f"{scheme} right"].append(_scores(keyed, test, key))
            rows[f"{scheme} wrong"].extend(
                _scores(keyed, test, FederationKey.generate(scheme=scheme)) for _ in range(n_wrong_keys)
            )
            rows[f"{scheme} none"].append(_scores(keyed, test, None))
            if seed == 0 and scheme == "hardened":
                model, fedavg_model = keyed, fedavg

    majority = test.obs[LABEL_KEY].value_counts(normalize=True).max()
    n_classes = test.obs[LABEL_KEY].nunique()
    table = pd.DataFrame(
        [
            _summarise("centralised (all training cells, no key)", rows["centralised"]),
            _summarise("each site alone (mean of 3)", rows["site alone"]),
            _summarise("plain FedAvg (same network, no key)", rows["fedavg"]),
            *(
                row
                for scheme, label in (("infl", "INFL (paper)"), ("hardened", "hardened"))
                for row in (
                    _summarise(f"{label}, right key", rows[f"{scheme} right"]),
                    _summarise(
                        f"{label} model, wrong keys ({n_wrong_keys} per seed)",
                        rows[f"{scheme} wrong"],
                        "keys drawn from the same generator",
                    ),
                    _summarise(
                        f"{label} model, no key", rows[f"{scheme} none"], "shared weights as they are"
                    ),
                )
            ),
            {
                "model": "chance",
                "accuracy": majority,
                "balanced_accuracy": 1.0 / n_classes,
                "n": 0,
                "note": "majority class / 1 over classes",
            },
        ]
    )
    tl.predict(test, model, key=keys["hardened"])
    tl.predict(test, fedavg_model, key=None, key_added="scinfl_fedavg")
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        test.write_h5ad(out / "scinfl_demo.h5ad")
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        axes = pl.history(model, metrics=("train_loss", "val_loss", "val_accuracy"), show=False)
        axes[0].figure.savefig(out / "scinfl_demo_history.png", dpi=120, bbox_inches="tight")
        plt.close(axes[0].figure)
    seconds = time.perf_counter() - start
    say(format_table(table))
    if output_dir is not None:
        say(
            f"Wrote {Path(output_dir) / 'scinfl_demo.h5ad'} and {Path(output_dir) / 'scinfl_demo_history.png'}."
        )
    say(f"Finished in {seconds:.0f} s.")
    return DemoResult(table=table, test=test, model=model, seconds=seconds)


def format_table(table: pd.DataFrame) -> str:
    lines = [f"{'model':<48} {'accuracy':>15} {'balanced acc.':>15}  note", "-" * 100]
    for row in table.itertuples():
        acc = f"{row.accuracy:.3f}" + (f" ± {row.accuracy_sd:.3f}" if row.n > 1 else "        ")
        bal = f"{row.balanced_accuracy:.3f}" + (
            f" ± {row.balanced_accuracy_sd:.3f}" if row.n > 1 else "        "
        )
        lines.append(f"{row.model:<48} {acc:>15} {bal:>15}  {row.note if isinstance(row.note, str) else ''}")
    lines.append("(mean ± sd over seeds; wrong keys: over seeds x keys; test set: stratified 20% held out)")
    return "\n".join(lines)
