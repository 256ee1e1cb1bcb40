"""A server that deviates from the protocol, against sites that check what they are asked.

Every site holds its identity and the consortium's roster (:mod:`scinfl.federation.identity`): it masks
only for a cohort of roster sites whose masking keys carry their owners' signatures for this run. The
attacks are those of a compromised coordinator (issue "A site trusts no one"): swap the masking keys for
its own, invent sites, replay a masking key from another run. A control shows that key substitution does
recover a site's update exactly when a site does not check.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from helpers import small_spec
from scinfl.data.statistics import StatisticRequest, site_statistic
from scinfl.federation import InProcess, federate
from scinfl.federation.identity import Roster, SiteIdentity, SiteRefusal, masking_statement
from scinfl.federation.secure import FRACTION_BITS, MaskingKey, SecureRound, encode_wide, mask_update
from scinfl.federation.statistics import StatisticsExchange, StatisticsSpec


class DeviatingServer(InProcess):
    """In-process sites behind a server that rewrites every secure round (``rewrite(secure, site)``, for each
    site it is sent to) before it reaches them; the sites answer as honest sites do."""

    def __init__(self, sites, keys, rewrite) -> None:
        super().__init__(sites, keys)
        self.rewrite = rewrite

    def exchange(self, round_index, state, spec, config, instructions):
        forged = {
            site: dataclasses.replace(i, secure=None if i.secure is None else self.rewrite(i.secure, site))
            for site, i in instructions.items()
        }
        return super().exchange(round_index, state, spec, config, forged)

    def statistics(self, spec, request, secure):
        if secure is None:
            return super().statistics(spec, request, None)
        return {  # each site its own forged round
            site: super(DeviatingServer, self).statistics(spec, request, self.rewrite(secure, site))[site]
            for site in spec.sites
        }


ATTACKER = {s: MaskingKey.generate() for s in ("site_0", "site_1", "site_2")}


def substitute_keys(secure: SecureRound, site: str) -> SecureRound:
    """The server hands ``site`` its own masking keys for the others (it knows their private halves), the
    site's own key as the site published it."""
    keys = {s: secure.public_keys[s] if s == site else ATTACKER[s].public for s in secure.cohort}
    return dataclasses.replace(secure, public_keys=keys)


def test_without_the_check_a_substituted_key_gives_the_server_the_update_exactly(pbmc_sites):
    """The control: a site that masks with whatever keys it is given hands its update to a server that
    substituted them. With the attacker's keys for its peers, the server removes the site's masks."""
    state = {"w": torch.randn(50, generator=torch.Generator().manual_seed(0))}
    victim = MaskingKey.generate()
    cohort = ("site_0", "site_1", "site_2")
    keys = {"site_0": victim.public, "site_1": ATTACKER["site_1"].public, "site_2": ATTACKER["site_2"].public}
    secure = SecureRound(1, 0, cohort, keys, "run")
    masked = mask_update(state, 10, state, secure, "site_0", victim).copy()
    for peer in ("site_1", "site_2"):  # the server, as each peer: the same pair seeds, opposite signs
        from scinfl.federation.secure import _add_mask

        seed = ATTACKER[peer].pair_seed(victim.public, secure.context())
        n = len(masked)
        _add_mask(masked, seed, -1, bytes(8 * n), bytearray(8 * n))
    recovered = masked.view(np.int64)[:50].astype(np.float64) / 2.0**FRACTION_BITS / 10
    np.testing.assert_allclose(recovered, state["w"].double().numpy(), atol=2.0**-FRACTION_BITS)


def test_a_site_refuses_masking_keys_the_server_substituted(pbmc_sites):
    spec = small_spec(pbmc_sites, None, rounds=1)
    with pytest.raises(
        SiteRefusal,
        match=r"Site 'site_0' refuses to mask: the masking key given for 'site_1' does not carry 'site_1'\'s signature",
    ):
        federate(DeviatingServer(pbmc_sites, {}, substitute_keys), spec)


def test_a_site_refuses_keys_re_signed_by_another_identity(pbmc_sites):
    """The server signs its keys itself: its identity is on no site's roster."""
    server = SiteIdentity.generate()

    def re_sign(secure, site):
        secure = substitute_keys(secure, site)
        statements = {s: masking_statement(secure.run, s, secure.public_keys[s]) for s in secure.cohort}
        return dataclasses.replace(secure, signatures={s: server.sign(m) for s, m in statements.items()})

    with pytest.raises(SiteRefusal, match="does not carry 'site_1'"):
        federate(DeviatingServer(pbmc_sites, {}, re_sign), small_spec(pbmc_sites, None, rounds=1))


def test_a_site_refuses_a_cohort_with_invented_sites(pbmc_sites):
    """Sybils: the victim plus names outside the roster, which the server controls."""

    def sybils(secure, site):
        cohort = (secure.cohort[0], "sybil_a", "sybil_b")
        keys = {
            secure.cohort[0]: secure.public_keys[secure.cohort[0]],
            "sybil_a": ATTACKER["site_1"].public,
            "sybil_b": ATTACKER["site_2"].public,
        }
        return dataclasses.replace(secure, cohort=cohort, public_keys=keys)

    with pytest.raises(
        SiteRefusal, match=r"'sybil_a', 'sybil_b', not on its roster \(site_0, site_1, site_2\)"
    ):
        federate(DeviatingServer(pbmc_sites, {}, sybils), small_spec(pbmc_sites, None, rounds=1))


def test_a_masking_key_signed_for_another_run_is_refused(pbmc_sites):
    """A key and its signature replayed from another run: signed for that run, worthless in this one."""
    first = InProcess(pbmc_sites, {})
    hellos = first.connect(small_spec(pbmc_sites, None, rounds=1, seed=1))
    old = {s: (h.masking_key, h.masking_signature) for s, h in hellos.items()}

    def replay(secure, site):
        keys = {**secure.public_keys, "site_1": old["site_1"][0]}
        return dataclasses.replace(
            secure, public_keys=keys, signatures={**secure.signatures, "site_1": old["site_1"][1]}
        )

    server = DeviatingServer(pbmc_sites, {}, replay)
    server.identities, server.roster = first.identities, first.roster  # the same consortium, a new run
    with pytest.raises(SiteRefusal, match="does not carry 'site_1'"):
        federate(server, small_spec(pbmc_sites, None, rounds=1))
    with pytest.raises(SiteRefusal, match="refuses to mask for run 'other'"):
        federate(
            DeviatingServer(pbmc_sites, {}, lambda secure, site: dataclasses.replace(secure, run="other")),
            small_spec(pbmc_sites, None, rounds=1),
        )


def test_a_site_refuses_a_roster_that_is_not_its_consortiums():
    identity, stranger = SiteIdentity.generate(), SiteIdentity.generate()
    from scinfl.federation.identity import SiteSecrets

    with pytest.raises(SiteRefusal, match="Site 'a' is not on its roster under its own identity"):
        SiteSecrets("a", MaskingKey.generate(), identity, Roster.of({"a": stranger}), "run")
    roster = Roster.of({"a": identity, "b": stranger})
    assert roster.fingerprints()["a"] == identity.fingerprint
    assert Roster(dict(roster.identities)).fingerprint == roster.fingerprint
    assert Roster({"a": identity.public, "b": identity.public}).fingerprint != roster.fingerprint


def test_statistics_refuse_substituted_keys_too(pbmc_sites):
    sites = {name: site.raw.to_adata() for name, site in pbmc_sites.items()}
    exchange = StatisticsExchange(DeviatingServer(sites, {}, substitute_keys), StatisticsSpec(tuple(sites)))
    request = StatisticRequest("moments", tuple(exchange.var_names["site_0"]))
    with pytest.raises(SiteRefusal, match="the masking key given for 'site_1' does not carry"):
        exchange.sum(request)


def test_identities_and_rosters_round_trip_and_keep_their_secret(tmp_path):
    identity = SiteIdentity.generate()
    path = identity.save(tmp_path / "a.identity")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert SiteIdentity.load(path).public == identity.public
    with pytest.raises(FileExistsError, match="a site keeps one identity"):
        identity.save(path)
    assert identity.to_bytes().hex() not in repr(identity)
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(identity)
    roster = Roster.of({"a": identity, "b": SiteIdentity.generate()})
    assert Roster.load(roster.save(tmp_path / "roster.json")) == roster
    assert identity.to_bytes().hex() not in (tmp_path / "roster.json").read_text()


def test_statistics_masks_are_never_reused_for_another_request(pbmc_sites):
    """A server that sends two requests under one round's context would subtract one masked answer from the
    other and read a site's own sums: the request's digest joins the masks, so two requests never share
    them, and a site refuses a context it already masked another request under."""
    sites = {name: site.raw.to_adata() for name, site in pbmc_sites.items()}
    transport = InProcess(sites, {})
    exchange = StatisticsExchange(transport, StatisticsSpec(tuple(sites)))
    genes = tuple(exchange.var_names["site_0"])
    first, other = StatisticRequest("moments", genes), StatisticRequest("moments", (*genes[:-1], "absent"))
    secure = SecureRound(1, 0, tuple(sites), {s: p.masking_key for s, p in exchange.profiles.items()}, "x",
                         {s: p.masking_signature for s, p in exchange.profiles.items()})  # fmt: skip
    one = transport.statistics(exchange.spec, first, secure)
    again = transport.statistics(exchange.spec, first, secure)  # the same request again: the same answer
    assert all(np.array_equal(one[s], again[s]) for s in sites)
    with pytest.raises(
        SiteRefusal, match="Site 'site_0' refuses to mask: the round .* was used for another request"
    ):
        transport.statistics(exchange.spec, other, secure)
    # and the masks differ between requests even where a site has not seen the context before
    fresh = InProcess(sites, {})
    fresh.identities, fresh.roster, fresh.secrets = (
        transport.identities,
        transport.roster,
        {s: dataclasses.replace(secret, answered={}) for s, secret in transport.secrets.items()},
    )
    twin = fresh.statistics(exchange.spec, other, secure)
    encodings = [encode_wide(site_statistic(sites["site_0"], "site_0", r)) for r in (first, other)]
    shared_masks = (encodings[1] - encodings[0]).view(np.int64)  # what reused masks would let through
    assert not np.array_equal((twin["site_0"] - one["site_0"]).view(np.int64), shared_masks)
