"""Secure aggregation: the server learns the sum of a round's updates, never one site's.

Pairwise masking (Bonawitz et al., CCS 2017, the honest-but-curious variant without double masking):

1. When a site joins a run it draws a fresh X25519 key pair (:class:`MaskingKey`) and publishes the public
   half with its description. The private half stays at the site for the run (in process; in a Flower
   deployment, in the SuperNode's node-local run context). It is not the federation key and is never
   derived from it, so a site, an insider that holds the federation key, cannot compute another pair's
   masks: it learns only what the sum and its own update tell it.
2. A secure round names its cohort (the sites whose updates are summed, at least ``min_cohort``) with
   their public keys and an attempt number. Each cohort site encodes its update as integers modulo
   2^64: for every entry of the global state, ``round(n * x * 2^24)`` (``n``: its training cells), and
   for every tensor, ``n`` if it trains that tensor and 0 if not (a mosaic site trains only its
   modalities' modules). It adds, for every other cohort site, a mask expanded by ChaCha20 from a seed
   agreed by the pair (X25519, then HKDF-SHA256 over the run, the round, the attempt and the cohort):
   added by the site that comes first in the roster, subtracted by the other. ``cryptography``'s
   primitives (OpenSSL) do all of it.
3. The server adds the masked vectors modulo 2^64: every mask cancels exactly, and what is left is the
   fixed-point sum, which it divides per tensor by the summed cell counts (FedAvg). The error is at most
   ``cohort size * 2^-25 / cells`` per entry, far below float32's resolution for weights near 1.

A site that fails mid-round leaves masks that do not cancel: the round loop retries the round with the
sites that answered (new attempt, new masks, new local shuffles), or stops if fewer than ``min_cohort``
remain. What that retry allows (a server that keeps the late update of a site it declared dropped) is
written in ``docs/privacy.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import Tensor

from ..train.settings import settings_from
from .fedavg import weighted_mean
from .identity import KeyPair

__all__ = [
    "FRACTION_BITS",
    "MIN_COHORT",
    "MaskedUpdate",
    "MaskingKey",
    "SecureAggregation",
    "SecureRound",
    "decode_wide",
    "encode_wide",
    "mask_integers",
    "mask_update",
    "sum_integers",
    "unmask_sum",
]

# The fewest sites a secure sum may hold by default: of two, each can subtract its own update from the sum
# and learn the other's.
MIN_COHORT = 3
FRACTION_BITS = 24  # fixed point: values are carried as round(value * 2^24) in int64, modulo 2^64
_SCALE = float(2**FRACTION_BITS)
_LIMIT = float(2 ** (63 - FRACTION_BITS))  # |sum of n * x| must stay below this to decode


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation's settings (``secure_aggregation=`` of ``tl.train_federated`` and ``pp``'s
    functions: ``True`` for these defaults, or a dict of them).

    Attributes
    ----------
    min_cohort
        The fewest sites a round (or a statistic) sums; fewer is an error, never a smaller sum. With two
        sites the server still sees only their sum, but each site can subtract its own update and learn
        the other's: a two-site federation passes ``{"min_cohort": 2}`` to accept that.
    """

    min_cohort: int = MIN_COHORT  # (checked where it is used: RunSpec, StatisticsSpec)

    @classmethod
    def from_option(cls, value: bool | Mapping[str, Any] | SecureAggregation) -> SecureAggregation | None:
        """``secure_aggregation=`` as settings: None for ``False`` (updates in the clear)."""
        if isinstance(value, bool):
            return cls() if value else None
        return settings_from(cls, value, "secure_aggregation", "{'min_cohort': 2}")


class MaskingKey(KeyPair):
    """A site's X25519 key pair for one run's pairwise masks (see the module docstring)."""

    _kind = X25519PrivateKey

    def pair_seed(self, peer_public: bytes, context: bytes) -> bytes:
        """The 32-byte seed this site shares with the holder of ``peer_public`` for ``context``."""
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared)


@dataclass(frozen=True)
class SecureRound:
    """What a cohort site needs to mask its update: the round, the attempt and the cohort (roster order)
    with each member's public masking key and that member's signature of it
    (:func:`scinfl.federation.identity.check_cohort` checks them); ``run`` identifies the run (a digest of
    its spec)."""

    round_index: int
    attempt: int
    cohort: tuple[str, ...]
    public_keys: Mapping[str, bytes]
    run: str
    signatures: Mapping[str, bytes] = field(default_factory=dict)  # each member's, over its key (identity.py)

    def context(self) -> bytes:
        """What the pair seeds are bound to: a mask is never reused across runs, rounds, attempts or
        cohorts."""
        text = f"scinfl-secagg/v1/{self.run}/{self.round_index}/{self.attempt}/{','.join(self.cohort)}"
        return text.encode()


@dataclass
class MaskedUpdate:
    """A site's update as the server receives it under secure aggregation: one masked vector of integers
    modulo 2^64 (uniformly random on its own), the training cell count (public, as the FedAvg weight),
    the key's fingerprint and the site's fit metrics (scalars). ``finite`` is False when the site's own
    update was not finite (it then sends no vector)."""

    masked: np.ndarray | None
    n_obs: int
    key_fingerprint: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    finite: bool = True

    @property
    def state(self) -> dict:  # the round loop's finiteness check reads a state; a masked one has none
        return {}


def run_digest(spec_json: str) -> str:
    """A short identifier of a run spec, for :attr:`SecureRound.run`."""
    return hashlib.sha256(spec_json.encode()).hexdigest()[:32]


def _layout(base: Mapping[str, Tensor]) -> tuple[list[str], list[int]]:
    names = list(base)
    return names, [int(base[name].numel()) for name in names]


def _add_mask(vector: np.ndarray, seed: bytes, sign: int, zeros: bytes, stream: bytearray) -> None:
    """Add (``sign`` 1) or subtract (-1) the mask expanded from ``seed``: ``len(vector)`` uniformly random
    64-bit integers, the ChaCha20 keystream (written into ``stream``, a buffer of ``zeros``' length)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    encryptor.update_into(zeros, stream)
    mask = np.frombuffer(stream, dtype="<u8", count=len(vector))
    if sign > 0:
        vector += mask
    else:
        vector -= mask


def mask_update(
    state: Mapping[str, Tensor],
    n_obs: int,
    base: Mapping[str, Tensor],
    secure: SecureRound,
    site: str,
    masking_key: MaskingKey,
) -> np.ndarray:
    """``site``'s masked vector: its fixed-point ``n * update`` and per-tensor ``n`` (see the module
    docstring) plus its pairwise masks with the rest of ``secure.cohort``.

    ``state`` holds the entries the site trained (a subset of ``base``, the global state it received).
    """
    names, sizes = _layout(base)
    n_values = sum(sizes)
    values = np.zeros(n_values + len(names), dtype=np.float64)
    offset = 0
    for index, (name, size) in enumerate(zip(names, sizes, strict=True)):
        if name in state:
            values[offset : offset + size] = state[name].detach().cpu().reshape(-1).to(torch.float64).numpy()
            values[n_values + index] = 1.0
        offset += size
    largest = max(float(values.max()), -float(values.min()))  # without a temporary of |values|
    worst = largest * n_obs * len(secure.cohort)
    if worst >= _LIMIT:
        raise OverflowError(
            f"Site {site!r}: its update holds values too large for secure aggregation's fixed point "
            f"(|cells * value| up to {worst / len(secure.cohort):.3g}, limit {_LIMIT / len(secure.cohort):.3g}); "
            "scale the inputs, or pass secure_aggregation=False."
        )
    # n * value * 2^24 in one rounding (n * 2^24 is exact in float64), in place: the vector is large
    np.multiply(values, float(n_obs) * _SCALE, out=values)
    np.rint(values, out=values)
    return mask_integers(values.astype(np.int64).view(np.uint64), secure, site, masking_key)


def mask_integers(
    vector: np.ndarray, secure: SecureRound, site: str, masking_key: MaskingKey, request: bytes = b""
) -> np.ndarray:
    """``vector`` (uint64, modified in place) plus ``site``'s pairwise masks with the rest of
    ``secure.cohort``, modulo 2^64: the one masking step of updates and statistics. ``request`` (a digest
    of what is asked) joins the masks' context: two requests never share masks, whatever round the server
    names."""
    if site not in secure.cohort:
        raise ValueError(f"Site {site!r} is not in the round's cohort ({', '.join(secure.cohort)}).")
    if len(secure.cohort) < 2:  # a server that names a cohort of one would receive the values themselves
        raise ValueError(
            f"Site {site!r} refuses to mask its values for a cohort of one: that sum is the values."
        )
    context = secure.context() + (b"/" + request if request else b"")
    zeros, stream = bytes(8 * len(vector)), bytearray(8 * len(vector))
    position = secure.cohort.index(site)
    for peer in secure.cohort:
        if peer == site:
            continue
        # The pair's two sites add and subtract the same mask: it cancels in the sum (mod 2^64).
        sign = 1 if position < secure.cohort.index(peer) else -1
        _add_mask(vector, masking_key.pair_seed(secure.public_keys[peer], context), sign, zeros, stream)
    return vector


def sum_integers(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The sum modulo 2^64 of masked vectors of one length: the masks cancel, the encoded sum is left."""
    total = np.zeros(len(vectors[0]), dtype=np.uint64)
    for vector in vectors:
        if vector.shape != total.shape:
            raise ValueError(f"Masked vectors of {vector.shape} and {total.shape} entries cannot be summed.")
        total += vector
    return total


# Statistics (federated preprocessing) span many orders of magnitude: a sum of squared normalised counts over
# a million cells, and a rare gene's sum near 1e-3 that must keep 1e-5 relative precision. They are carried in
# two 64-bit words each, summed and masked independently (no carries): a coarse word in units of 2^16 and a
# fine one in units of 2^-40, so the range is ~2^78 and the resolution 2^-40.
_COARSE = float(2**16)
_FINE = float(2**40)


def encode_wide(values: np.ndarray) -> np.ndarray:
    """Float64 ``values`` as ``2 * len(values)`` uint64 words (coarse, then fine) for :func:`mask_integers`."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise ValueError("Only finite values can be encoded for a secure sum.")
    if len(values) and np.abs(values).max() >= 2.0**76:
        raise OverflowError(
            f"|value| up to {np.abs(values).max():.3g} exceeds the secure sum's range (2^76)."
        )
    coarse = np.rint(values / _COARSE)
    fine = np.rint((values - coarse * _COARSE) * _FINE)  # |fine| <= 2^55: 2^8 sites sum without overflow
    return np.concatenate([coarse.astype(np.int64), fine.astype(np.int64)]).view(np.uint64)


def decode_wide(total: np.ndarray) -> np.ndarray:
    """The float64 sum that :func:`sum_integers` of :func:`encode_wide` vectors encodes."""
    words = np.asarray(total, dtype=np.uint64).view(np.int64)
    half = len(words) // 2
    return words[:half].astype(np.float64) * _COARSE + words[half:].astype(np.float64) / _FINE


def unmask_sum(updates: Sequence[MaskedUpdate], base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """FedAvg from the cohort's masked vectors: their sum modulo 2^64, decoded into each tensor's sum of
    ``n * value`` and its holders' summed cell counts, then averaged by the one rule,
    :func:`~scinfl.federation.weighted_mean` (a tensor no site trained keeps its value in ``base``;
    integer entries take the rounded weighted mean, as in the clear)."""
    if not updates:
        raise ValueError("Secure aggregation needs at least one masked update.")
    names, sizes = _layout(base)
    expected = (sum(sizes) + len(names),)
    for update in updates:
        if update.masked is None or update.masked.shape != expected:
            raise ValueError(
                f"A masked update has {None if update.masked is None else update.masked.shape} entries, "
                f"the global model {expected}: the sites run different models."
            )
    total = sum_integers([update.masked for update in updates])
    decoded = torch.from_numpy(total.view(np.int64).astype(np.float64) / _SCALE)
    n_values = sum(sizes)
    counts = np.rint(decoded[n_values:].numpy())
    sums = dict(zip(names, torch.split(decoded[:n_values], sizes), strict=True))
    return weighted_mean(sums, dict(zip(names, counts.tolist(), strict=True)), base)
