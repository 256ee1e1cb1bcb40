"""The federation's secret key: generation, derivation, fingerprint, storage.

Every secret quantity a model uses (for ``scheme="infl"``: the 128 coordinates that condition the keyed
modules; for ``scheme="hardened"``: its mixing, permutations and signs) is derived from the 32 key bytes through SHAKE-256 with a domain-separation label, so that two
uses of the key never share bits and nothing is ever derived from a small integer seed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Final

import numpy as np

__all__ = ["DEFAULT_SCHEME", "PASSPHRASE_ENV", "SCHEMES", "FederationKey", "KeyFileError", "as_key"]

SCHEMES: Final = ("infl", "hardened")
# The hardened scheme is the default: the privacy audit (docs/privacy.md) measures that it closes the
# paper scheme's leaks; "infl" remains for reproducing the paper.
DEFAULT_SCHEME: Final = "hardened"
KEY_BYTES: Final = 32
_FILE_FORMAT: Final = "scinfl-federation-key"
_FILE_VERSION: Final = 1
_DOMAIN: Final = b"scinfl/v1/"
# Where a service gives the passphrase of a protected key file: the passphrase itself, or a file holding
# it (a systemd credential, /dev/fd/N). Never a command-line argument: process lists are readable by all.
PASSPHRASE_ENV: Final = ("SCINFL_KEY_PASSPHRASE", "SCINFL_KEY_PASSPHRASE_FILE")
_SCRYPT: Final = {"n": 2**15, "r": 8, "p": 1}  # ~64 MiB and ~0.1 s per attempt


class KeyFileError(ValueError):
    """A key file that cannot be read: missing fields, truncated, corrupt or of an unknown scheme."""


class FederationKey:
    """A consortium's 256-bit secret.

    Only the authorised sites hold it; the server never does. The key itself is never stored on a model,
    written by :meth:`scinfl.FederatedModel.save`, logged, or sent to the aggregator: what travels is its
    :attr:`fingerprint`, a short hash that names the key version.

    Parameters
    ----------
    secret
        Exactly 32 bytes. Use :meth:`generate` rather than choosing them.
    scheme
        The keyed-module scheme the key conditions. ``"hardened"`` (the default) is scinfl's scheme,
        which closes the paper scheme's measured leaks; ``"infl"`` reproduces the paper's modules (see
        ``docs/privacy.md``).
    """

    __slots__ = ("_scheme", "_secret")

    def __init__(self, secret: bytes, *, scheme: str = DEFAULT_SCHEME) -> None:
        if not isinstance(secret, bytes | bytearray):
            raise TypeError(f"A FederationKey needs bytes, got {type(secret).__name__}.")
        if len(secret) != KEY_BYTES:
            raise ValueError(f"A FederationKey needs exactly {KEY_BYTES} secret bytes, got {len(secret)}.")
        if scheme not in SCHEMES:
            raise ValueError(f"Unknown key scheme {scheme!r}; known schemes: {', '.join(SCHEMES)}.")
        self._secret = bytes(secret)
        self._scheme = scheme

    @classmethod
    def generate(cls, *, scheme: str = DEFAULT_SCHEME) -> FederationKey:
        """Draw a new key from the operating system's cryptographic random source (:mod:`secrets`)."""
        return cls(secrets.token_bytes(KEY_BYTES), scheme=scheme)

    @property
    def scheme(self) -> str:
        """The keyed-module scheme this key is for."""
        return self._scheme

    @property
    def fingerprint(self) -> str:
        """A 16-hex-digit tag of the key version, safe to share and to store with a model."""
        digest = hashlib.sha256(_DOMAIN + b"fingerprint/" + self._scheme.encode() + b"\x00" + self._secret)
        return digest.hexdigest()[:16]

    def derive(self, purpose: str, n_bytes: int) -> bytes:
        """Derive ``n_bytes`` pseudo-random bytes for one named purpose.

        SHAKE-256 over a domain label (package version, scheme, purpose) and the secret: outputs for
        different purposes are independent, and the same key always gives the same bytes.
        """
        if not purpose or "\x00" in purpose:
            raise ValueError("purpose must be a non-empty string without NUL characters.")
        label = _DOMAIN + self._scheme.encode() + b"/" + purpose.encode() + b"\x00"
        return hashlib.shake_256(label + self._secret).digest(n_bytes)

    def uniform(
        self, purpose: str, shape: tuple[int, ...], *, low: float = -1.0, high: float = 1.0
    ) -> np.ndarray:
        """Derived numbers, uniform in ``[low, high)``, as float32.

        Each value takes 24 derived bits, the float32 mantissa, so that no value rounds up to ``high``.
        """
        n = int(np.prod(shape))
        words = np.frombuffer(self.derive(purpose, 4 * n), dtype="<u4") >> np.uint32(8)
        unit = words.astype(np.float64) / float(2**24)
        return (low + (high - low) * unit).reshape(shape).astype(np.float32)

    def coordinates(self, n_points: int = 128, dim: int = 2) -> np.ndarray:
        """The secret coordinates that condition the ``"infl"`` keyed modules: ``(n_points, dim)`` in [-1, 1)."""
        return self.uniform(f"coordinates/{n_points}x{dim}", (n_points, dim))

    def with_bit_flipped(self, bit: int) -> FederationKey:
        """A copy with one secret bit flipped (for the privacy audit: a near-miss key)."""
        if not 0 <= bit < 8 * KEY_BYTES:
            raise ValueError(f"bit must be in [0, {8 * KEY_BYTES}), got {bit}.")
        flipped = bytearray(self._secret)
        flipped[bit // 8] ^= 1 << (bit % 8)
        return FederationKey(bytes(flipped), scheme=self._scheme)

    def save(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, passphrase: str | bytes | None = None
    ) -> Path:
        """Write the key to ``path``, readable by the owner only (mode 0600).

        Refuses to replace an existing file unless ``overwrite=True``. The file carries the fingerprint so
        that :meth:`load` detects corruption. With ``passphrase`` the secret is stored encrypted (AES-256-GCM
        under a key stretched from the passphrase by scrypt, n=2^15, r=8, p=1, with a random salt; the
        scheme and fingerprint are authenticated with it), so a copied file is useless without the
        passphrase.
        """
        path = Path(path)
        payload = {
            "format": _FILE_FORMAT,
            "version": _FILE_VERSION,
            "scheme": self._scheme,
            "fingerprint": self.fingerprint,
        }
        if passphrase is None:
            payload["secret"] = self._secret.hex()
        else:
            payload["protected"] = _encrypt(self._secret, _passphrase_bytes(passphrase), _header(payload))
        data = (json.dumps(payload, indent=1) + "\n").encode()
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"Key file {path} already exists; pass overwrite=True to replace it "
                "(a replaced key cannot be recovered)."
            )
        # Written to a new 0600 file first, then moved into place: the secret is never readable by others,
        # not even for a moment when replacing a file that had wider permissions.
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails, rather than overwrites, if the file appeared meanwhile
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        scheme: str | None = None,
        passphrase: str | bytes | None = None,
    ) -> FederationKey:
        """Read a key written by :meth:`save`.

        Parameters
        ----------
        path
            The key file.
        scheme
            If given, the scheme the caller expects; a key of another scheme raises :class:`KeyFileError`.
        passphrase
            For a protected key file: its passphrase. Default: the environment variable
            ``SCINFL_KEY_PASSPHRASE``, else the file named by ``SCINFL_KEY_PASSPHRASE_FILE`` (for services:
            a SuperNode reads its key file this way).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No key file at {path}.")
        try:
            payload = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise KeyFileError(f"Key file {path} is corrupt or truncated (not a scinfl key file).") from err
        if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
            raise KeyFileError(f"{path} is not a scinfl key file.")
        if payload.get("version") != _FILE_VERSION:
            raise KeyFileError(f"Key file {path} has format version {payload.get('version')!r}; expected 1.")
        file_scheme = payload.get("scheme")
        if file_scheme not in SCHEMES:
            raise KeyFileError(
                f"Key file {path} is for scheme {file_scheme!r}, which this scinfl does not know."
            )
        if scheme is not None and file_scheme != scheme:
            raise KeyFileError(f"Key file {path} holds a {file_scheme!r} key; a {scheme!r} key was expected.")
        if "protected" in payload:
            secret = _decrypt(path, payload, passphrase)
        else:
            try:
                secret = bytes.fromhex(payload["secret"])
            except (KeyError, TypeError, ValueError) as err:
                raise KeyFileError(f"Key file {path} is corrupt: its secret is missing or not hex.") from err
        if len(secret) != KEY_BYTES:
            raise KeyFileError(
                f"Key file {path} is truncated: {len(secret)} secret bytes instead of {KEY_BYTES}."
            )
        key = cls(secret, scheme=file_scheme)
        stored = str(payload.get("fingerprint", "")).encode("utf-8", "replace")
        if not hmac.compare_digest(key.fingerprint.encode(), stored):
            raise KeyFileError(f"Key file {path} is corrupt: its fingerprint does not match its secret.")
        return key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FederationKey):
            return NotImplemented
        return self._scheme == other._scheme and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"FederationKey(scheme={self._scheme!r}, fingerprint={self.fingerprint!r})"

    def __reduce__(self):
        # Pickling would silently copy the secret into caches, multiprocessing payloads or saved objects.
        raise TypeError("A FederationKey cannot be pickled; pass its file path and FederationKey.load it.")


def _header(payload: dict) -> bytes:
    """What the encryption authenticates besides the secret: a protected file's scheme and fingerprint
    cannot be swapped."""
    return json.dumps(
        {k: payload[k] for k in ("format", "version", "scheme", "fingerprint")}, sort_keys=True
    ).encode()


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    data = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
    if not data:
        raise ValueError("An empty passphrase protects nothing.")
    return data


def _stretch(passphrase: bytes, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, **_SCRYPT).derive(passphrase)


def _encrypt(secret: bytes, passphrase: bytes, header: bytes) -> dict:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    ciphertext = AESGCM(_stretch(passphrase, salt)).encrypt(nonce, secret, header)
    return {
        "kdf": "scrypt",
        **_SCRYPT,
        "salt": salt.hex(),
        "cipher": "aes-256-gcm",
        "nonce": nonce.hex(),
        "ciphertext": ciphertext.hex(),
    }


def _environment_passphrase() -> bytes | None:
    value, file = (os.environ.get(name) for name in PASSPHRASE_ENV)
    if value:
        return value.encode()
    if file:
        return Path(file).read_bytes().rstrip(b"\r\n")
    return None


def _decrypt(path: Path, payload: dict, passphrase: str | bytes | None) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    given = _passphrase_bytes(passphrase) if passphrase is not None else _environment_passphrase()
    if given is None:
        raise KeyFileError(
            f"Key file {path} is protected by a passphrase: pass passphrase=, or set {PASSPHRASE_ENV[0]} (or "
            f"{PASSPHRASE_ENV[1]}, the path of a file holding it) in the environment of the process that loads it."
        )
    protected = payload["protected"]
    try:
        if protected.get("kdf") != "scrypt" or protected.get("cipher") != "aes-256-gcm":
            raise KeyFileError(f"Key file {path} is protected by an unknown method.")
        salt, nonce = bytes.fromhex(protected["salt"]), bytes.fromhex(protected["nonce"])
        ciphertext = bytes.fromhex(protected["ciphertext"])
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        stretched = Scrypt(
            salt=salt, length=32, n=int(protected["n"]), r=int(protected["r"]), p=int(protected["p"])
        )
        return AESGCM(stretched.derive(given)).decrypt(nonce, ciphertext, _header(payload))
    except InvalidTag:
        raise KeyFileError(
            f"Key file {path}: wrong passphrase, or the file was altered (its authentication failed)."
        ) from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, KeyFileError):
            raise
        raise KeyFileError(f"Key file {path} is corrupt: its protected secret is incomplete.") from err


def as_key(key: FederationKey | str | os.PathLike[str] | None, *, name: str = "key") -> FederationKey | None:
    """``key`` as the functions taking a key want it: a :class:`FederationKey`, None (a plain model), or the
    path of a key file written by :meth:`FederationKey.save`, which is loaded."""
    if key is None or isinstance(key, FederationKey):
        return key
    if isinstance(key, str | os.PathLike):
        if not Path(key).is_file():
            raise FileNotFoundError(
                f"{name}={str(key)!r} names no key file. Pass a scinfl.FederationKey "
                "(FederationKey.generate(), or FederationKey.load(path) of a saved key) or the path of a saved "
                "key file."
            )
        return FederationKey.load(key)
    raise TypeError(
        f"{name} must be a scinfl.FederationKey, the path of a key file, or None (a plain model); got "
        f"{type(key).__name__}. Load a saved key with scinfl.FederationKey.load(path)."
    )
