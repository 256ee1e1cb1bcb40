"""Lightning as the product uses it: the training plan is a LightningModule that a user's own ``Trainer``
runs under the key, sites' metrics reach a Lightning logger, and a site that does not train never imports
Lightning."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger

import scinfl as si
from helpers import FAST, assert_no_secret, key_secrets, serialised


@pytest.fixture(scope="module")
def hardened_run(pbmc_split):
    sites, held_out = pbmc_split
    key = si.FederationKey(hashlib.sha256(b"lightning plan").digest())
    model = si.tl.train_federated({k: v.copy() for k, v in sites.items()}, key=key, **FAST)
    return model, key, held_out


def _trainer() -> Trainer:
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def test_a_users_trainer_predicts_with_the_model_under_its_key_and_the_plan_holds_no_key(hardened_run):
    model, key, held_out = hardened_run
    plan = model.lightning_module()
    assert isinstance(plan, LightningModule)
    assert plan.network is model.network  # the model's network itself, not a copy
    expected = model.predict(held_out, key=key).embedding
    with model.keyed(key):
        batches = _trainer().predict(plan, model.dataloader(held_out, batch_size=64))
    embedding = torch.cat([features for features, _ in batches]).numpy()
    assert embedding.shape == expected.shape
    np.testing.assert_allclose(embedding, expected, rtol=1e-4, atol=1e-5)
    # Without the key in force the same module computes something else: the weights need the key.
    batches = _trainer().predict(plan, model.dataloader(held_out, batch_size=64))
    unkeyed = torch.cat([features for features, _ in batches]).numpy()
    assert np.abs(unkeyed - expected).max() > 0.1
    wrong = si.FederationKey(hashlib.sha256(b"another key").digest())
    with pytest.raises(si.model.KeyMismatchError), model.keyed(wrong):
        pass
    blob = serialised(plan) + serialised(plan.state_dict())
    assert_no_secret(blob, key_secrets(key))


def test_a_users_trainer_validates_with_the_tasks_metrics(hardened_run):
    """The plan's validation_step is the one sites evaluate with: on the held-out cells under the key its
    loss is the mean cross-entropy of model.predict's probabilities."""
    model, key, held_out = hardened_run
    plan = model.lightning_module()
    with model.keyed(key):
        _trainer().validate(plan, model.dataloader(held_out, batch_size=64, labels=True), verbose=False)
    probabilities = model.predict(held_out, key=key).probabilities
    codes = pd.Categorical(held_out.obs["bulk_labels"], categories=model.schema.categories).codes
    cross_entropy = -np.log(probabilities[np.arange(len(codes)), codes]).mean()
    assert plan.validation_metrics["n"] == held_out.n_obs
    assert plan.validation_metrics["loss"] == pytest.approx(cross_entropy, rel=1e-4)


def test_each_sites_metrics_of_every_round_reach_the_lightning_logger(pbmc_sites, tmp_path, monkeypatch):
    monkeypatch.setattr(si.settings, "logger", CSVLogger(tmp_path, name="run"))
    model = si.tl.train_federated(pbmc_sites, key=None, **{**FAST, "rounds": 3})
    logged = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    history = model.history
    for site in pbmc_sites:
        for round_index, row in history[history["site"] == site].set_index("round").iterrows():
            at = logged[logged["step"] == round_index]
            assert at[f"{site}/train_loss"].dropna().tolist() == pytest.approx([row["train_loss"]], rel=1e-12)
            assert at[f"{site}/val_loss"].dropna().tolist() == pytest.approx([row["val_loss"]], rel=1e-12)
    assert len(logged) == 2 * 3 * len(pbmc_sites)  # per site and round: its training and its validation


def test_a_site_answering_a_hello_or_a_statistics_request_does_not_import_lightning():
    """A Flower ClientApp starts a process per message; only a training message pays for Lightning
    (docs/benchmarks.md)."""
    code = (
        "import sys, scinfl.federation.flower.client, scinfl.federation.statistics; "
        "print('lightning' in sys.modules); "
        "from scinfl.train import TrainingPlan; print('lightning' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True"]
