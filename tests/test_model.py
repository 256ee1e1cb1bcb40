"""FederatedModel's files: a damaged saved model raises ModelFileError naming the file, never a raw
parser error or a silently shorter history."""

from __future__ import annotations

import pytest

import scinfl as si
from helpers import FAST
from scinfl.model import ModelFileError


@pytest.fixture(scope="module")
def saved(pbmc_split, tmp_path_factory):
    sites, _ = pbmc_split
    model = si.tl.train_federated(sites, key=None, **{**FAST, "rounds": 2})
    return model.save(tmp_path_factory.mktemp("model") / "model")


def _damaged(saved, tmp_path, name, damage):
    target = tmp_path / "model"
    target.mkdir()
    for file in saved.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    data = (target / name).read_bytes()
    (target / name).write_bytes(damage(data))
    return target


def test_an_intact_model_loads(saved):
    loaded = si.FederatedModel.load(saved)
    assert len(loaded.history) == 2 * 3  # rounds x sites
    assert loaded.key_fingerprint is None


def test_a_model_saved_before_secure_aggregation_loads_as_trained_in_the_clear(saved, tmp_path):
    """model.json files written before secure aggregation existed have no such setting: those runs sent
    their updates in the clear, and a two-site one must still load (min_cohort=3 would refuse it)."""
    import json

    target = _damaged(saved, tmp_path, "model.json", lambda b: b)
    meta = json.loads((target / "model.json").read_text())
    assert meta["spec"].pop("secure_aggregation") is True
    del meta["spec"]["min_cohort"]
    meta["spec"]["sites"] = meta["spec"]["sites"][:2]
    (target / "model.json").write_text(json.dumps(meta))
    loaded = si.FederatedModel.load(target)
    assert not loaded.spec.secure_aggregation
    assert loaded.spec.sites == ("site_0", "site_1")


def test_weights_are_private_and_checksummed(saved):
    import json
    import stat

    assert stat.S_IMODE((saved / "weights.safetensors").stat().st_mode) == 0o600
    assert set(json.loads((saved / "model.json").read_text())["sha256"]) == {
        "weights.safetensors",
        "history.csv",
    }


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("weights.safetensors", lambda b: b[: len(b) // 2], r"weights\.safetensors is truncated, corrupt"),
        ("history.csv", lambda b: b[: len(b) // 2], r"history\.csv holds \d+ rows; the model wrote 6"),
        ("history.csv", lambda b: b"", r"history\.csv is truncated or corrupt"),
    ],
)
def test_a_damaged_file_of_a_model_saved_without_checksums_is_named(saved, tmp_path, name, damage, message):
    import json

    path = _damaged(saved, tmp_path, name, damage)
    meta = json.loads((path / "model.json").read_text())
    del meta["sha256"]  # as models saved before checksums were written
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=message) as error:
        si.FederatedModel.load(path)
    assert str(path / name) in str(error.value)


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("model.json", lambda b: b[: len(b) // 2], r"model\.json is truncated or corrupt"),
        ("model.json", lambda b: b"{}", r"model\.json is not a scinfl model description \(KeyError"),
        ("model.json", lambda b: b"[1, 2]", r"model\.json is not a scinfl model description"),
        ("weights.safetensors", lambda b: b[: len(b) // 2], r"weights\.safetensors is truncated or altered"),
        ("weights.safetensors", lambda b: b"", r"weights\.safetensors is truncated or altered"),
        # one flipped bit in a weight: the file still parses, only the checksum tells
        ("weights.safetensors", lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], r"safetensors is .* altered"),
        ("history.csv", lambda b: b[: len(b) // 2], r"history\.csv is truncated or altered"),
        ("history.csv", lambda b: b"", r"history\.csv is truncated or altered"),
    ],
)
def test_a_damaged_file_is_named(saved, tmp_path, name, damage, message):
    path = _damaged(saved, tmp_path, name, damage)
    with pytest.raises(ModelFileError, match=message) as error:
        si.FederatedModel.load(path)
    assert str(path / name) in str(error.value)
