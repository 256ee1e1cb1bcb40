"""What the aggregated weights are worth without the key: wrong keys, near-miss keys, no key, and key recovery.

A key protects only if a model run without it (or with a guess of it) is no better than chance, and if an
attacker holding the weights and a little labelled data gains nothing over training from scratch on that
data alone.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..nn import KeyedModule, KeyedNetwork, use_key, use_key_vector
from ..tasks import ModelConfig, build_network
from ..train import fit_local, key_on, module_device, to_device

__all__ = [
    "balanced_accuracy",
    "embed",
    "fit_frozen",
    "fresh_model_accuracy",
    "knn_labels",
    "predict_labels",
    "recover_coordinates",
    "recover_key_vector",
    "scores",
    "train_fresh_model",
]


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (``sklearn.metrics.balanced_accuracy_score``;
    a predicted class absent from ``y_true``, as a wrong key predicts, counts against recall silently)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, y_pred))


@torch.no_grad()
def predict_labels(
    network: nn.Module,
    x: Tensor,
    *,
    key_material: Tensor | None = None,
    key_vector: Tensor | None = None,
    batch_size: int = 2048,
) -> np.ndarray:
    """Predicted class of every row of ``x`` (evaluation mode), under coordinates, a key vector, or no key.

    Computed on the network's device (a model trained by :func:`train_fresh_model` is on the accelerator).
    """
    network.eval()
    device = module_device(network)
    key_material = key_on(key_material, device)
    key_vector = None if key_vector is None else key_vector.to(device)
    out = []
    for start in range(0, len(x), batch_size):
        batch = to_device(x[start : start + batch_size], device)
        with use_key(key_material):
            if key_vector is not None:
                with use_key_vector(key_vector):
                    logits = network(batch)
            else:
                logits = network(batch)
        out.append(logits.argmax(dim=1).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def embed(
    network: nn.Module, x: Tensor, *, key_material: Tensor | None = None, batch_size: int = 2048
) -> np.ndarray:
    """The embedding (``features``) of every row of ``x`` (evaluation mode) under one key view, computed
    on the network's device."""
    network.eval()
    device = module_device(network)
    out = []
    with use_key(key_on(key_material, device)):
        for start in range(0, len(x), batch_size):
            batch = to_device(x[start : start + batch_size], device)
            features = (
                network.call("features", batch)
                if isinstance(network, KeyedModule)
                else network.features(batch)
            )
            out.append(features.cpu().numpy())
    return np.concatenate(out)


def knn_labels(
    reference: np.ndarray,
    reference_labels: np.ndarray,
    query: np.ndarray,
    *,
    n_neighbors: int = 15,
    confidence: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Labels of ``query`` rows by majority vote of their nearest ``reference`` rows (label transfer;
    :func:`scinfl.tl.transfer_labels` on AnnData).

    How useful an embedding is to someone holding labelled cells in the same view: the utility of a model
    without classes. With ``confidence``, also the fraction of the voters that agree with each label.
    """
    k = max(1, min(n_neighbors, len(reference)))
    classifier = KNeighborsClassifier(n_neighbors=k).fit(reference, reference_labels)
    if not confidence:
        return classifier.predict(query)
    votes = classifier.predict_proba(query)
    return classifier.classes_[np.argmax(votes, axis=1)], votes.max(axis=1)


def fit_frozen(
    network: nn.Module,
    x: Tensor,
    y: Tensor,
    variables: list[Tensor],
    context: Callable[[], AbstractContextManager],
    *,
    steps: int,
    lr: float,
) -> None:
    """Fit ``variables`` (leaf tensors requiring grad) by cross-entropy on (x, y), every weight frozen.

    Each forward pass runs inside ``context()`` (the attacker's key view built from ``variables``). The
    network's weights and their ``requires_grad`` flags are left as they were.
    """
    network.eval()
    x, y = to_device((x, y), module_device(network))
    frozen = [p.requires_grad for p in network.parameters()]
    for p in network.parameters():
        p.requires_grad_(False)
    optimiser = torch.optim.Adam(variables, lr=lr)
    try:
        for _ in range(steps):
            optimiser.zero_grad()
            with context():
                loss = F.cross_entropy(network(x), y)
            loss.backward()
            optimiser.step()
    finally:
        for p, flag in zip(network.parameters(), frozen, strict=True):
            p.requires_grad_(flag)


def _fit_secret(
    network: KeyedNetwork,
    x: Tensor,
    y: Tensor,
    secret: Tensor,
    context: Callable[[Tensor], AbstractContextManager],
    *,
    steps: int,
    lr: float,
) -> Tensor:
    """Fit ``secret`` (a key vector or coordinates) by cross-entropy on (x, y) with every weight frozen."""
    secret = secret.detach().to(module_device(network)).clone().requires_grad_(True)
    fit_frozen(network, x, y, [secret], lambda: context(secret), steps=steps, lr=lr)
    return secret.detach()


def recover_key_vector(
    network: KeyedNetwork, x: Tensor, y: Tensor, *, init: Tensor, steps: int = 300, lr: float = 0.05
) -> Tensor:
    """The attacker fits the key vector ``k`` itself (16 numbers for ``scheme="infl"``) on labelled data."""
    return _fit_secret(network, x, y, init, use_key_vector, steps=steps, lr=lr)


def recover_coordinates(
    network: KeyedNetwork, x: Tensor, y: Tensor, *, init: Tensor, steps: int = 300, lr: float = 0.02
) -> Tensor:
    """The attacker fits the secret coordinates through the (frozen, public) key encoder."""
    return _fit_secret(network, x, y, init, use_key, steps=steps, lr=lr)


def train_fresh_model(
    config: ModelConfig,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 60,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """A plain network of ``config``'s architecture trained from scratch on (x, y) alone.

    What an attacker can build without the federation's weights: the key-recovery baseline and the
    reference models of membership inference.
    """
    plain = dataclasses.replace(config, scheme=None)
    torch.manual_seed(seed)
    network = build_network(plain)
    drop_last = len(x) % batch_size == 1  # BatchNorm cannot train on a batch of one
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )
    fit_local(
        network,
        loader,
        config.task.objective(config),
        epochs=epochs,
        lr=lr,
        weight_decay=1e-5,
        seed=seed,
        key_material=None,
    )
    return network.eval()


def fresh_model_accuracy(
    config: ModelConfig,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: np.ndarray,
    *,
    epochs: int = 60,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[float, float]:
    """Accuracy and balanced accuracy on the test set of a plain network trained on (x_train, y_train) alone.

    The fair comparison for key recovery: what the attacker's labelled data is worth without the weights.
    """
    network = train_fresh_model(
        config, x_train, y_train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed
    )
    predicted = predict_labels(network, x_test)
    return float((predicted == y_test).mean()), balanced_accuracy(y_test, predicted)


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy of predicted labels."""
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
    }
