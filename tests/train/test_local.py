"""Local fits: the plan's optimiser, reused across fits, starts every fit as a new Adam would."""

from __future__ import annotations

import copy

import numpy as np
import torch

from scinfl.data import AlignedMatrix, SiteDataset, batch_loader
from scinfl.nn.networks import ResidualMLPClassifier
from scinfl.tasks.classification import CrossEntropy
from scinfl.train import TrainingPlan, fit_plan


def _batches(cells, seed):
    return batch_loader(
        cells, batch_size=64, shuffle=True, seed=seed
    )  # a loader's order moves on as it is read


def test_reused_optimizer_fits_exactly_as_a_new_one_per_fit(pbmc):
    names = tuple(pbmc.raw.var_names)
    labels = pbmc.obs["bulk_labels"].cat.codes.to_numpy().astype(np.int64)
    cells = SiteDataset(AlignedMatrix(pbmc.raw.X, pbmc.raw.var_names, names), np.arange(300), labels)
    torch.manual_seed(0)
    network = ResidualMLPClassifier(len(names), 10, hidden=32, dropout=0.1, norm="batch")
    reused = TrainingPlan(network, CrossEntropy(), lr=1e-2, weight_decay=1e-5)
    renewed = TrainingPlan(copy.deepcopy(network), CrossEntropy(), lr=1e-2, weight_decay=1e-5)
    optimizers = set()
    for seed in (1, 2, 3):
        fit_plan(reused, _batches(cells, seed), epochs=2, seed=seed, key_material=None)
        optimizers.add(id(reused._optimizer))
        renewed._optimizer = None  # a new Adam for this fit, as configure_optimizers builds one
        fit_plan(renewed, _batches(cells, seed), epochs=2, seed=seed, key_material=None)
    assert len(optimizers) == 1
    assert any(len(state) for state in reused._optimizer.state.values())  # it did step
    for name, tensor in reused.network.state_dict().items():
        assert torch.equal(tensor, renewed.network.state_dict()[name]), name
