"""FederationKey: generation, derivation, fingerprint, storage and the ways a key file can go wrong."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
import stat

import numpy as np
import pytest

import scinfl.key as key_module
from scinfl.key import PASSPHRASE_ENV, FederationKey, KeyFileError

# A fixed secret makes the checks below independent of the random draw and lets them look for the secret
# text where it must not appear.
SECRET = bytes(range(32))
SECRET_HEX = SECRET.hex()


@pytest.fixture
def fixed_key() -> FederationKey:
    return FederationKey(SECRET, scheme="infl")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _saved_payload(key: FederationKey, path) -> dict:
    key.save(path)
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------------------
# generation and fingerprint


def test_generate_draws_32_bytes_from_secrets(monkeypatch):
    drawn: list[bytes] = []
    real = key_module.secrets.token_bytes

    def spy(n):
        drawn.append(real(n))
        return drawn[-1]

    monkeypatch.setattr(key_module.secrets, "token_bytes", spy)
    key = FederationKey.generate()
    assert len(drawn) == 1
    assert len(drawn[0]) == 32
    assert key == FederationKey(drawn[0])
    assert key.scheme == "hardened"  # the default, which the privacy audit supports


def test_generated_key_file_holds_32_secret_bytes(tmp_path):
    payload = _saved_payload(FederationKey.generate(), tmp_path / "k.key")
    assert len(bytes.fromhex(payload["secret"])) == 32


def test_two_generated_keys_differ():
    a, b = FederationKey.generate(), FederationKey.generate()
    assert a != b
    assert a.fingerprint != b.fingerprint
    assert a.derive("x", 32) != b.derive("x", 32)


def test_fingerprint_is_16_hex_and_stable(key):
    fp = key.fingerprint
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert key.fingerprint == fp
    assert FederationKey.generate().fingerprint != fp


def test_equal_keys_have_equal_fingerprint_and_hash(fixed_key):
    twin = FederationKey(bytearray(SECRET), scheme="infl")
    assert twin == fixed_key
    assert twin is not fixed_key
    assert twin.fingerprint == fixed_key.fingerprint
    assert hash(twin) == hash(fixed_key)
    assert len({twin, fixed_key}) == 1


def test_fingerprint_is_not_a_prefix_of_the_secret(fixed_key):
    assert fixed_key.fingerprint not in SECRET_HEX
    assert fixed_key.fingerprint != hashlib.sha256(SECRET).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# derivation


def test_derive_is_deterministic(fixed_key):
    assert fixed_key.derive("coordinates/128x2", 64) == FederationKey(SECRET, scheme="infl").derive(
        "coordinates/128x2", 64
    )
    assert len(fixed_key.derive("a", 100)) == 100
    # SHAKE-256 is an extendable output: a shorter request is a prefix of a longer one for the same purpose.
    assert fixed_key.derive("a", 100)[:16] == fixed_key.derive("a", 16)


@pytest.mark.parametrize(("purpose_a", "purpose_b"), [("a", "b"), ("coordinates/128x2", "coordinates/64x2")])
def test_derive_is_domain_separated_by_purpose(fixed_key, purpose_a, purpose_b):
    a, b = fixed_key.derive(purpose_a, 64), fixed_key.derive(purpose_b, 64)
    assert a != b
    # not merely different somewhere: no shared 8-byte window at the same offset
    assert all(a[i : i + 8] != b[i : i + 8] for i in range(0, 64, 8))


def test_derive_is_domain_separated_by_scheme(fixed_key):
    other = FederationKey(SECRET, scheme="hardened")
    assert other != fixed_key
    assert other.derive("coordinates/128x2", 64) != fixed_key.derive("coordinates/128x2", 64)
    assert other.fingerprint != fixed_key.fingerprint
    assert not np.any(other.coordinates() == fixed_key.coordinates())


@pytest.mark.parametrize("purpose", ["", "a\x00b"])
def test_derive_rejects_bad_purpose(fixed_key, purpose):
    with pytest.raises(ValueError, match="purpose must be a non-empty string without NUL"):
        fixed_key.derive(purpose, 8)


def test_coordinates_shape_dtype_range(key):
    coords = key.coordinates()
    assert coords.shape == (128, 2)
    assert coords.dtype == np.float32
    assert coords.min() >= -1.0
    assert coords.max() < 1.0
    # 256 uniform draws on [-1, 1): mean ~ 0 (sd 0.036), sd ~ 0.577; a biased or collapsed map fails here.
    assert abs(float(coords.mean())) < 0.25
    assert 0.45 < float(coords.std()) < 0.7
    assert len(np.unique(coords)) == coords.size
    np.testing.assert_array_equal(coords, key.coordinates())
    np.testing.assert_array_equal(coords, key.coordinates(128, 2))


def _changes_completely(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert not np.any(a == b), "some coordinates survived the key change"
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert abs(corr) < 0.3


def test_coordinates_change_completely_for_another_key(key):
    _changes_completely(key.coordinates(), FederationKey.generate().coordinates())


@pytest.mark.parametrize("bit", [0, 7, 8, 100, 255])
def test_coordinates_change_completely_for_one_bit_flip(fixed_key, bit):
    flipped = fixed_key.with_bit_flipped(bit)
    assert flipped != fixed_key
    assert flipped.fingerprint != fixed_key.fingerprint
    # exactly that one bit differs: flipping it back restores the key, and the bytes are as expected
    assert flipped.with_bit_flipped(bit) == fixed_key
    expected = bytearray(SECRET)
    expected[bit // 8] ^= 1 << (bit % 8)
    assert flipped == FederationKey(bytes(expected), scheme="infl")
    _changes_completely(fixed_key.coordinates(), flipped.coordinates())


@pytest.mark.parametrize("bit", [-1, 256])
def test_with_bit_flipped_rejects_out_of_range(fixed_key, bit):
    with pytest.raises(ValueError, match=r"bit must be in \[0, 256\)"):
        fixed_key.with_bit_flipped(bit)


# A secret found by search whose derived 53-bit word for coordinate [30, 1] is within 2**-26 of 1: the
# float64 value -1 + 2u < 1 rounds to exactly 1.0 when cast to float32 (about 1 key in 260 000).
EDGE_SECRET = hashlib.sha256(b"scinfl-test-edge/88989").digest()


def test_coordinates_stay_below_one_for_every_key():
    coords = FederationKey(EDGE_SECRET).coordinates()
    assert coords.max() < 1.0


# --------------------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(tmp_path, key):
    path = tmp_path / "consortium.key"
    returned = key.save(path)
    assert returned == path
    loaded = FederationKey.load(path)
    assert loaded == key
    assert loaded.fingerprint == key.fingerprint
    assert loaded.scheme == key.scheme
    np.testing.assert_array_equal(loaded.coordinates(), key.coordinates())
    assert FederationKey.load(str(path), scheme="infl") == key


def test_saved_file_contents(tmp_path, fixed_key):
    payload = _saved_payload(fixed_key, tmp_path / "k.key")
    assert payload == {
        "format": "scinfl-federation-key",
        "version": 1,
        "scheme": "infl",
        "secret": SECRET_HEX,
        "fingerprint": fixed_key.fingerprint,
    }


def test_saved_file_is_owner_only(tmp_path, key):
    path = key.save(tmp_path / "k.key")
    assert _mode(path) == 0o600


def test_overwrite_replaces_a_world_readable_file_with_owner_only(tmp_path, key):
    path = tmp_path / "k.key"
    path.write_text("old, world readable\n")
    path.chmod(0o644)
    assert _mode(path) == 0o644
    key.save(path, overwrite=True)
    assert _mode(path) == 0o600
    assert FederationKey.load(path) == key


def test_overwrite_replaces_a_longer_file_completely(tmp_path, key):
    path = tmp_path / "k.key"
    path.write_text("x" * 10_000)
    key.save(path, overwrite=True)
    assert FederationKey.load(path) == key  # no trailing junk left behind


def test_save_refuses_to_overwrite_and_keeps_the_original(tmp_path, key):
    path = tmp_path / "k.key"
    old = FederationKey.generate()
    old.save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"k\.key already exists; pass overwrite=True"):
        key.save(path)
    assert path.read_bytes() == before
    assert FederationKey.load(path) == old
    assert _mode(path) == 0o600


def test_load_missing_file(tmp_path):
    path = tmp_path / "nowhere.key"
    with pytest.raises(FileNotFoundError, match=r"No key file at .*nowhere\.key"):
        FederationKey.load(path)


def test_key_file_error_is_a_value_error():
    assert issubclass(KeyFileError, ValueError)


def _tamper_one_hex_digit(payload: dict) -> None:
    secret = payload["secret"]
    payload["secret"] = ("1" if secret[0] == "0" else "0") + secret[1:]


def _unknown_scheme(payload: dict) -> None:
    payload["scheme"] = "rsa"


def _short_secret(payload: dict) -> None:
    payload["secret"] = payload["secret"][:62]


def _long_secret(payload: dict) -> None:
    payload["secret"] = payload["secret"] + "00"


def _secret_not_hex(payload: dict) -> None:
    payload["secret"] = "zz" * 32


def _no_secret(payload: dict) -> None:
    del payload["secret"]


def _wrong_format(payload: dict) -> None:
    payload["format"] = "something-else"


def _wrong_version(payload: dict) -> None:
    payload["version"] = 2


def _no_fingerprint(payload: dict) -> None:
    del payload["fingerprint"]


def _other_fingerprint(payload: dict) -> None:
    payload["fingerprint"] = "0" * 16


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_tamper_one_hex_digit, "corrupt: its fingerprint does not match its secret"),
        (_other_fingerprint, "corrupt: its fingerprint does not match its secret"),
        (_no_fingerprint, "corrupt: its fingerprint does not match its secret"),
        (_short_secret, "truncated: 31 secret bytes instead of 32"),
        (_long_secret, "33 secret bytes instead of 32"),
        (_secret_not_hex, "corrupt: its secret is missing or not hex"),
        (_no_secret, "corrupt: its secret is missing or not hex"),
        (_unknown_scheme, "is for scheme 'rsa', which this scinfl does not know"),
        (_wrong_format, "is not a scinfl key file"),
        (_wrong_version, "has format version 2; expected 1"),
    ],
)
def test_load_rejects_a_tampered_file(tmp_path, fixed_key, mutate, message):
    path = tmp_path / "k.key"
    payload = _saved_payload(fixed_key, path)
    mutate(payload)
    path.write_text(json.dumps(payload))
    with pytest.raises(KeyFileError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        FederationKey.load(path)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda text: text[: len(text) // 2], id="truncated"),
        pytest.param(lambda text: text[:-3], id="closing-brace-cut"),
        pytest.param(lambda text: "", id="empty"),
        pytest.param(lambda text: text.replace(":", "=", 1), id="corrupt-json"),
    ],
)
def test_load_rejects_a_truncated_or_corrupt_file(tmp_path, key, damage):
    path = tmp_path / "k.key"
    key.save(path)
    path.write_text(damage(path.read_text()))
    with pytest.raises(KeyFileError, match=re.escape(str(path)) + " is corrupt or truncated"):
        FederationKey.load(path)


def test_load_rejects_binary_garbage(tmp_path):
    path = tmp_path / "k.key"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(KeyFileError, match="corrupt or truncated"):
        FederationKey.load(path)


def test_load_rejects_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "k.key"
    path.write_text("[1, 2, 3]")
    with pytest.raises(KeyFileError, match="is not a scinfl key file"):
        FederationKey.load(path)


def test_load_with_another_expected_scheme(tmp_path, key):
    path = key.save(tmp_path / "k.key")
    with pytest.raises(KeyFileError, match="holds a 'infl' key; a 'other' key was expected"):
        FederationKey.load(path, scheme="other")


def test_load_rejects_non_ascii_fingerprint_as_key_file_error(tmp_path, fixed_key):
    path = tmp_path / "k.key"
    payload = _saved_payload(fixed_key, path)
    payload["fingerprint"] = "é" * 16
    path.write_text(json.dumps(payload))
    with pytest.raises(KeyFileError, match="fingerprint does not match"):
        FederationKey.load(path)


# --------------------------------------------------------------------------------------------------------
# the secret never leaks through repr / str / pickle


@pytest.mark.parametrize("render", [repr, str, "{}".format, "{!r}".format])
def test_repr_and_str_show_fingerprint_not_secret(fixed_key, render):
    text = render(fixed_key)
    assert fixed_key.fingerprint in text
    assert "infl" in text
    assert SECRET_HEX not in text
    assert SECRET_HEX[:16] not in text
    assert repr(SECRET) not in text


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_key_cannot_be_pickled(key, protocol):
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(key, protocol=protocol)


@pytest.mark.parametrize("clone", [copy.copy, copy.deepcopy])
def test_key_cannot_be_copied_through_pickle_machinery(key, clone):
    with pytest.raises(TypeError, match="cannot be pickled"):
        clone(key)


# --------------------------------------------------------------------------------------------------------
# constructor validation


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_constructor_rejects_wrong_length(length):
    with pytest.raises(ValueError, match=f"exactly 32 secret bytes, got {length}"):
        FederationKey(bytes(length))


def test_constructor_rejects_unknown_scheme():
    with pytest.raises(ValueError, match=r"Unknown key scheme 'rsa'; known schemes: infl"):
        FederationKey(SECRET, scheme="rsa")


def test_generate_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="Unknown key scheme 'rsa'"):
        FederationKey.generate(scheme="rsa")


@pytest.mark.parametrize("secret", [SECRET_HEX, list(SECRET), None])
def test_constructor_rejects_non_bytes(secret):
    with pytest.raises(TypeError, match="needs bytes"):
        FederationKey(secret)


def test_key_is_not_equal_to_its_bytes(fixed_key):
    assert fixed_key != SECRET
    assert fixed_key != fixed_key.fingerprint


# --- a key at rest under a passphrase ----------------------------------------------------------------


def test_a_protected_key_file_holds_no_secret_and_needs_its_passphrase(tmp_path, fixed_key, monkeypatch):
    for name in PASSPHRASE_ENV:
        monkeypatch.delenv(name, raising=False)
    path = fixed_key.save(tmp_path / "k.key", passphrase="correct horse battery")
    blob = path.read_bytes()
    for secret in (
        fixed_key._secret,
        fixed_key._secret.hex().encode(),
        fixed_key._secret.hex().upper().encode(),
    ):
        assert secret not in blob
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert fixed_key.fingerprint.encode() in blob  # public: which key this is
    assert FederationKey.load(path, passphrase="correct horse battery") == fixed_key
    with pytest.raises(
        KeyFileError, match="protected by a passphrase: pass passphrase=, or set SCINFL_KEY_PASSPHRASE"
    ):
        FederationKey.load(path)
    with pytest.raises(KeyFileError, match="wrong passphrase, or the file was altered"):
        FederationKey.load(path, passphrase="wrong")
    # for services: the environment, or a file it names (a systemd credential, /dev/fd/N)
    monkeypatch.setenv("SCINFL_KEY_PASSPHRASE", "correct horse battery")
    assert FederationKey.load(path) == fixed_key
    monkeypatch.delenv("SCINFL_KEY_PASSPHRASE")
    (tmp_path / "passphrase").write_text("correct horse battery\n")
    monkeypatch.setenv("SCINFL_KEY_PASSPHRASE_FILE", str(tmp_path / "passphrase"))
    assert FederationKey.load(path) == fixed_key
    with pytest.raises(ValueError, match="empty passphrase"):
        fixed_key.save(tmp_path / "empty.key", passphrase="")


def test_a_protected_key_file_cannot_be_altered_unnoticed(tmp_path, fixed_key):
    import json

    path = fixed_key.save(tmp_path / "k.key", passphrase="pw")
    payload = json.loads(path.read_text())
    other = FederationKey.generate(scheme="infl")
    swapped = {**payload, "scheme": "infl", "fingerprint": other.fingerprint}  # authenticated with the secret
    path.write_text(json.dumps(swapped))
    with pytest.raises(KeyFileError, match="wrong passphrase, or the file was altered"):
        FederationKey.load(path, passphrase="pw")
    payload["protected"]["ciphertext"] = payload["protected"]["ciphertext"][:-2]
    path.write_text(json.dumps(payload))
    with pytest.raises(KeyFileError, match="wrong passphrase, or the file was altered|corrupt"):
        FederationKey.load(path, passphrase="pw")


def test_key_command_line_verbs(tmp_path, monkeypatch, capsys):
    from scinfl import cli

    monkeypatch.setenv("SCINFL_KEY_PASSPHRASE", "from the environment")
    path = tmp_path / "consortium.key"
    assert cli.main(["key", "generate", str(path), "--protect"]) == 0
    key = FederationKey.load(path)
    assert key.scheme == "hardened"
    assert key._secret.hex() not in path.read_text()
    capsys.readouterr()
    assert cli.main(["key", "fingerprint", str(path)]) == 0
    assert capsys.readouterr().out.strip() == key.fingerprint
    plain = tmp_path / "plain.key"
    assert cli.main(["key", "generate", str(plain), "--scheme", "infl"]) == 0
    assert cli.main(["key", "protect", str(plain)]) == 0
    assert "protected" in plain.read_text()
    assert FederationKey.load(plain).scheme == "infl"
    assert cli.main(["key", "rotate", str(path), str(tmp_path / "next.key")]) == 0
    rotated = FederationKey.load(tmp_path / "next.key")
    assert rotated.scheme == key.scheme
    assert rotated != key
    assert "scinfl.tl.rekey" in capsys.readouterr().out
    assert cli.main(["key", "fingerprint", str(tmp_path / "missing.key")]) == 2
    assert "No key file" in capsys.readouterr().err
