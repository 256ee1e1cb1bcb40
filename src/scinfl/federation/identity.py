"""Site identities and the consortium's roster: masking keys the server cannot substitute.

Secure aggregation's pairwise masks cancel only between the sites whose public masking keys a site uses,
and those keys reach it through the server. A server that hands every site its own keys instead learns
every update exactly, and nobody notices (issue "A site trusts no one", attack 1). So each site has a
long-term identity key pair (Ed25519, :class:`SiteIdentity`), made at the site; the consortium agrees a
:class:`Roster` of the sites' identity public keys, compared out of band by their fingerprints, like the
federation key's; every site holds it. A site signs its masking key for the run (:func:`masking_statement`)
and, before deriving any pair seed, checks every member of the cohort it is asked to mask for
(:func:`check_cohort`): the member is on its roster, and its masking key carries that member's signature
for this run. Anything else is refused with an error naming the site and the member (:class:`SiteRefusal`).

``cryptography``'s Ed25519 does the signing; nothing here is ever sent but public keys and signatures.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "KeyPair",
    "Roster",
    "SiteIdentity",
    "SiteRefusal",
    "SiteSecrets",
    "check_cohort",
    "masking_statement",
    "write_consortium",
]

_IDENTITY_HEADER = "scinfl-site-identity/v1"
_ROSTER_HEADER = "scinfl-roster/v1"


class SiteRefusal(RuntimeError):
    """A site refused what it was asked: the request breaks a rule the site holds (its roster, its
    policy). The message names the site, the rule and the value refused."""


def _fingerprint(raw: bytes) -> str:
    """A short, comparable name of public bytes (first 16 hex digits of their SHA-256)."""
    return hashlib.sha256(raw).hexdigest()[:16]


class KeyPair:
    """A key pair of ``cryptography``'s raw kind (X25519, Ed25519: ``_kind``), made, kept and shown the
    same way; its private half is never printed or pickled."""

    _kind: type

    def __init__(self, private) -> None:
        self._private = private

    @classmethod
    def generate(cls):
        return cls(cls._kind.generate())

    @classmethod
    def from_bytes(cls, raw: bytes):
        """A key pair kept by :meth:`to_bytes` (a file, a SuperNode's run context)."""
        return cls(cls._kind.from_private_bytes(bytes(raw)))

    def to_bytes(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public(self) -> bytes:
        """The public half, as raw bytes."""
        return self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(public={self.public.hex()[:16]}...)"

    def __reduce__(self):
        raise TypeError(f"A {type(self).__name__} is not pickled: its private half stays at its site.")


class SiteIdentity(KeyPair):
    """A site's long-term identity key pair (Ed25519): it signs the site's masking keys. The private half
    never leaves the site; the public half goes into the consortium's :class:`Roster`."""

    _kind = Ed25519PrivateKey

    @property
    def fingerprint(self) -> str:
        """What the consortium compares out of band (the roster lists the same)."""
        return _fingerprint(self.public)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the identity to ``path``, readable by its owner only (0600)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} exists: a site keeps one identity; pass overwrite=True to replace it."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as fh:
            json.dump({"format": _IDENTITY_HEADER, "private": self.to_bytes().hex()}, fh)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SiteIdentity:
        content = _read_format(path, _IDENTITY_HEADER, "site identity")
        return cls.from_bytes(bytes.fromhex(content["private"]))


@dataclass(frozen=True)
class Roster:
    """The consortium's sites and their identity public keys (Ed25519, 32 bytes each), as every site holds
    them. Sites outside it are refused; a masking key is accepted only with its site's signature."""

    identities: Mapping[str, bytes]

    def __post_init__(self) -> None:
        identities = {str(site): bytes(public) for site, public in dict(self.identities).items()}
        for site, public in identities.items():
            if len(public) != 32:
                raise ValueError(f"Roster: site {site!r}'s identity key has {len(public)} bytes, not 32.")
        object.__setattr__(self, "identities", identities)

    @classmethod
    def of(cls, identities: Mapping[str, SiteIdentity]) -> Roster:
        """The roster of these sites' identities (a simulation, where one process holds every site)."""
        return cls({site: identity.public for site, identity in identities.items()})

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.identities)

    @property
    def fingerprint(self) -> str:
        """One name for the whole roster, to compare between sites out of band."""
        text = json.dumps({site: key.hex() for site, key in sorted(self.identities.items())})
        return _fingerprint(text.encode())

    def fingerprints(self) -> dict[str, str]:
        """Each site's identity fingerprint."""
        return {site: _fingerprint(key) for site, key in self.identities.items()}

    def verify(self, site: str, message: bytes, signature: bytes | None) -> bool:
        """Whether ``signature`` is ``site``'s (by its roster key) over ``message``."""
        if site not in self.identities or not signature:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.identities[site]).verify(bytes(signature), message)
        except InvalidSignature:
            return False
        return True

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sites = {site: key.hex() for site, key in self.identities.items()}
        path.write_text(json.dumps({"format": _ROSTER_HEADER, "sites": sites}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Roster:
        content = _read_format(path, _ROSTER_HEADER, "roster")
        return cls({site: bytes.fromhex(key) for site, key in content["sites"].items()})


def masking_statement(run: str, site: str, masking_public: bytes) -> bytes:
    """What a site signs to vouch for its masking key: the run (or statistics exchange) it is for, the
    site's name and the key. A signature from another run, for another site or another key is worthless."""
    return b"\0".join([b"scinfl-masking-key/v1", run.encode(), site.encode(), bytes(masking_public)])


@dataclass
class SiteSecrets:
    """What a site holds for one run's (or statistics exchange's) secure aggregation, never sent: its name,
    its masking key pair, its identity, the roster it trusts, and the run it signed its masking key for
    (a digest of the spec it was shown)."""

    site: str
    masking_key: object  # a scinfl.federation.secure.MaskingKey
    identity: SiteIdentity
    roster: Roster
    run: str
    answered: dict[str, str] = field(default_factory=dict)  # masks' context -> the request it masked

    def record(self, context: str, request: str) -> None:
        """Note that the masks of ``context`` were used for ``request``; refuse (:class:`SiteRefusal`) a
        context the site already masked another request under: a server that reuses a round's context
        for two requests would subtract one masked answer from the other."""
        if self.answered.setdefault(context, request) != request:
            raise SiteRefusal(
                f"Site {self.site!r} refuses to mask: the round {context!r} was used for another request "
                "already (a server that reuses masks reads the difference of the two answers)."
            )

    def __post_init__(self) -> None:
        if self.roster.identities.get(self.site) != self.identity.public:
            raise SiteRefusal(
                f"Site {self.site!r} is not on its roster under its own identity (fingerprint "
                f"{self.identity.fingerprint}): the roster is not this consortium's, or the site's name is wrong."
            )

    @property
    def signature(self) -> bytes:
        """The site's signature of its masking key for the run (published with its hello)."""
        return self.identity.sign(masking_statement(self.run, self.site, self.masking_key.public))

    def __repr__(self) -> str:
        return f"SiteSecrets(site={self.site!r}, run={self.run!r})"


def check_cohort(
    cohort: tuple[str, ...],
    public_keys: Mapping[str, bytes],
    signatures: Mapping[str, bytes],
    secrets: SiteSecrets,
) -> None:
    """Refuse (:class:`SiteRefusal`) to mask for a cohort that the site of ``secrets`` cannot trust: a
    member outside its roster, its own masking key replaced, or a member's masking key without that
    member's signature for the run the site signed for (a key the server substituted, or one of another
    run)."""
    site = secrets.site
    outside = [member for member in cohort if member not in secrets.roster.identities]
    if outside:
        raise SiteRefusal(
            f"Site {site!r} refuses to mask for a cohort with {', '.join(map(repr, outside))}, not on its roster "
            f"({', '.join(secrets.roster.sites)}): a server may not invent sites."
        )
    if site not in cohort or bytes(public_keys.get(site, b"")) != secrets.masking_key.public:
        raise SiteRefusal(f"Site {site!r} refuses to mask: the round does not list its own masking key.")
    for member in cohort:
        if member == site:
            continue
        statement = masking_statement(secrets.run, member, bytes(public_keys.get(member, b"")))
        if not secrets.roster.verify(member, statement, signatures.get(member)):
            raise SiteRefusal(
                f"Site {site!r} refuses to mask: the masking key given for {member!r} does not carry "
                f"{member!r}'s signature for this run (its identity {secrets.roster.fingerprints()[member]} on "
                "the roster); the server may have substituted it."
            )


def write_consortium(
    directory: str | os.PathLike[str], sites: list[str] | tuple[str, ...]
) -> dict[str, dict[str, str]]:
    """Make an identity for each of ``sites`` and their roster in ``directory`` (identities 0600), as a
    consortium does once, each site at home; returns each site's node-config entries (``identity-path``,
    ``roster-path``). For simulations and deployments on one machine, where one user holds every site."""
    directory = Path(directory)
    identities = {site: SiteIdentity.generate() for site in sites}
    roster = Roster.of(identities).save(directory / "roster.json")
    return {
        site: {
            "identity-path": str(identity.save(directory / f"{site}.identity", overwrite=True)),
            "roster-path": str(roster),
        }
        for site, identity in identities.items()
    }


def _read_format(path: str | os.PathLike[str], header: str, what: str) -> dict:
    """The JSON content of one of scinfl's identity files, refused unless it says it is ``header``."""
    content = json.loads(Path(path).read_text())
    if content.get("format") != header:
        raise ValueError(f"{path} is not a scinfl {what} ({header}).")
    return content
