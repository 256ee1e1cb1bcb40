"""Data-parallel fits inside a site (``scinfl.settings.devices > 1``): two CPU processes (gloo, Lightning
Fabric's ddp_spawn, the default, and ddp_fork), each taking half of every batch, give the one-process
update.

The networks here have no dropout and LayerNorm, not BatchNorm: dropout masks are drawn per process (not
the one process's masks), and torch runs SyncBatchNorm on CUDA only, so on CPU processes a BatchNorm
network would normalise each half with its own statistics; scinfl refuses that case (tested below).
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch

import scinfl as si
from scinfl.data import AlignedMatrix, SiteDataset, batch_loader
from scinfl.nn import keyify
from scinfl.nn.networks import ResidualMLPClassifier
from scinfl.tasks.classification import CrossEntropy
from scinfl.train import fit_plan, key_material, training_plan


def _cells(pbmc) -> SiteDataset:
    names = tuple(pbmc.raw.var_names)
    labels = pbmc.obs["bulk_labels"].cat.codes.to_numpy().astype(np.int64)
    return SiteDataset(AlignedMatrix(pbmc.raw.X, pbmc.raw.var_names, names), np.arange(300), labels)


def _fit(network, cells, key, *, devices: int, monkeypatch, strategy: str = "auto") -> tuple[dict, float]:
    monkeypatch.setattr(si.settings, "devices", devices)
    monkeypatch.setattr(si.settings, "strategy", strategy)
    plan = training_plan(copy.deepcopy(network), CrossEntropy(), lr=1e-2, weight_decay=1e-5)
    # 300 cells in batches of 63: each splits 31 + 32 (weighted by size), the last one, 48 cells, evenly.
    batches = batch_loader(cells, batch_size=63, shuffle=True, seed=3, drop_singleton=True)
    loss = fit_plan(plan, batches, epochs=2, seed=3, key_material=key_material(key, plan.network))
    return {k: v.detach().clone() for k, v in plan.network.state_dict().items()}, loss


# Spawned processes import torch, Lightning and scinfl (several seconds each); forked ones do not.
@pytest.mark.parametrize(("scheme", "strategy"), [(None, "ddp_fork"), ("infl", "auto")])
def test_two_cpu_processes_give_the_one_process_update(pbmc, monkeypatch, scheme, strategy):
    cells = _cells(pbmc)
    torch.manual_seed(0)
    network = ResidualMLPClassifier(pbmc.raw.n_vars, 10, hidden=32, dropout=0.0, norm="layer")
    key = None
    if scheme is not None:
        network = keyify(network)
        key = si.FederationKey(hashlib.sha256(b"ddp").digest(), scheme=scheme)
    start = {k: v.detach().clone() for k, v in network.state_dict().items()}
    one, one_loss = _fit(network, cells, key, devices=1, monkeypatch=monkeypatch)
    two, two_loss = _fit(network, cells, key, devices=2, monkeypatch=monkeypatch, strategy=strategy)
    worst = 0.0
    for name, initial in start.items():
        update_one, update_two = one[name] - initial, two[name] - initial
        if update_one.is_floating_point() and float(update_one.norm()) > 0:
            worst = max(worst, float((update_two - update_one).norm() / update_one.norm()))
        else:
            assert torch.equal(update_one, update_two), name
    print(f"worst relative difference of an update: {worst:.2e}")
    assert worst <= 1e-4, worst
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    assert any(float((one[n] - start[n]).abs().max()) > 1e-3 for n in start)  # it trained


def test_data_parallel_refuses_what_it_cannot_do_as_one_process(pbmc, monkeypatch):
    cells = _cells(pbmc)
    batch_norm = ResidualMLPClassifier(pbmc.raw.n_vars, 10, hidden=32, dropout=0.0, norm="batch")
    with pytest.raises(ValueError, match="SyncBatchNorm on CUDA only"):
        _fit(batch_norm, cells, None, devices=2, monkeypatch=monkeypatch)
    layer_norm = ResidualMLPClassifier(pbmc.raw.n_vars, 10, hidden=32, dropout=0.0, norm="layer")
    with pytest.raises(ValueError, match="'ddp' re-runs the calling script"):
        _fit(layer_norm, cells, None, devices=2, monkeypatch=monkeypatch, strategy="ddp")
