"""Keyed modules: golden tests against the paper's formulas, computed independently here."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import torch
from torch import nn

import scinfl as si
from helpers import assert_no_secret, key_secrets, serialised
from scinfl.nn import CoordinateKeyEncoder, KeyedLinear, KeyedNetwork, keyify, use_key
from scinfl.train import key_material


@pytest.fixture(scope="module")
def cells() -> torch.Tensor:
    """16 real PBMC profiles (log-normalised, 765 genes)."""
    adata = sc.datasets.pbmc68k_reduced()
    return torch.from_numpy(adata.raw.X[:16].toarray().astype(np.float32))


def _coords(key: si.FederationKey) -> torch.Tensor:
    return torch.from_numpy(key.coordinates())


def _encode_by_hand(encoder: CoordinateKeyEncoder, coords: torch.Tensor) -> torch.Tensor:
    """Linear - SiLU - Linear - SiLU - LayerNorm per point, then the mean over points."""
    lin1, _, lin2, _, norm = encoder.point_mlp
    h = coords @ lin1.weight.T + lin1.bias
    h = h * torch.sigmoid(h)
    h = h @ lin2.weight.T + lin2.bias
    h = h * torch.sigmoid(h)
    mu = h.mean(dim=1, keepdim=True)
    var = ((h - mu) ** 2).mean(dim=1, keepdim=True)
    h = (h - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    return h.mean(dim=0)


def _keyed_linear_by_hand(
    keyed: KeyedNetwork, layer: KeyedLinear, k: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """W_eff = W (1 + s tanh a) per row, b_eff = b + s tanh c, then FiLM y (1 + s tanh g) + s tanh beta."""
    s = keyed.strength
    rows = keyed.head_rows(layer)
    w_heads, b_heads = keyed.key_heads.weight, keyed.key_heads.bias

    def head(name):
        return k @ w_heads[rows[name]].T + b_heads[rows[name]]

    w_eff = layer.weight * (1 + s * torch.tanh(head("a")))[:, None]
    b_eff = layer.bias + s * torch.tanh(head("c"))
    y = x @ w_eff.T + b_eff
    if layer.film:
        y = y * (1 + s * torch.tanh(head("g"))) + s * torch.tanh(head("beta"))
    return y


def test_key_encoder_matches_formula(key):
    torch.manual_seed(0)
    encoder = CoordinateKeyEncoder(coordinate_dim=2, hidden=64, key_dim=16)
    coords = _coords(key)
    assert coords.shape == (128, 2)
    torch.testing.assert_close(encoder(coords), _encode_by_hand(encoder, coords), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("film", [True, False])
@pytest.mark.parametrize("strength", [0.5, 1.0, 5.0])
def test_keyed_linear_matches_formula(cells, key, film, strength):
    torch.manual_seed(1)
    keyed = keyify(nn.Sequential(nn.Linear(765, 32)), strength=strength, film=lambda *_: film)
    layer = keyed.network[0]
    assert isinstance(layer, KeyedLinear)
    assert layer.film is film
    # heads initialised small; make them large so that every term of the formula matters
    with torch.no_grad():
        keyed.key_heads.weight.normal_(0, 1.0)
    coords = _coords(key)
    k = _encode_by_hand(keyed.key_encoder, coords)
    expected = _keyed_linear_by_hand(keyed, layer, k, cells)
    with torch.no_grad():
        got = keyed(cells, key=coords)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the modulation really changes the output (the test would pass vacuously otherwise)
    assert (got - nn.functional.linear(cells, layer.weight, layer.bias)).abs().max() > 1e-2


def test_multilayer_network_matches_formula_layer_by_layer(cells, key):
    """Each layer reads its own rows of the fused key maps (offsets and FiLM positions are right)."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(765, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3))
    keyed = keyify(net, strength=2.0)
    with torch.no_grad():
        keyed.key_heads.weight.normal_(0, 1.0)
    layers = keyed.keyed_layers()
    assert [layer.film for layer in layers] == [True, True, False]
    coords = _coords(key)
    k = _encode_by_hand(keyed.key_encoder, coords)
    h = torch.relu(_keyed_linear_by_hand(keyed, layers[0], k, cells))
    h = torch.relu(_keyed_linear_by_hand(keyed, layers[1], k, h))
    expected = _keyed_linear_by_hand(keyed, layers[2], k, h)
    with torch.no_grad():
        torch.testing.assert_close(keyed(cells, key=coords), expected, rtol=1e-4, atol=1e-5)
    # every row of the fused map belongs to exactly one (layer, head)
    covered = torch.zeros(keyed.key_heads.out_features, dtype=torch.int64)
    for layer in layers:
        for rows in keyed.head_rows(layer).values():
            covered[rows] += 1
    assert (covered == 1).all()


def test_gradients_match_materialised_weights(cells, key):
    """Scaling the output equals scaling W's rows: the same gradients for W and the key heads."""
    torch.manual_seed(2)
    keyed = keyify(nn.Sequential(nn.Linear(765, 8)), strength=2.0, film=lambda *_: False)
    layer = keyed.network[0]
    coords = _coords(key)
    keyed(cells, key=coords).square().sum().backward()
    ours = (layer.weight.grad.clone(), keyed.key_heads.weight.grad.clone())
    keyed.zero_grad()
    k = keyed.key_encoder(coords)
    _keyed_linear_by_hand(keyed, layer, k, cells).square().sum().backward()
    torch.testing.assert_close(ours[0], layer.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[1], keyed.key_heads.weight.grad, rtol=1e-4, atol=1e-4)


def test_keyify_copies_weights_and_leaves_original(cells):
    torch.manual_seed(3)
    plain = si.nn.ResidualMLPClassifier(765, 10, hidden=32).eval()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    keyed = keyify(plain).eval()
    assert all(type(m) is not KeyedLinear for m in plain.modules())  # the original is untouched
    for name, tensor in before.items():
        torch.testing.assert_close(plain.state_dict()[name], tensor)
    keyed_layers = [m for m in keyed.network.modules() if isinstance(m, KeyedLinear)]
    assert len(keyed_layers) == 7  # embedding, 2 x 2 in blocks, narrowing, head
    # FiLM on every keyed layer but the output head
    assert [layer.film for layer in keyed_layers] == [True] * 6 + [False]
    # without a key, the keyed network computes exactly what the original does
    with torch.no_grad():
        torch.testing.assert_close(keyed(cells), plain(cells))


def test_keyify_select_and_errors():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    keyed = keyify(net, select=lambda name, _: name == "2")
    assert type(keyed.network[0]) is nn.Linear
    assert isinstance(keyed.network[2], KeyedLinear)
    with pytest.raises(ValueError, match="no nn.Linear"):
        keyify(nn.Sequential(nn.ReLU()))


def test_keys_change_outputs_and_context_restores(cells, key):
    torch.manual_seed(4)
    keyed = keyify(si.nn.ResidualMLPClassifier(765, 10, hidden=32)).eval()
    nn.init.normal_(keyed.key_heads.weight, 0, 1.0)
    with torch.no_grad():
        right = keyed(cells, key=_coords(key))
        flipped = keyed(cells, key=_coords(key.with_bit_flipped(0)))
        none = keyed(cells)
        with use_key(_coords(key)):
            inside = keyed(cells)
            with use_key(None):
                nested_none = keyed(cells)
            assert si.nn.active_modulation() is None  # the modulation exists only during a forward pass
        after = keyed(cells)
    torch.testing.assert_close(inside, right)
    torch.testing.assert_close(nested_none, none)
    torch.testing.assert_close(after, none)
    assert (right - flipped).abs().max() > 1e-4
    assert (right - none).abs().max() > 1e-2


def test_use_key_rejects_malformed_coordinates():
    with pytest.raises(ValueError, match="shape"), use_key(torch.zeros(128)):
        pass
    encoder = CoordinateKeyEncoder(coordinate_dim=2)
    with pytest.raises(ValueError, match="another scheme"):
        encoder(torch.zeros(128, 3))


def test_no_key_material_in_state_dict_or_module(cells, key):
    torch.manual_seed(5)
    keyed = keyify(si.nn.ResidualMLPClassifier(765, 10, hidden=32))
    with use_key(_coords(key)):
        keyed(cells).sum().backward()  # a full keyed forward/backward leaves nothing behind
    assert not any("coord" in name for name in keyed.state_dict())
    for blob in (serialised(keyed.state_dict()), serialised(keyed)):
        assert_no_secret(blob, key_secrets(key))
    assert isinstance(keyed, KeyedNetwork)


def test_key_material_follows_the_networks_public_structure(cells, key):
    """What a key gives a keyed network: its coordinates, as many as the network's structure says."""
    keyed = keyify(nn.Sequential(nn.Linear(765, 8)), n_key_points=64, coordinate_dim=3)
    assert keyed.n_key_points == 64
    coords = key_material(key, keyed)
    assert coords.shape == (64, 3)
    np.testing.assert_array_equal(coords.numpy(), key.coordinates(64, 3))
    assert not np.array_equal(
        key_material(key, keyify(nn.Sequential(nn.Linear(765, 8)))).numpy()[:64, :2], coords[:, :2]
    )
    with torch.no_grad():
        assert keyed(cells, key=coords).shape == (16, 8)
    assert key_material(None, keyed) is None
    with pytest.raises(ValueError, match=r"trained without a key \(plain FedAvg\); pass key=None"):
        key_material(key, nn.Sequential(nn.Linear(765, 8)))
    hardened = si.FederationKey(bytes(range(32)), scheme="hardened")
    with pytest.raises(ValueError, match="The key is for scheme 'hardened', but the model uses 'infl'"):
        key_material(hardened, keyed)
    with pytest.raises(TypeError, match="key must be a scinfl.FederationKey or None, got ndarray"):
        key_material(key.coordinates(), keyed)
