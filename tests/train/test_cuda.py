"""On a real CUDA GPU (skipped elsewhere): the paths tests/train/test_device.py checks with a fake device,
run for real, against the same runs on the CPU."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from scipy import sparse

import scinfl as si
from helpers import FAST
from scinfl.data import AlignedMatrix
from scinfl.privacy.utility import predict_labels, train_fresh_model
from scinfl.train import to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda", 0) if torch.cuda.is_available() else None


def _trained(sites, key, accelerator, monkeypatch, **options):
    monkeypatch.setattr(si.settings, "accelerator", accelerator)
    return si.tl.train_federated(
        {k: v.copy() for k, v in sites.items()}, key=key, copy=True, **FAST | options
    )


def _accuracy(model, held_out, key, accelerator, monkeypatch) -> float:
    monkeypatch.setattr(si.settings, "accelerator", accelerator)
    query = held_out.copy()
    si.tl.predict(query, model, key=key)
    assert query.obsm["X_scinfl"].dtype == np.float32
    return float((query.obs["scinfl_prediction"] == query.obs["bulk_labels"]).mean())


def test_sparse_rows_densify_on_the_gpu_as_on_the_cpu(pbmc):
    matrix = sparse.csr_matrix(pbmc.raw.X)
    duplicated = sparse.csr_matrix(
        (np.repeat(matrix.data / 2, 2), np.repeat(matrix.indices, 2), 2 * matrix.indptr), shape=matrix.shape
    )
    names = list(pbmc.raw.var_names)
    index = np.arange(0, 700, 3)
    for source in (matrix, duplicated):
        for schema in (tuple(names), (*names[::-1][:500], "MISSING")):
            aligned = AlignedMatrix(source, pbmc.raw.var_names, schema)
            on_gpu = to_device(aligned.sparse_rows(index), CUDA)
            assert on_gpu.device == CUDA
            np.testing.assert_array_equal(on_gpu.cpu().numpy(), aligned.rows(index))


@pytest.mark.parametrize("scheme", ["hardened", "infl"])
def test_quick_start_on_the_gpu(pbmc_split, scheme, monkeypatch):
    """Same seed on the GPU: the same weights twice, accuracy as on the CPU (not the same bits)."""
    sites, held_out = pbmc_split
    key = si.FederationKey(hashlib.sha256(f"cuda {scheme}".encode()).digest(), scheme=scheme)
    gpu = _trained(sites, key, "cuda", monkeypatch)
    again = _trained(sites, key, "cuda", monkeypatch)
    cpu = _trained(sites, key, "cpu", monkeypatch)
    for name, tensor in gpu.network.state_dict().items():
        assert tensor.device.type == "cpu"
        assert torch.equal(tensor, again.network.state_dict()[name]), name
    accuracy = {
        where: _accuracy(m, held_out, key, where, monkeypatch) for where, m in (("cuda", gpu), ("cpu", cpu))
    }
    assert abs(accuracy["cuda"] - accuracy["cpu"]) <= 0.05, accuracy


def test_dp_sgd_and_bf16_on_the_gpu(pbmc_split, monkeypatch):
    sites, held_out = pbmc_split
    private = _trained(sites, None, "cuda", monkeypatch, dp={"epsilon": 8.0}, rounds=2)
    assert 0 < private.params["dp"]["spent_epsilon"]["site_0"] <= 8.0
    monkeypatch.setattr(si.settings, "precision", "bf16-mixed")
    half = _trained(sites, None, "cuda", monkeypatch)
    assert all(t.dtype != torch.bfloat16 for t in half.network.state_dict().values())
    assert _accuracy(half, held_out, None, "cuda", monkeypatch) > 0.4


def test_audit_models_train_and_predict_on_the_gpu(pbmc_sites, monkeypatch):
    monkeypatch.setattr(si.settings, "accelerator", "cuda")
    model = si.tl.train_federated(pbmc_sites, key=None, copy=True, **FAST | {"rounds": 1})
    site = model.sites["site_1"]
    x = torch.from_numpy(model.inputs(site, site="site_1").rows(np.arange(site.n_obs)))
    y = torch.from_numpy(model.task.labels(site, "site_1", model.schema))
    network = train_fresh_model(model.config, x, y, epochs=5, seed=0)
    assert next(network.parameters()).device.type == "cuda"
    assert (predict_labels(network, x) == y.numpy()).mean() > 0.3


def test_privacy_audit_on_the_gpu(pbmc_split, monkeypatch):
    """Every attack family on the GPU: the hardened scheme's main checks hold as on the CPU."""
    sites, public = pbmc_split
    key = si.FederationKey(hashlib.sha256(b"cuda audit").digest())
    model = _trained(sites, key, "cuda", monkeypatch, rounds=10)
    table = si.tl.privacy_audit(
        model, model.sites["site_1"], key=key, public=public, settings={"seeds": (0,), "n_victims": 8}
    )
    assert set(table.family) >= {"utility", "analytic", "inversion", "membership", "geometry"}
    rows = table[(table.attack == "accuracy") & (table.metric == "accuracy")].set_index("view")["mean"]
    assert rows["right key"] > 0.6
    assert rows["wrong key"] < rows["chance"]
