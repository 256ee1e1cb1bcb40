"""A user's own LightningModule, as ``si.tasks.Lightning`` federates it (imported as ``user_modules``:
``pythonpath = ["tests"]`` in pyproject; a deployment's sites install theirs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn


class CellTypeMLP(LightningModule):
    """An encoder to a 16-dimensional embedding, a linear classifier on it, cross-entropy."""

    def __init__(self, n_features: int, n_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 16), nn.ReLU()
        )
        self.classifier = nn.Linear(16, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)
