"""Crash safety of the round loop (in-process sites): checkpoints after every round, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

import scinfl as si
from helpers import FAST, hardened_secrets
from scinfl.federation.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from scinfl.train import SiteTrainer, key_material

# Sampling a fraction of sites per round makes the sampling generator part of what a resume must restore.
RUN = {**FAST, "rounds": 5, "fraction": 0.67, "secure_aggregation": {"min_cohort": 2}, "seed": 11}
N_SITES = 3

# Trains RUN in a fresh interpreter and kills itself with SIGKILL, a crash that runs no cleanup, in the
# middle of round 4: after the second site fit of that round (two sites per round at fraction 0.67).
CRASHING_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    import scanpy as sc, torch
    import scinfl as si
    from scinfl.train import SiteTrainer

    torch.set_num_threads(1)
    si.settings.progress = False
    key_path, checkpoint_dir, run = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    run["task"] = si.tasks.Task.from_dict(run["task"])
    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)
    sites = si.pp.split_sites(adata, n_sites={n_sites}, label_key="bulk_labels", alpha=0.5, seed=0)
    fit, calls = SiteTrainer.fit, []

    def fit_then_crash(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGKILL)
        return fit(self, *args, **kwargs)

    SiteTrainer.fit = fit_then_crash
    si.tl.train_federated(
        sites, key=si.FederationKey.load(key_path), checkpoint_dir=checkpoint_dir, copy=True, **run
    )
    """
).format(n_sites=N_SITES)


@pytest.fixture(scope="module")
def resume_key():
    return si.FederationKey.generate()


@pytest.fixture(scope="module")
def uninterrupted(_pbmc, resume_key):
    adata = _pbmc.copy()
    si.pp.register_site(adata, use_raw=True)
    sites = si.pp.split_sites(adata, n_sites=N_SITES, label_key="bulk_labels", alpha=0.5, seed=0)
    return si.tl.train_federated(sites, key=resume_key, copy=True, **RUN)


def _assert_same_model(a: si.FederatedModel, b: si.FederatedModel) -> None:
    state_a, state_b = a.network.state_dict(), b.network.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert a.params["best_round"] == b.params["best_round"]
    pd.testing.assert_frame_equal(a.history, b.history)


def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_result(
    pbmc_sites, resume_key, uninterrupted, tmp_path
):
    key_path = resume_key.save(tmp_path / "consortium.key")
    checkpoint_dir = tmp_path / "checkpoints"
    crashed = subprocess.run(
        [
            sys.executable,
            "-c",
            CRASHING_RUN,
            str(key_path),
            str(checkpoint_dir),
            json.dumps({**RUN, "task": RUN["task"].to_dict()}),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    checkpoint = load_checkpoint(checkpoint_dir)
    assert checkpoint["round"] == 3  # the last complete round; round 4 died between two site fits
    # round 3's weights are evaluated with round 4's exchange: its rows wait for that, checkpointed too
    assert {row["round"] for row in checkpoint["rows"]} == {1, 2}
    assert {row["round"] for row in checkpoint["pending"].values()} == {3}
    assert not [p for p in checkpoint_dir.iterdir() if p.name != CHECKPOINT]  # no half-written file left

    resumed = si.tl.train_federated(
        pbmc_sites, key=resume_key, checkpoint_dir=checkpoint_dir, resume=True, **RUN
    )
    _assert_same_model(resumed, uninterrupted)
    assert load_checkpoint(checkpoint_dir)["round"] == RUN["rounds"]
    # the resumed call wrote its outputs as an uninterrupted one does
    expected = uninterrupted.predict(pbmc_sites["site_0"], key=resume_key).labels
    assert (pbmc_sites["site_0"].obs["scinfl_prediction"].to_numpy() == expected.to_numpy()).all()


def test_resuming_a_finished_run_or_extending_it(pbmc_sites, resume_key, uninterrupted, tmp_path):
    short = {**RUN, "rounds": 2}
    si.tl.train_federated(pbmc_sites, key=resume_key, checkpoint_dir=tmp_path, copy=True, **short)
    # resuming the finished 2-round run returns it without training...
    again = si.tl.train_federated(
        pbmc_sites, key=resume_key, checkpoint_dir=tmp_path, resume=True, copy=True, **short
    )
    assert again.history["round"].max() == 2
    # ...and asking for more rounds continues it to what a 5-round run gives
    extended = si.tl.train_federated(
        pbmc_sites, key=resume_key, checkpoint_dir=tmp_path, resume=True, copy=True, **RUN
    )
    _assert_same_model(extended, uninterrupted)
    with pytest.raises(ValueError, match="past rounds=2"):
        si.tl.train_federated(
            pbmc_sites, key=resume_key, checkpoint_dir=tmp_path, resume=True, copy=True, **short
        )


def test_resume_refuses_another_run_and_a_fresh_run_keeps_an_old_checkpoint(pbmc_sites, resume_key, tmp_path):
    short = {**RUN, "rounds": 1}
    si.tl.train_federated(pbmc_sites, key=resume_key, checkpoint_dir=tmp_path, copy=True, **short)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(FileExistsError, match="resume=True"):
        si.tl.train_federated(pbmc_sites, key=resume_key, checkpoint_dir=tmp_path, copy=True, **short)
    with pytest.raises(ValueError, match=r"spec\.fit\.lr"):
        si.tl.train_federated(
            pbmc_sites,
            key=resume_key,
            checkpoint_dir=tmp_path,
            resume=True,
            copy=True,
            **{**short, "fit": {"lr": 0.1}},
        )
    with pytest.raises(ValueError, match=r"spec\.key_fingerprint"):
        si.tl.train_federated(
            pbmc_sites,
            key=si.FederationKey.generate(),
            checkpoint_dir=tmp_path,
            resume=True,
            copy=True,
            **short,
        )
    fewer = {name: adata[:-5].copy() for name, adata in pbmc_sites.items()}
    with pytest.raises(ValueError, match=r"n_obs\.site_0"):
        si.tl.train_federated(fewer, key=resume_key, checkpoint_dir=tmp_path, resume=True, copy=True, **short)
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        si.tl.train_federated(
            pbmc_sites, key=resume_key, checkpoint_dir=tmp_path / "empty", resume=True, copy=True, **short
        )
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        si.tl.train_federated(pbmc_sites, key=resume_key, resume=True, copy=True, **short)


def test_checkpoints_hold_no_key_material(pbmc_sites, resume_key, tmp_path):
    model = si.tl.train_federated(
        pbmc_sites, key=resume_key, checkpoint_dir=tmp_path, copy=True, **{**RUN, "rounds": 2}
    )
    blob = (tmp_path / CHECKPOINT).read_bytes()
    secret = resume_key._secret
    for needle in [secret, secret.hex().encode(), *hardened_secrets(key_material(resume_key, model.network))]:
        assert needle not in blob
    assert resume_key.fingerprint.encode() in blob  # the version tag travels; the key does not


def test_a_checkpoint_is_private_checked_at_load_and_torn_writes_are_cleaned(
    pbmc_sites, resume_key, tmp_path
):
    """0600 (it holds weights), a SHA-256 checked at load (a damaged one is refused by name), and the
    temporary file of a writer killed mid-write does not accumulate."""
    torn = tmp_path / f".{CHECKPOINT}.99999.tmp"  # what a writer SIGKILLed during a write leaves
    torn.write_bytes(b"half a checkpoint")
    one_round = {**RUN, "rounds": 1}
    si.tl.train_federated(pbmc_sites, key=resume_key, checkpoint_dir=tmp_path, copy=True, **one_round)
    path = tmp_path / CHECKPOINT
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(f".{CHECKPOINT}.*.tmp"))
    assert load_checkpoint(tmp_path)["round"] == 1
    intact = path.read_bytes()
    for damaged, problem in (
        (intact[:-1] + bytes([intact[-1] ^ 1]), "truncated or altered"),  # one flipped bit
        (intact[: len(intact) // 2], "truncated or altered"),
        (b"not a checkpoint", "not a readable scinfl checkpoint"),
    ):
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=rf"{CHECKPOINT} is {problem}"):
            si.tl.train_federated(
                pbmc_sites, key=resume_key, checkpoint_dir=tmp_path, resume=True, copy=True, **one_round
            )


def test_dp_accountant_resumes_with_the_run(pbmc_sites, tmp_path, monkeypatch):
    pytest.importorskip("opacus")
    run = {**RUN, "rounds": 3, "dp": {"epsilon": 8.0}}
    full = si.tl.train_federated(pbmc_sites, key=None, copy=True, **run)

    fit, calls = SiteTrainer.fit, []

    def fit_then_fail(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 4:  # round 2, second site fit
            raise RuntimeError("site lost")
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(SiteTrainer, "fit", fit_then_fail)
    with pytest.raises(RuntimeError, match="site lost"):
        si.tl.train_federated(pbmc_sites, key=None, checkpoint_dir=tmp_path, copy=True, **run)
    monkeypatch.setattr(SiteTrainer, "fit", fit)
    assert load_checkpoint(tmp_path)["round"] == 1
    resumed = si.tl.train_federated(
        pbmc_sites, key=None, checkpoint_dir=tmp_path, resume=True, copy=True, **run
    )
    _assert_same_model(resumed, full)
    assert resumed.params["dp"]["spent_epsilon"] == full.params["dp"]["spent_epsilon"]
    assert resumed.params["dp"]["steps"] == full.params["dp"]["steps"]
    # the noise was calibrated to 3 rounds: a DP run cannot be extended
    with pytest.raises(ValueError, match=r"spec\.rounds"):
        si.tl.train_federated(
            pbmc_sites, key=None, checkpoint_dir=tmp_path, resume=True, copy=True, **{**run, "rounds": 4}
        )
