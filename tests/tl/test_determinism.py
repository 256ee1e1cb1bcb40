"""The same seed gives the same result across the whole pipeline, in separate interpreters."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import scinfl as si

# The whole pipeline of the quick start, in a fresh interpreter: split, register, train under a key, write
# back, predict on held-out cells. It prints one digest per output, so that a mismatch names the stage.
PIPELINE = textwrap.dedent(
    """
    import hashlib, sys
    import numpy as np, scanpy as sc
    import scinfl as si

    si.settings.progress = False
    key_path, seed = sys.argv[1], int(sys.argv[2])
    adata, query = si.pp.split_holdout(
        sc.datasets.pbmc68k_reduced(), label_key="bulk_labels", fraction=0.2, seed=seed
    )
    sites = si.pp.split_sites(adata, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=seed)
    for name, site in sites.items():
        si.pp.register_site(site, site=name, label_key="bulk_labels", use_raw=True)
    model = si.tl.train_federated(
        sites,
        key=si.FederationKey.load(key_path),
        task=si.tasks.Classification(hidden=64),
        rounds=3,
        fraction=0.67,
        secure_aggregation={"min_cohort": 2},
        seed=seed,
    )
    si.tl.predict(query, model, key=si.FederationKey.load(key_path))

    def digest(*arrays):
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    print("splits", digest(*(s.obs_names.to_numpy().astype(str) for s in sites.values())))
    print("weights", digest(*(t.numpy() for t in model.network.state_dict().values())))
    print("history", digest(model.history.to_numpy().astype(str)))
    print("write-back", digest(*(s.obsm["scinfl_probabilities"] for s in sites.values())))
    print("embedding", digest(*(s.obsm["X_scinfl"] for s in sites.values())))
    labels = query.obs["scinfl_prediction"].to_numpy().astype("U")  # not object arrays: those are pointers
    print("predict", digest(query.obsm["scinfl_probabilities"], labels))
    """
)


def _start(key_path, seed: int, hash_seed: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PIPELINE, str(key_path), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
    )


def _digests(process: subprocess.Popen) -> dict[str, str]:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return dict(line.split(" ", 1) for line in stdout.strip().splitlines())


def test_same_seed_same_outputs_in_fresh_interpreters(tmp_path):
    # The default scheme; tests/tl/test_train_federated.py checks the paper's scheme within one interpreter.
    key_path = si.FederationKey.generate().save(tmp_path / "consortium.key")
    # Different hash seeds: nothing may depend on set or dict-of-str iteration order. The three interpreters
    # run at once (each is independent; most of their time is importing).
    processes = [_start(key_path, 5, "1"), _start(key_path, 5, "2"), _start(key_path, 6, "1")]
    first, second, other = (_digests(process) for process in processes)
    assert first == second
    changed = [stage for stage in first if first[stage] != other[stage]]
    assert changed == ["splits", "weights", "history", "write-back", "embedding", "predict"]
