"""Helpers shared by the test modules (imported as ``helpers``: ``pythonpath = ["tests"]`` in pyproject).

Test modules import from here, never from each other or from ``conftest.py``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch

import scinfl as si
from scinfl.nn import HardenedKey

# Small but real training settings shared by the end-to-end tests (the pbmc fixtures are registered with
# use_raw=True: their log-normalised values are in .raw).
FAST_TASK = si.tasks.Classification(label_key="bulk_labels", hidden=64)
FAST = {"task": FAST_TASK, "rounds": 4, "seed": 0}
METRIC_TOLERANCE = {"rtol": 1e-6, "atol": 1e-9}


def small_spec(sites, key: si.FederationKey | None, **options) -> si.federation.RunSpec:
    """The run spec of a small real run of ``sites`` under ``key`` (None: plain FedAvg): FAST_TASK at
    width 32, 2 rounds unless ``options`` say otherwise."""
    return si.federation.RunSpec(
        task=FAST_TASK.replace(hidden=32),
        sites=tuple(sites),
        key_fingerprint=None if key is None else key.fingerprint,
        scheme=None if key is None else key.scheme,
        **{"rounds": 2, **options},
    )


def serialised(obj) -> bytes:
    """``obj`` as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def key_secrets(key: si.FederationKey) -> list[bytes]:
    """Byte strings that would betray a key: its secret (raw and hex) and the paper scheme's coordinates
    derived from it (float32 and float64)."""
    coordinates = key.coordinates()
    return [
        key._secret,
        key._secret.hex().encode(),
        key._secret.hex().upper().encode(),
        coordinates.tobytes(),
        coordinates[:2].tobytes(),  # any two points
        coordinates[-2:].astype(np.float64).tobytes(),
    ]


def hardened_secrets(material: HardenedKey) -> list[bytes]:
    """Byte strings that would betray a hardened key: its mixing blocks, permutations and signs."""
    blocks = material.mixing.blocks[0]
    return [
        blocks.numpy().tobytes()[:4096],
        blocks.float().numpy().tobytes()[:4096],
        blocks[3].numpy().tobytes()[:512],
        material.mixing.orders[0].numpy().tobytes()[:800],
        material.inverse_orders[1].numpy().tobytes()[:800],
        material.mixing.matrix()[:, 0].numpy().tobytes(),
        material.mixing.matrix()[:, 0].float().numpy().tobytes(),
        material.output_order.numpy().tobytes(),
    ]


def assert_no_secret(blob: bytes, secrets: Iterable[bytes]) -> None:
    for secret in secrets:
        assert secret not in blob


def assert_same_weights(a: si.FederatedModel, b: si.FederatedModel) -> None:
    """The two models' weights are equal bit for bit."""
    state_a, state_b = a.network.state_dict(), b.network.state_dict()
    assert list(state_a) == list(state_b)
    for name, tensor in state_a.items():
        torch.testing.assert_close(state_b[name], tensor, rtol=0, atol=0, msg=f"weights differ at {name}")


def assert_same_history(expected: pd.DataFrame, actual: pd.DataFrame) -> None:
    """The same per-round, per-site history (metrics to 1e-6)."""
    assert set(expected.columns) == set(actual.columns)
    pd.testing.assert_frame_equal(expected, actual[expected.columns], check_exact=False, **METRIC_TOLERANCE)


def accuracy(model: si.FederatedModel, held_out, key, label_key: str = "bulk_labels") -> float:
    """Held-out accuracy of a classifier."""
    query = held_out.copy()
    si.tl.predict(query, model, key=key)
    return float((query.obs["scinfl_prediction"].astype(str) == query.obs[label_key].astype(str)).mean())
