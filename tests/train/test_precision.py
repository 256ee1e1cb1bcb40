"""scinfl.settings.precision: bf16 mixed precision reaches every fit and prediction, keeps what sites hold
and send in float32, is deterministic, and is refused with DP-SGD."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import scinfl as si
from helpers import FAST
from scinfl.train import full_precision, resolve_precision, site_fabric


def test_resolve_precision_names_and_errors(monkeypatch):
    assert resolve_precision() == "32"
    assert resolve_precision("bf16") == resolve_precision("BF16-mixed") == "bf16-mixed"
    monkeypatch.setattr(si.settings, "precision", "16-mixed")
    with pytest.raises(ValueError, match="'16-mixed': use '32' or 'bf16-mixed'"):
        resolve_precision()


def test_site_fabric_autocasts_at_the_precision_and_full_precision_casts_back():
    layer = torch.nn.Linear(4, 3)
    x = torch.ones(2, 4)
    with site_fabric(torch.device("cpu"), "bf16-mixed").autocast():
        low = layer(x)
    with site_fabric(torch.device("cpu"), "32").autocast():
        full = layer(x)
    assert low.dtype == torch.bfloat16
    assert full.dtype == torch.float32
    cast = full_precision({"a": (low, torch.arange(3)), "b": [low, full.double()]})
    assert cast["a"][0].dtype == cast["b"][0].dtype == torch.float32
    assert cast["a"][1].dtype == torch.int64  # integer and float64 tensors untouched
    assert cast["b"][1].dtype == torch.float64


def _train(sites, key, precision, monkeypatch):
    monkeypatch.setattr(si.settings, "precision", precision)
    return si.tl.train_federated({k: v.copy() for k, v in sites.items()}, key=key, **FAST)


def test_bf16_training_reaches_the_fits_keeps_float32_and_is_deterministic(pbmc_split, monkeypatch):
    """With a hardened key: its conversions to and from the plain basis stay in float32."""
    sites, held_out = pbmc_split
    key = si.FederationKey(hashlib.sha256(b"precision").digest())
    assert key.scheme == "hardened"
    runs = {
        "32": _train(sites, key, "32", monkeypatch),
        "bf16-mixed": _train(sites, key, "bf16-mixed", monkeypatch),
        "bf16-mixed again": _train(sites, key, "bf16-mixed", monkeypatch),
    }
    states = {name: model.network.state_dict() for name, model in runs.items()}
    assert all(t.dtype in (torch.float32, torch.int64) for t in states["bf16-mixed"].values())
    for name, tensor in states["bf16-mixed"].items():  # same seed, same precision: the same weights
        assert torch.equal(tensor, states["bf16-mixed again"][name]), name
    assert not all(torch.equal(t, states["32"][n]) for n, t in states["bf16-mixed"].items())  # it did act

    accuracy = {}
    for name in ("32", "bf16-mixed"):
        monkeypatch.setattr(si.settings, "precision", name)
        query = held_out.copy()
        si.tl.predict(query, runs[name], key=key)
        assert query.obsm["X_scinfl"].dtype == np.float32
        accuracy[name] = float((query.obs["scinfl_prediction"] == query.obs["bulk_labels"]).mean())
    assert accuracy["32"] > 0.4, accuracy  # 10 classes; the largest is a third of the cells
    assert accuracy["bf16-mixed"] >= accuracy["32"] - 0.05, accuracy


def test_bf16_is_refused_with_dp_naming_the_site(pbmc_sites, monkeypatch):
    monkeypatch.setattr(si.settings, "precision", "bf16-mixed")
    with pytest.raises(ValueError, match="Site 'site_0': DP-SGD trains in float32"):
        si.tl.train_federated(pbmc_sites, key=None, dp={"epsilon": 8.0}, copy=True, **FAST | {"rounds": 1})
