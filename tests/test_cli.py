"""`scinfl demo` from a shell, with small settings."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad


def test_demo_runs_from_the_shell(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scinfl",
            "demo",
            "--rounds",
            "2",
            "--seeds",
            "1",
            "--wrong-keys",
            "2",
            "--hidden",
            "32",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    for row in (
        "centralised",
        "each site alone",
        "plain FedAvg",
        "INFL (paper), right key",
        "hardened, right key",
        "wrong keys",
        "no key",
        "chance",
    ):
        assert row in out
    written = ad.read_h5ad(tmp_path / "scinfl_demo.h5ad")
    assert written.n_obs == 142  # the stratified 20% test set of 700 cells
    assert {"scinfl_prediction", "scinfl_fedavg_prediction"} <= set(written.obs)
    assert written.obsm["X_scinfl"].shape == (142, 16)
    assert (tmp_path / "scinfl_demo_history.png").stat().st_size > 1000


def test_cli_usage_error():
    result = subprocess.run([sys.executable, "-m", "scinfl"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "demo" in result.stderr
