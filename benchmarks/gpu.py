"""Local-fit throughput on the accelerator against a bare PyTorch loop on the same device (issue 16).

One site's trainer is built as every engine builds it (:func:`scinfl.federation.site.build_site`, hardened
key, validation off) on a site generated like ``scale.py``'s (real ``pbmc68k_reduced`` profiles resampled,
genes tiled to ``--genes``, Poisson counts, ``log1p``, CSR; nothing committed). For each task (the
classifier and the embedding autoencoder), gene count, batch size and mode, it measures cells/s per
epoch of:

``scinfl``
    ``SiteTrainer.fit``: batches read from the site's AnnData (``memory``: CSR in memory; ``backed``:
    ``read_h5ad(backed="r")``), densified, moved to the device, trained; the hardened key's conversions
    included. One warm-up fit first (imports, CUDA context, allocator), then ``--epochs`` fits, timed.
``bare``
    The same network (the trainer's own, in its plain basis), objective and Adam, over the same cells
    pre-loaded as one dense tensor on the device, shuffled by ``torch.randperm`` there: the data-path-free
    ceiling. Run once per task, genes and batch (it has no mode).
``cpu``
    On a GPU machine, the scinfl arm again with ``scinfl.settings.accelerator = "cpu"`` (in-memory only).
``predict``
    ``infer`` over the site's cells as ``FederatedModel.predict`` calls it (batch 1,024; the head only where
    the task reads it, ``Task.uses_outputs``), cells/s. For the embedding, ``predict+head`` also runs the
    decoder and returns its output, as prediction did before December 2026 (n_cells x n_genes floats).
``data dense`` / ``data sparse``
    The data path alone, per gene count, batch size and mode: one shuffled epoch of batches read and moved
    to the device, no training. ``dense``: densified on the CPU as they are read (the CPU's way);
    ``sparse``: read as CSR parts and densified on the device (a GPU's way, ``SparseRows``). The cells/s
    the data path can feed the device with.

Peak GPU memory (``torch.cuda.max_memory_allocated``) is printed per run on a GPU. On a machine without
one, everything runs on the CPU and the script says so; the default sizes are then small.

Run::

    python benchmarks/gpu.py                     # CPU: 20,000 cells, 2,000 genes, batches 128 and 1,024
    python benchmarks/gpu.py --cells 200000 --genes 2000 20000 --batches 128 1024 4096   # on a GPU
    python benchmarks/gpu.py --precision bf16-mixed   # every arm under bf16 autocast

Targets (issue 16, GPU): >= 250,000 cells/s per epoch for the classifier at 2,000 genes, batch 1,024, in
memory, and >= 70% of the bare loop in the same run; backed >= 50% of in-memory.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import tempfile
import time
from pathlib import Path

import anndata as ad
import torch

import scinfl as si
from scale import generate  # benchmarks/scale.py: the same generated sites
from scinfl.data import batch_loader
from scinfl.federation import RunSpec
from scinfl.federation.site import build_site, initial_weights
from scinfl.tasks import ModelConfig
from scinfl.train import (
    FitSettings,
    full_precision,
    infer,
    resolve_device,
    site_fabric,
    sparse_batches_on,
    to_device,
)

TASKS = {
    "classifier": lambda: si.tasks.Classification(label_key="cell_type"),
    "embedding": lambda: si.tasks.Embedding(likelihood="gaussian"),
}
GOAL_CELLS_PER_S = 250_000
GOAL_OF_BARE = 0.70
GOAL_BACKED = 0.50


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trainer(adata, task, key, batch_size: int):
    site = "site"
    si.pp.register_site(adata, site=site, label_key="cell_type")
    spec = RunSpec(
        task=task,
        sites=(site,),
        key_fingerprint=key.fingerprint,
        scheme=key.scheme,
        rounds=1,
        fit=FitSettings(batch_size=batch_size),
        validation_fraction=0.0,
        secure_aggregation=False,
    )
    schema = task.agree({site: task.describe(adata, site)}, join="inner")
    config = ModelConfig(task=task, schema=schema, scheme=key.scheme)
    return build_site(spec, config, adata, site, key), initial_weights(config, 0, key)


def scinfl_rate(trainer, state, epochs: int) -> float:
    """Cells/s per epoch of ``SiteTrainer.fit`` (after one warm-up fit)."""
    trainer.fit(state, seed=0)
    _sync(trainer.device)
    started = time.perf_counter()
    for epoch in range(epochs):
        trainer.fit(state, seed=1 + epoch)
    _sync(trainer.device)
    return trainer.n_train * epochs / (time.perf_counter() - started)


def predict_rate(trainer, *, outputs: bool, epochs: int) -> float:
    """Cells/s of ``infer`` over the trainer's cells in batches of 1,024, as ``FederatedModel.predict``."""
    dataset = trainer.train.with_sparse_batches(sparse_batches_on(trainer.device))

    def run() -> None:
        loader = batch_loader(dataset, batch_size=1024, shuffle=False)
        infer(trainer.network, loader, key_material=trainer._training_key, outputs=outputs)

    run()
    started = time.perf_counter()
    for _ in range(epochs):
        run()
    return len(dataset) * epochs / (time.perf_counter() - started)


def data_rate(trainer, batch_size: int, *, sparse: bool, epochs: int) -> float:
    """Cells/s of the data path alone: shuffled batches of the trainer's cells read and on its device."""
    dataset = trainer.train.with_sparse_batches(sparse)
    device = trainer.device

    def epoch(seed: int) -> None:
        for x, y in batch_loader(dataset, batch_size=batch_size, shuffle=True, seed=seed):
            to_device((x, y), device)

    epoch(0)
    _sync(device)
    started = time.perf_counter()
    for seed in range(1, epochs + 1):
        epoch(seed)
    _sync(device)
    return len(dataset) * epochs / (time.perf_counter() - started)


def bare_rate(trainer, epochs: int, batch_size: int) -> float:
    """Cells/s per epoch of a plain loop over the trainer's cells, pre-loaded on its device."""
    device = trainer.device
    x, y = trainer.train[torch.arange(trainer.n_train).numpy()]
    x, y = to_device((x, y), device)
    network, objective = trainer.network, trainer.objective
    network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3, fused=True)

    def epoch() -> None:
        for batch in torch.randperm(len(x), device=device).split(batch_size):
            if len(batch) < 2:
                continue
            optimizer.zero_grad(set_to_none=True)
            xb, yb = x[batch], y[batch]
            with site_fabric(device).autocast():  # scinfl.settings.precision, as the scinfl arm
                output = network(xb)
            objective.loss(full_precision(output), xb, yb).backward()
            optimizer.step()

    epoch()
    _sync(device)
    started = time.perf_counter()
    for _ in range(epochs):
        epoch()
    _sync(device)
    return len(x) * epochs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    device = resolve_device("auto")
    on_gpu = device.type == "cuda"
    parser.add_argument("--cells", type=int, default=200_000 if on_gpu else 20_000)
    parser.add_argument("--genes", type=int, nargs="+", default=[2000, 20000] if on_gpu else [2000])
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[128, 1024, 4096] if on_gpu else [128, 1024]
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--modes", nargs="+", default=["memory", "backed"], choices=["memory", "backed"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument(
        "--precision", default="32", choices=["32", "bf16-mixed"], help="scinfl.settings.precision, every arm"
    )
    args = parser.parse_args()
    si.settings.precision = args.precision
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    si.settings.progress = False
    si.settings.torch_threads = args.threads
    torch.set_num_threads(args.threads)
    key = si.FederationKey(hashlib.sha256(b"gpu benchmark").digest(), scheme="hardened")
    where = torch.cuda.get_device_name(device) if on_gpu else "CPU only (no GPU here): CPU figures"
    print(
        f"device: {device} ({where}); torch {torch.__version__}, {args.threads} CPU thread(s), "
        f"precision {args.precision}"
    )

    rows = []
    feeds: dict[tuple[int, int, str, bool], float] = {}
    with tempfile.TemporaryDirectory(prefix="scinfl-gpu-") as tmp:
        for n_genes in args.genes:
            manifest = generate(Path(tmp), args.cells, 1, n_genes, seed=0)
            path = manifest["sites"][0]["path"]
            print(f"{args.cells} cells x {n_genes} genes, density {manifest['density']:.2f}")
            for name in args.tasks:
                for batch_size in args.batches:
                    rates: dict[str, float] = {}
                    peaks: dict[str, float] = {}
                    for mode in args.modes:
                        adata = ad.read_h5ad(path, backed="r" if mode == "backed" else None)
                        if on_gpu:
                            torch.cuda.reset_peak_memory_stats(device)
                        trainer, state = _trainer(adata, TASKS[name](), key, batch_size)
                        rates[mode] = scinfl_rate(trainer, state, args.epochs)
                        if on_gpu:
                            peaks[mode] = torch.cuda.max_memory_allocated(device) / 2**30
                        if mode == args.modes[0]:
                            rates["bare"] = bare_rate(trainer, args.epochs, batch_size)
                        if mode == args.modes[0]:
                            task = TASKS[name]()
                            rates["predict"] = predict_rate(
                                trainer, outputs=task.uses_outputs, epochs=args.epochs
                            )
                            if not task.uses_outputs:
                                rates["predict+head"] = predict_rate(
                                    trainer, outputs=True, epochs=args.epochs
                                )
                        if name == args.tasks[0]:
                            for sparse in (False, True):
                                rate = data_rate(trainer, batch_size, sparse=sparse, epochs=args.epochs)
                                feeds[(n_genes, batch_size, mode, sparse)] = rate
                    if on_gpu and "memory" in args.modes:
                        si.settings.accelerator = "cpu"
                        trainer, state = _trainer(ad.read_h5ad(path), TASKS[name](), key, batch_size)
                        rates["cpu"] = scinfl_rate(trainer, state, 1)
                        si.settings.accelerator = "auto"
                    rows.append((name, n_genes, batch_size, rates, peaks))
                    line = ", ".join(f"{arm} {rate:,.0f}" for arm, rate in rates.items())
                    memory = ", ".join(f"{mode} {gib:.2f} GiB" for mode, gib in peaks.items())
                    print(
                        f"  {name:<10} batch {batch_size:>5}: cells/s per epoch {line}"
                        + (f"; peak GPU memory {memory}" if memory else "")
                    )

    print()
    print(
        f"{'task':<10} {'genes':>6} {'batch':>6} {'memory':>10} {'backed':>10} {'bare':>10} "
        f"{'memory/bare':>11} {'backed/memory':>13}"
    )
    for name, n_genes, batch_size, rates, _ in rows:
        memory, backed, bare = rates.get("memory"), rates.get("backed"), rates["bare"]
        print(
            f"{name:<10} {n_genes:>6} {batch_size:>6} {memory or 0:>10,.0f} {backed or 0:>10,.0f} {bare:>10,.0f} "
            f"{(memory or 0) / bare:>11.2f} {((backed or 0) / memory) if memory else 0:>13.2f}"
        )
    print()
    print(f"data path alone (cells/s): {'genes':>6} {'batch':>6} {'mode':>7} {'dense':>10} {'sparse':>10}")
    if not on_gpu:
        print("  (no GPU: 'sparse' densifies with torch on the CPU; a site on the CPU trains on 'dense')")
    for (n_genes, batch_size, mode, sparse), rate in feeds.items():
        if not sparse:
            sparse_rate = feeds[(n_genes, batch_size, mode, True)]
            print(f"{'':<26} {n_genes:>6} {batch_size:>6} {mode:>7} {rate:>10,.0f} {sparse_rate:>10,.0f}")
    target = [r for r in rows if r[0] == "classifier" and r[1] == 2000 and r[2] == 1024 and "memory" in r[3]]
    if target:
        rates = target[0][3]
        verdicts = [
            f">= {GOAL_CELLS_PER_S:,} cells/s: {'met' if rates['memory'] >= GOAL_CELLS_PER_S else 'missed'}",
            f">= {GOAL_OF_BARE:.0%} of bare: {'met' if rates['memory'] >= GOAL_OF_BARE * rates['bare'] else 'missed'}",
        ]
        if "backed" in rates:
            verdicts.append(
                f"backed >= {GOAL_BACKED:.0%} of memory: "
                f"{'met' if rates['backed'] >= GOAL_BACKED * rates['memory'] else 'missed'}"
            )
        print(
            f"classifier, 2,000 genes, batch 1,024 ({'GPU' if on_gpu else 'CPU; the goals are for a GPU'}): "
            + "; ".join(verdicts)
        )


if __name__ == "__main__":
    main()
