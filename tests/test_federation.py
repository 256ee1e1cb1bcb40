"""FedAvg, the key-version check, client sampling, and what a site sends to the aggregator."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import torch

import scinfl as si
from scinfl.data import AlignedMatrix, build_schema, label_codes, site_fields
from scinfl.federation import KeyVersionError, aggregate, fedavg, run_local, sample_sites
from scinfl.train import FitSettings, LocalFitResult, ModelConfig, SiteTrainer, build_network, site_datasets
from test_nn import _serialised, key_material


def _trained_states(n: int) -> list[dict[str, torch.Tensor]]:
    """State dicts of a BatchNorm network after forward passes on different real PBMC cells, so that
    running statistics differ between the "sites"."""
    cells = torch.from_numpy(sc.datasets.pbmc68k_reduced().raw.X.toarray().astype(np.float32))
    states = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = si.nn.ResidualMLPClassifier(cells.shape[1], 3, hidden=8)
        net.train()
        for step in range(seed + 1):
            net(cells[(seed * 100 + step * 16) : (seed * 100 + step * 16 + 16)])
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    return states


def test_fedavg_weighted_mean_including_batchnorm_statistics():
    states = _trained_states(3)
    weights = [100, 50, 10]
    avg = fedavg(states, weights)
    for name, tensor in avg.items():
        stacked = torch.stack([s[name].double() for s in states])
        if tensor.is_floating_point():
            expected = (
                stacked * torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * tensor.ndim)
            ).sum(0) / sum(weights)
            torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7)
            assert tensor.dtype == states[0][name].dtype
        else:  # num_batches_tracked
            assert int(tensor) == max(int(s[name]) for s in states)
    running = [n for n in avg if n.endswith("running_var")]
    assert running, "BatchNorm running statistics must be aggregated"
    # a site with more cells pulls the average towards itself
    heavy = fedavg(states, [1000, 1, 1])
    name = running[0]
    assert (heavy[name] - states[0][name]).abs().max() < (avg[name] - states[0][name]).abs().max()


def test_fedavg_rejects_bad_input():
    states = _trained_states(2)
    with pytest.raises(ValueError, match="at least one"):
        fedavg([], [])
    with pytest.raises(ValueError, match="weights"):
        fedavg(states, [1])
    with pytest.raises(ValueError, match="non-negative"):
        fedavg(states, [0, 0])
    other = dict(states[1])
    other.pop(next(iter(other)))
    with pytest.raises(ValueError, match="different models"):
        fedavg([states[0], other], [1, 1])


def test_aggregate_rejects_updates_under_another_key_version(scinfl_log):
    states = _trained_states(3)
    updates = {
        "a": LocalFitResult(states[0], 10, "v1"),
        "b": LocalFitResult(states[1], 30, "v1"),
        "c": LocalFitResult(states[2], 500, "v0-old"),
    }
    state, rejected = aggregate(updates, "v1", round_index=3)
    assert rejected == ["c"]
    assert "site 'c'" in scinfl_log.text
    assert "v0-old" in scinfl_log.text
    expected = fedavg([states[0], states[1]], [10, 30])
    for name in expected:
        torch.testing.assert_close(state[name], expected[name])
    with pytest.raises(KeyVersionError, match="no site sent an update under key version v2"):
        aggregate(updates, "v2", round_index=1)


def test_sample_sites_fraction_and_determinism():
    names = [f"s{i}" for i in range(10)]
    draws = [sample_sites(names, 0.3, np.random.default_rng(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    assert len(draws[0]) == 3
    assert set(draws[0]) <= set(names)
    assert len(sample_sites(names, 0.01, np.random.default_rng(0))) == 1  # never zero sites
    assert sample_sites(names, 1.0, np.random.default_rng(0)) == names
    many = {tuple(sample_sites(names, 0.3, np.random.default_rng(s))) for s in range(20)}
    assert len(many) > 5  # sampling really varies with the seed
    with pytest.raises(ValueError, match="fraction"):
        sample_sites(names, 0.0, np.random.default_rng(0))


def _site_trainers(sites, keys: dict[str, si.FederationKey | None], scheme: str | None = "infl"):
    fields = {n: site_fields(a, n, label_key="bulk_labels", use_raw=True) for n, a in sites.items()}
    schema = build_schema(sites, fields)
    config = ModelConfig(
        task="classification",
        n_features=schema.n_features,
        n_classes=schema.n_classes,
        hidden=32,
        scheme=scheme,
    )
    torch.manual_seed(0)
    network = build_network(config)
    trainers = {}
    for i, (name, adata) in enumerate(sites.items()):
        matrix = AlignedMatrix.from_adata(adata, schema, fields[name])
        train, val = site_datasets(matrix, label_codes(adata, schema, name), 0.1, np.random.default_rng(i))
        trainers[name] = SiteTrainer(name, train, val, network, config, keys[name], FitSettings())
    return network, trainers


def test_updates_sent_to_the_aggregator_hold_no_key_material(pbmc_sites, key):
    network, trainers = _site_trainers(pbmc_sites, dict.fromkeys(pbmc_sites, key))
    update = trainers["site_0"].fit(network.state_dict(), seed=0)
    assert update.key_fingerprint == key.fingerprint
    assert update.n_obs == trainers["site_0"].n_train
    # the update is the whole message: weights, count, fingerprint, metrics
    blob = _serialised(
        {"state": update.state, "n": update.n_obs, "fp": update.key_fingerprint, **update.metrics}
    )
    for secret in key_material(key):
        assert secret not in blob
    # and the weights really moved: this is a trained update, not the initial state
    moved = max(
        (update.state[k] - v).abs().max() for k, v in network.state_dict().items() if v.is_floating_point()
    )
    assert moved > 1e-4


def test_site_with_another_key_version_is_rejected_every_round(pbmc_sites, key, scinfl_log):
    stale = si.FederationKey.generate(scheme="infl")
    keys = {"site_0": key, "site_1": key, "site_2": stale}
    network, trainers = _site_trainers(pbmc_sites, keys)
    result = run_local(trainers, network.state_dict(), rounds=2, seed=0, expected_fingerprint=key.fingerprint)
    history = result.history
    assert history.loc[history.site == "site_2", "rejected"].all()
    assert not history.loc[history.site != "site_2", "rejected"].any()
    assert scinfl_log.text.count("rejected the update of site 'site_2'") == 2


def test_run_local_is_deterministic_and_seed_sensitive(pbmc_sites, key):
    def run(seed):
        network, trainers = _site_trainers(pbmc_sites, dict.fromkeys(pbmc_sites, key))
        return run_local(
            trainers,
            network.state_dict(),
            rounds=2,
            seed=seed,
            fraction=0.67,
            expected_fingerprint=key.fingerprint,
        )

    first, again, other = run(0), run(0), run(1)
    for name, tensor in first.final_state.items():
        torch.testing.assert_close(tensor, again.final_state[name], rtol=0, atol=0)
    assert any(not torch.equal(t, other.final_state[n]) for n, t in first.final_state.items())
    assert (first.history.groupby("round").sampled.sum() == 2).all()  # 0.67 x 3 sites = 2 per round


def test_best_round_is_the_lowest_validation_loss(pbmc_sites, key):
    network, trainers = _site_trainers(pbmc_sites, dict.fromkeys(pbmc_sites, key))
    result = run_local(trainers, network.state_dict(), rounds=4, seed=0, expected_fingerprint=key.fingerprint)
    h = result.history
    weighted = h.assign(w=h.val_loss * h.n_val).groupby("round").w.sum() / h.groupby("round").n_val.sum()
    assert result.best_round == int(weighted.idxmin())
