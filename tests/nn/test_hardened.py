"""The hardened key scheme: its transforms, their equivalence to a plain network, and what leaks without the key."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch

import scinfl as si
from helpers import FAST, FAST_TASK, assert_no_secret, hardened_secrets, key_secrets, serialised
from scinfl.data import FederationSchema
from scinfl.federation import (
    InProcess,
    KeyVersionError,
    RunSpec,
    aggregate,
    build_site,
    federate,
    initial_weights,
)
from scinfl.model import KeyMismatchError
from scinfl.nn import BlockMixing, HardenedKey, HardenedNetwork, harden
from scinfl.privacy.analytic import invert_first_layer
from scinfl.privacy.audit import wrong_key
from scinfl.privacy.gradients import client_gradient, loss_gradients
from scinfl.privacy.hardened import RelaxedHardenedKey, known_plaintext, labels_by_frequency
from scinfl.privacy.inversion import recover_labels
from scinfl.privacy.metrics import pearson
from scinfl.tasks import ModelConfig, build_network
from scinfl.train import LocalFitResult, key_material


@pytest.fixture(scope="module")
def hardened_key() -> si.FederationKey:
    return si.FederationKey(hashlib.sha256(b"scinfl hardened test key").digest(), scheme="hardened")


@pytest.fixture(scope="module")
def cells(_pbmc) -> torch.Tensor:
    return torch.from_numpy(_pbmc.raw.X.toarray().astype(np.float32))


def _config(n_features=765, n_classes=10, hidden=32, scheme="hardened", **kw) -> ModelConfig:
    """A classifier's architecture for ``n_features`` genes and ``n_classes`` labels (names are placeholders)."""
    schema = FederationSchema(
        var_names=tuple(f"gene_{i}" for i in range(n_features)),
        categories=tuple(f"type_{i}" for i in range(n_classes)),
        label_key="bulk_labels",
        layer=None,
        use_raw=True,
        join="inner",
    )
    return ModelConfig(task=si.tasks.Classification(hidden=hidden), schema=schema, scheme=scheme, **kw)


def _network(config: ModelConfig, seed: int = 0) -> HardenedNetwork:
    torch.manual_seed(seed)
    return build_network(config).eval()


def _material(key: si.FederationKey, config: ModelConfig) -> HardenedKey:
    """What ``key`` gives a network of ``config`` (the material depends only on its public layout)."""
    return key_material(key, build_network(config))


def test_material_is_deterministic_and_changes_with_any_bit(hardened_key):
    config = _config(hidden=256)
    a, b = _material(hardened_key, config), key_material(hardened_key, _network(config, seed=1))
    for x, y in zip(
        a.mixing.blocks + a.inverse_orders + a.signs,
        b.mixing.blocks + b.inverse_orders + b.signs,
        strict=True,
    ):
        assert torch.equal(x, y)
    other_key = si.FederationKey(hashlib.sha256(b"another hardened key").digest(), scheme="hardened")
    for other in (hardened_key.with_bit_flipped(77), other_key):
        c = _material(other, config)
        assert (c.mixing.orders[0] == a.mixing.orders[0]).float().mean() < 0.05
        assert (c.inverse_orders[2] == a.inverse_orders[2]).float().mean() < 0.1
        assert (c.signs[2] == a.signs[2]).float().mean() < 0.75
        assert not torch.allclose(c.mixing.blocks[0], a.mixing.blocks[0])
    assert "tensor" not in repr(a)  # the repr shows no material
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(a)


@pytest.mark.parametrize("n_features", [5, 70, 765])
def test_block_mixing_is_an_invertible_non_orthogonal_map(hardened_key, n_features):
    material = _material(hardened_key, _config(n_features=n_features))
    x = torch.randn(9, n_features)
    matrix = material.mixing.matrix().float()
    torch.testing.assert_close(material.mixing(x), x @ matrix.T, rtol=1e-4, atol=1e-4)
    condition = torch.linalg.cond(matrix.double())
    assert 5 < condition < 1e4  # gains make it non-orthogonal; still well inside float32 precision
    inverse = torch.linalg.inv(matrix.double()).float()
    torch.testing.assert_close(material.mixing(x) @ inverse.T, x, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(material.mixing.right(x), x @ matrix, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(material.mixing.right_inverse(x), x @ inverse, rtol=1e-3, atol=1e-3)
    assert isinstance(material.mixing, BlockMixing)


def test_keyed_forward_is_the_plain_network_on_converted_weights(hardened_key, cells):
    config = _config()
    network = _network(config)
    material = key_material(hardened_key, network)
    shared = {k: v.clone() for k, v in network.state_dict().items()}
    plain = network.to_plain(shared, material)
    back = network.from_plain(plain, material)
    for name, tensor in shared.items():
        torch.testing.assert_close(back[name], tensor, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        keyed = network(cells[:50], key=material)
        network.load_state_dict(plain)
        unkeyed_on_plain = network(cells[:50])
        network.load_state_dict(shared)
        without_key = network(cells[:50])
    torch.testing.assert_close(keyed, unkeyed_on_plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(keyed, without_key, atol=1e-2)


def test_sent_gradient_is_the_plain_gradient_carried_to_the_shared_basis(hardened_key, cells):
    config = _config()
    network = _network(config)
    material = key_material(hardened_key, network)
    x, y = cells[:6], torch.tensor([0, 1, 2, 3, 4, 5])
    shared = {n: p.detach().clone().requires_grad_(True) for n, p in network.named_parameters()}
    sent = loss_gradients(network, x, y, shared, key_material=material)
    plain = {
        n: t.detach().clone().requires_grad_(True)
        for n, t in network.to_plain({n: p.detach() for n, p in shared.items()}, material).items()
    }
    expected = network.from_plain(loss_gradients(network, x, y, plain, key_material=None), material)
    for name in sent:
        torch.testing.assert_close(sent[name], expected[name], rtol=1e-3, atol=1e-6)
    # Plain autograd through the keyed forward (what the relaxed key computes) differs on the first layer:
    # the sites train in the plain basis, and the mixing is not orthogonal.
    naive = loss_gradients(network, x, y, shared, key_material=RelaxedHardenedKey.from_key(network, material))
    first = "network.embedding.0.weight"
    assert not torch.allclose(naive[first], sent[first], rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(
        naive["network.blocks.0.body.0.weight"], sent["network.blocks.0.body.0.weight"]
    )


def test_harden_copies_and_checks(hardened_key):
    module = si.nn.ResidualMLPClassifier(20, 3, hidden=8)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    hardened = harden(module)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name])
        assert torch.equal(hardened.state_dict()[f"network.{name}"], tensor)
    with pytest.raises(ValueError, match="no nn.Linear"):
        harden(torch.nn.ReLU())
    other_layout = _material(hardened_key, _config(n_features=30))
    with pytest.raises(ValueError, match="another network layout"):
        hardened(torch.randn(2, 20), key=other_layout)
    with pytest.raises(TypeError, match="scheme 'hardened'"):
        hardened(torch.randn(2, 20), key=torch.zeros(128, 2))
    infl = build_network(_config(n_features=20, n_classes=3, hidden=8, scheme="infl"))
    with pytest.raises(TypeError, match="scheme 'infl'"):
        infl(torch.randn(2, 20), key=_material(hardened_key, _config(n_features=20, n_classes=3, hidden=8)))
    with pytest.raises(ValueError, match="The key is for scheme 'hardened', but the model uses 'infl'"):
        key_material(hardened_key, infl)


def test_analytic_leak_is_the_mixed_input_only_the_key_holder_can_unmix(hardened_key, cells):
    config = _config()
    network = _network(config)
    material = key_material(hardened_key, network)
    public_mean = cells[:300].mean(0).numpy()
    leaked_pearson, unmixed_pearson = [], []
    for i in range(300, 316):
        x = cells[i : i + 1]
        grads = client_gradient(network, x, torch.tensor([i % 10]), key_material=material)
        leaked = invert_first_layer(grads["network.embedding.0.weight"], grads["network.embedding.0.bias"])
        leaked_pearson.append(pearson(leaked - leaked.mean(), x[0].numpy() - public_mean))
        # The insider undoes the signed permutation and the mixing: u = sign * (x M^-1)[:, inverse order].
        signed = torch.from_numpy(leaked).float() * material.signs[0]
        unmixed = signed[torch.argsort(material.inverse_orders[0])] @ material.mixing.matrix().float()
        unmixed_pearson.append(pearson(unmixed.numpy(), x[0].numpy()))
    assert np.mean(unmixed_pearson) > 0.999  # positive control: the gradient does carry the cell
    assert abs(np.mean(leaked_pearson)) < 0.1


def test_output_units_are_relabelled_by_the_key(hardened_key, cells):
    config = _config()
    network = _network(config)
    material = key_material(hardened_key, network)
    labels = torch.arange(10)
    positions = []
    for i, label in enumerate(labels):
        grads = client_gradient(network, cells[i : i + 1], label[None], key_material=material)
        positions.append(int(recover_labels(grads["network.classifier.bias"], 1)[0]))
    np.testing.assert_array_equal(positions, material.output_order.numpy())
    assert not np.array_equal(positions, labels.numpy())


def test_relaxed_key_holds_the_true_key(hardened_key, cells):
    config = _config()
    network = _network(config)
    material = key_material(hardened_key, network)
    relaxed = RelaxedHardenedKey.from_key(network, material)
    with torch.no_grad():
        torch.testing.assert_close(
            network(cells[:20], key=relaxed), network(cells[:20], key=material), rtol=1e-4, atol=1e-4
        )
        identity = network(cells[:20], key=RelaxedHardenedKey.identity(network))
        torch.testing.assert_close(identity, network(cells[:20]), rtol=1e-5, atol=1e-5)


def test_known_plaintext_and_frequency_attacks_on_a_known_linear_map():
    rng = np.random.default_rng(0)
    profiles = rng.normal(size=(6, 40))
    mixing = rng.normal(size=(40, 40))
    victims = np.array([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0]]) @ profiles[:3]
    rebuilt = known_plaintext(victims @ mixing.T, profiles[:3] @ mixing.T, profiles[:3])
    np.testing.assert_allclose(rebuilt, victims, atol=1e-8)  # in the span of the known cells: exact
    outside = known_plaintext(profiles[3:] @ mixing.T, profiles[:3] @ mixing.T, profiles[:3])
    assert np.abs(outside - profiles[3:]).mean() > 0.3  # outside it: not recovered
    positions = np.array([4, 4, 4, 1, 1, 0])
    public = np.array([2, 2, 2, 2, 7, 7, 3])
    np.testing.assert_array_equal(labels_by_frequency(positions, public, 10), [2, 2, 2, 7, 7, 3])


def _plain_initial_weights(config: ModelConfig, seed: int, key: si.FederationKey) -> dict[str, torch.Tensor]:
    """The plain network's weights that a hardened run of ``seed`` starts from (its initial weights carried
    out of the shared basis), named as in the plain network."""
    network = build_network(config)
    shared = initial_weights(config, seed, key)
    plain = network.to_plain(shared, key_material(key, network))
    return {name.removeprefix("network."): tensor for name, tensor in plain.items()}


@pytest.fixture(scope="module")
def federated(pbmc_split, hardened_key):
    """A hardened run, and plain FedAvg started from the same plain network (the hardened run's initial
    weights, which a key-derived seed draws), with the same seed for everything else."""
    sites, test = pbmc_split
    # In the clear, so that the two runs differ only by the scheme (secure aggregation: federation tests).
    hardened = si.tl.train_federated(
        sites, key=hardened_key, copy=True, secure_aggregation=False, **{**FAST, "rounds": 8}
    )
    spec = RunSpec(task=FAST_TASK, sites=tuple(sites), rounds=8, seed=FAST["seed"], secure_aggregation=False)
    assert spec.signature() | {"key_fingerprint": None, "scheme": None} == hardened.spec.signature() | {
        "key_fingerprint": None,
        "scheme": None,
    }  # the same run but for the key
    start = _plain_initial_weights(hardened.config, FAST["seed"], hardened_key)
    run = federate(InProcess(sites, dict.fromkeys(sites)), spec, initial_state=start)
    plain = si.FederatedModel.from_run(run, spec, engine="local")
    return plain, hardened, test


def test_hardened_initial_weights_come_from_a_key_derived_seed(hardened_key):
    """The server knows the run's seed: the plain form of the hardened initial weights is not its draw."""
    config = _config()
    plain_config = _config(scheme=None)
    start = _plain_initial_weights(config, 0, hardened_key)
    assert start.keys() == initial_weights(plain_config, 0).keys()
    seed_draw = initial_weights(plain_config, 0)
    assert all(
        not torch.equal(start[name], seed_draw[name]) for name in start if start[name].dim() == 2
    )  # every linear layer
    # deterministic per key and seed; another key or seed draws other weights
    again = _plain_initial_weights(config, 0, hardened_key)
    assert all(torch.equal(start[name], again[name]) for name in start)
    for other in (
        _plain_initial_weights(config, 1, hardened_key),
        _plain_initial_weights(config, 0, wrong_key(hardened_key, 3, 0)),
    ):
        assert not torch.equal(other["embedding.0.weight"], start["embedding.0.weight"])
    # a plain network's initial weights are the seed's draw, whoever asks
    assert all(
        torch.equal(seed_draw[name], initial_weights(plain_config, 0, hardened_key)[name])
        for name in seed_draw
    )
    with pytest.raises(ValueError, match="computed where the key is"):
        initial_weights(config, 0)


def _balanced(model, test, key) -> float:
    predicted = model.predict(test, key=key, check_key=False).labels.astype(str)
    truth = test.obs["bulk_labels"].astype(str).to_numpy()
    return float(np.mean([(predicted[truth == c] == c).mean() for c in np.unique(truth)]))


def test_hardened_federation_keeps_plain_fedavg_utility_and_is_useless_without_the_key(
    federated, hardened_key
):
    plain, hardened, test = federated
    assert isinstance(hardened.network, HardenedNetwork)
    assert hardened.config.scheme == "hardened"
    plain_score, hardened_score = _balanced(plain, test, None), _balanced(hardened, test, hardened_key)
    assert hardened_score > 0.4
    # Same seed: the sites trained the same plain network (up to rounding in the basis changes).
    agreement = (
        plain.predict(test, key=None).labels == hardened.predict(test, key=hardened_key).labels
    ).mean()
    assert agreement > 0.97
    assert abs(hardened_score - plain_score) < 0.03
    chance = 1.0 / test.obs["bulk_labels"].nunique()
    wrong = [_balanced(hardened, test, wrong_key(hardened_key, 0, i)) for i in range(4)]
    assert np.mean(wrong) < chance + 0.08
    assert _balanced(hardened, test, None) < chance + 0.08


def test_no_hardened_key_material_in_weights_updates_or_saved_model(
    federated, pbmc_split, hardened_key, tmp_path
):
    _, hardened, _ = federated
    material = key_material(hardened_key, hardened.network)
    secrets = [*hardened_secrets(material), *key_secrets(hardened_key)]
    path = hardened.save(tmp_path / "model")
    blobs = [serialised(hardened.network.state_dict()), serialised(hardened.network)]
    blobs += [file.read_bytes() for file in path.iterdir()]
    # a site's update, as it goes to the aggregator
    trainer = build_site(hardened.spec, hardened.config, pbmc_split[0]["site_1"], "site_1", hardened_key)
    update = trainer.fit(hardened.network.state_dict(), seed=0)
    assert update.key_fingerprint == hardened_key.fingerprint
    blobs.append(serialised({"state": update.state, "n": update.n_obs, **update.metrics}))
    for blob in blobs:
        assert_no_secret(blob, secrets)


def test_rekey_convert_is_exact_and_the_old_key_is_refused(federated, hardened_key):
    _, hardened, test = federated
    new_key = wrong_key(hardened_key, 1, 0)  # a fixed stand-in for FederationKey.generate(scheme="hardened")
    rekeyed = si.tl.rekey(hardened, old_key=hardened_key, new_key=new_key, method="convert", rounds=0)
    assert rekeyed.key_fingerprint == new_key.fingerprint
    before = hardened.predict(test, key=hardened_key).probabilities
    np.testing.assert_allclose(rekeyed.predict(test, key=new_key).probabilities, before, atol=1e-4)
    with pytest.raises(KeyMismatchError):
        rekeyed.predict(test, key=hardened_key)
    # the weights changed: the old key on the new weights is like any wrong key (one key can land a few
    # classes by luck, hence the margin; the audit averages 20)
    assert _balanced(rekeyed, test, hardened_key) < min(0.25, _balanced(hardened, test, hardened_key) - 0.15)
    with pytest.raises(ValueError, match="not the key this model was trained under"):
        si.tl.rekey(hardened, old_key=new_key, new_key=hardened_key, method="convert", rounds=0)
    with pytest.raises(ValueError, match="needs the sites"):
        si.tl.rekey(hardened, old_key=hardened_key, new_key=new_key, method="finetune")


def test_rekey_finetune_learns_under_the_new_key_and_old_updates_are_rejected(
    federated, pbmc_split, hardened_key, scinfl_log
):
    sites, test = pbmc_split
    _, hardened, _ = federated
    new_key = wrong_key(hardened_key, 2, 0)
    rekeyed = si.tl.rekey(
        hardened, sites, old_key=hardened_key, new_key=new_key, copy=True, **{**FAST, "rounds": 12}
    )
    assert set(rekeyed.sites) == set(sites)  # the copies: the shared fixture's sites are left alone
    assert rekeyed.params["rekeyed_from"] == hardened_key.fingerprint
    assert rekeyed.params["init_key_fingerprint"] == hardened_key.fingerprint
    chance = 1.0 / test.obs["bulk_labels"].nunique()
    assert _balanced(hardened, test, new_key) < chance + 0.08  # the old weights under the new key: nothing
    assert _balanced(rekeyed, test, new_key) > chance + 0.2  # relearned (as fast as from scratch: docs)
    # a site still on the old key sends updates under the old fingerprint: the aggregator drops them
    stale = LocalFitResult(
        state=rekeyed.network.state_dict(), n_obs=10, key_fingerprint=hardened_key.fingerprint, metrics={}
    )
    fresh = LocalFitResult(
        state=rekeyed.network.state_dict(), n_obs=10, key_fingerprint=new_key.fingerprint, metrics={}
    )
    _, rejected = aggregate({"old": stale, "new": fresh}, new_key.fingerprint, round_index=0)
    assert rejected == ["old"]
    with pytest.raises(KeyVersionError):
        aggregate({"old": stale}, new_key.fingerprint, round_index=0)


def _row(table, attack, view, metric) -> float:
    row = table[(table.attack == attack) & (table.view == view) & (table.metric == metric)]
    assert len(row) == 1, (attack, view, metric)
    return float(row["mean"].iloc[0])


def test_audit_at_ci_size_passes_the_main_checks_with_working_positive_controls(
    federated, pbmc_split, hardened_key
):
    _, hardened, public = federated
    sites, _ = pbmc_split
    site = sites["site_1"].copy()
    table = si.tl.privacy_audit(
        hardened,
        site,
        key=hardened_key,
        public=public,
        attacks=("utility", "analytic", "inversion"),
        settings={
            "seeds": (0,),
            "n_victims": 12,
            "utility": {"n_wrong_keys": 4},
            "inversion": {"victims": 3, "batches": (8,), "steps": 150},
        },
    )
    chance = _row(table, "accuracy", "chance", "balanced_accuracy")
    assert _row(table, "accuracy", "right key", "balanced_accuracy") > chance + 0.3
    for view in ("wrong key", "no key", "one-bit flip"):
        assert _row(table, "accuracy", view, "balanced_accuracy") < chance + 0.08, view
    # the first layer's gradient: the input is there (the insider test above), but mixed
    assert abs(_row(table, "first layer (dW / db)", "server", "pearson_minus_mean")) < 0.15
    assert _row(table, "first layer (dW / db)", "server", "reidentified") == 0.0
    # gradient inversion: works with the key (positive control), not without
    positive = _row(table, "gradient, 1 cell", "right key (positive control)", "pearson_minus_mean")
    assert positive > 0.3
    for view in ("server (no key)", "server (wrong key)"):
        assert _row(table, "gradient, 1 cell", view, "pearson_minus_mean") < 0.15, view
        assert _row(table, "gradient, 1 cell", view, "reidentified") == 0.0, view
    assert (
        _row(table, "label from last bias (iDLG)", "right key (positive control)", "label_recovered") == 1.0
    )
    assert _row(table, "gradient, 1 cell, joint with key maps", "server", "reidentified") == 0.0
