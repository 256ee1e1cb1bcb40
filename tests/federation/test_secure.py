"""Secure aggregation: masks cancel exactly, the server's view holds no site's update, the round loop's
cohort, retries and minimum cohort."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import scinfl as si
from helpers import FAST_TASK, accuracy, serialised, small_spec
from scinfl.federation import InProcess, SiteFailureError, fedavg, federate
from scinfl.federation.secure import (
    FRACTION_BITS,
    MaskedUpdate,
    MaskingKey,
    SecureRound,
    mask_update,
    unmask_sum,
)


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Weights of a real network after different numbers of forward passes (BatchNorm statistics differ),
    plus independent perturbations of its weights: n sites' updates."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = si.nn.ResidualMLPClassifier(50, 4, hidden=16)
    states = []
    for i in range(n):
        net.train()
        net(torch.randn(32, 50, generator=generator) * (i + 1))
        state = {k: v.clone() for k, v in net.state_dict().items()}
        for _name, tensor in state.items():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
        states.append(state)
    return states


def _round(sites: list[str], keys: dict[str, MaskingKey], attempt: int = 0) -> SecureRound:
    return SecureRound(3, attempt, tuple(sites), {s: keys[s].public for s in sites}, run="test-run")


def _masked(states, counts, base, secure, keys) -> list[MaskedUpdate]:
    return [
        MaskedUpdate(mask_update(state, n, base, secure, site, keys[site]), n, None)
        for site, state, n in zip(secure.cohort, states, counts, strict=True)
    ]


def test_pair_seeds_are_shared_by_the_pair_only_and_bound_to_their_context():
    a, b, c = MaskingKey.generate(), MaskingKey.generate(), MaskingKey.generate()
    assert a.pair_seed(b.public, b"ctx") == b.pair_seed(a.public, b"ctx")
    assert a.pair_seed(b.public, b"ctx") != a.pair_seed(b.public, b"other round")
    assert a.pair_seed(b.public, b"ctx") != a.pair_seed(c.public, b"ctx")
    assert a.pair_seed(b.public, b"ctx") != c.pair_seed(b.public, b"ctx")  # a third site cannot compute it
    again = MaskingKey.from_bytes(a.to_bytes())  # kept between a SuperNode's messages
    assert again.public == a.public
    assert again.pair_seed(b.public, b"ctx") == a.pair_seed(b.public, b"ctx")
    assert a.to_bytes().hex() not in repr(a)


def test_masks_cancel_exactly_and_the_sum_is_fedavg_within_the_fixed_point_error():
    states, counts = _states(4), [120, 45, 300, 7]
    base = states[0]
    keys = {s: MaskingKey.generate() for s in "abcd"}
    secure = _round(list("abcd"), keys)
    masked = _masked(states, counts, base, secure, keys)
    # The masks cancel exactly: the masked sum equals the sum of the unmasked fixed-point encodings.
    total = sum((m.masked for m in masked), start=np.zeros_like(masked[0].masked))
    names, sizes = list(base), [t.numel() for t in base.values()]
    encodings = []
    for state, n in zip(states, counts, strict=True):
        values = np.concatenate(
            [state[k].double().reshape(-1).numpy() * n for k in names] + [np.full(len(names), n)]
        )
        encodings.append(np.rint(values * 2.0**FRACTION_BITS).astype(np.int64).view(np.uint64))
    assert np.array_equal(total, sum(encodings, start=np.zeros_like(encodings[0])))
    assert sum(sizes) + len(names) == total.size
    # ... and decodes to FedAvg's weighted mean within cohort * 2^-(bits+1) / cells per entry
    secure_mean = unmask_sum(masked, base)
    plain = fedavg(states, counts)
    bound = len(counts) * 2.0 ** -(FRACTION_BITS + 1) / sum(counts)
    for name, tensor in plain.items():
        assert secure_mean[name].dtype == tensor.dtype
        if tensor.is_floating_point():
            error = (secure_mean[name].double() - tensor.double()).abs().max().item()
            resolution = tensor.double().abs().max().item() * 2.0**-23  # float32 rounding of the mean
            assert error <= bound + 2 * resolution, name
    # the order of the updates does not matter (modular sums commute)
    assert all(torch.equal(unmask_sum(masked[::-1], base)[n], t) for n, t in secure_mean.items())


def test_one_masked_update_alone_says_nothing_about_the_update():
    states, counts = _states(3), [200, 150, 90]
    # fixed key pairs, so that the correlations below are the same in every run (with fresh keys in each
    # run, the test's earlier bound of 0.05, about 2 standard errors here, failed now and then)
    keys = {s: MaskingKey.from_bytes(hashlib.sha256(f"site {s}".encode()).digest()) for s in "abc"}
    secure = _round(list("abc"), keys)
    masked = _masked(states, counts, states[0], secure, keys)
    for update, state, n in zip(masked, states, counts, strict=True):
        vector = update.masked
        truth = np.concatenate([t.double().reshape(-1).numpy() for t in state.values()]) * n
        as_signed = vector.view(np.int64).astype(np.float64)[: truth.size]
        # uniform over 64-bit integers: no correlation with the update (within 4 standard errors of the
        # correlation of independent vectors), half the bits set
        assert abs(np.corrcoef(as_signed, truth)[0, 1]) < 4 / np.sqrt(truth.size)
        bits = np.unpackbits(vector.view(np.uint8)).mean()
        assert 0.49 < bits < 0.51
        # the update's own bytes (float32 weights) appear nowhere in what the site sends
        blob = serialised({"masked": vector})
        for tensor in state.values():
            if tensor.is_floating_point() and tensor.numel() >= 4:
                assert tensor.reshape(-1)[:4].numpy().tobytes() not in blob
    # two sites' masked vectors together are still masked by their pairs with the third
    pair = (masked[0].masked + masked[1].masked).view(np.int64).astype(np.float64)
    truth = sum(
        np.concatenate([t.double().reshape(-1).numpy() for t in s.values()]) * n
        for s, n in zip(states[:2], counts[:2], strict=True)
    )
    assert abs(np.corrcoef(pair[: truth.size], truth)[0, 1]) < 4 / np.sqrt(truth.size)


def test_a_mosaic_site_sums_only_the_entries_it_trains():
    states, counts = _states(3), [100, 100, 50]
    base = {k: v.clone() for k, v in states[0].items()}
    names = list(base)
    held = [set(names), set(names[: len(names) // 2]), set(names[: len(names) // 2])]
    partial = [{k: v for k, v in s.items() if k in h} for s, h in zip(states, held, strict=True)]
    keys = {s: MaskingKey.generate() for s in "abc"}
    out = unmask_sum(_masked(partial, counts, base, _round(list("abc"), keys), keys), base)
    plain = fedavg(partial, counts, base=base)
    for name in names:
        if plain[name].is_floating_point():
            torch.testing.assert_close(out[name].double(), plain[name].double(), rtol=0, atol=1e-6)
        else:  # BatchNorm's batch counter: the rounded weighted mean, in the clear as under masks
            assert torch.equal(out[name], plain[name]), name
    nobody = [{k: v for k, v in p.items() if k != names[-1]} for p in partial[:2]]
    out = unmask_sum(_masked(nobody, [10, 20], base, _round(["a", "b"], keys), keys), base)
    assert torch.equal(out[names[-1]], base[names[-1]])  # no site trained it: the global value stays


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool],
)
def test_clear_and_secure_fedavg_are_one_rule_entry_by_entry_for_every_dtype(dtype):
    """The clear and the secure path decode into the same weighted mean (``fedavg.weighted_mean``): a float
    entry within the fixed point's resolution, an integer or boolean entry exactly, the rounded weighted mean
    (cell counts 150/300/250 and BatchNorm batch counters 12/13/12 give 12: a maximum would give 13)."""
    generator = torch.Generator().manual_seed(0)
    counts = [150, 300, 250]
    if dtype.is_floating_point:
        values = [torch.randn(5, 7, generator=generator).to(dtype) for _ in counts]
    elif dtype == torch.bool:
        values = [torch.rand(5, 7, generator=generator) > 0.5 for _ in counts]
    else:
        values = [torch.tensor([12, 13, 12][i]).to(dtype) + torch.zeros(5, 7, dtype=dtype) for i in range(3)]
        values[1][0, :3] = torch.tensor([-4, 0, 10**6], dtype=dtype)
    states = [
        {"entry": v, "num_batches_tracked": torch.tensor(c, dtype=torch.long)}
        for v, c in zip(values, [12, 13, 12], strict=True)
    ]
    keys = {s: MaskingKey.generate() for s in "abc"}
    secure = unmask_sum(_masked(states, counts, states[0], _round(list("abc"), keys), keys), states[0])
    clear = fedavg(states, counts)
    assert int(clear["num_batches_tracked"]) == int(secure["num_batches_tracked"]) == 12
    exact = sum(v.double() * n for v, n in zip(values, counts, strict=True)) / sum(counts)
    for out in (clear, secure):
        assert out["entry"].dtype == dtype
        assert out["entry"].shape == (5, 7)
    if dtype.is_floating_point:
        resolution = torch.finfo(dtype).eps * exact.abs().max().item()
        assert (clear["entry"].double() - exact).abs().max() <= resolution
        assert (secure["entry"].double() - clear["entry"].double()).abs().max() <= resolution + 2.0**-24
    else:
        assert torch.equal(clear["entry"], exact.round().to(dtype))
        assert torch.equal(secure["entry"], clear["entry"])


def test_values_beyond_the_fixed_point_range_are_refused_naming_the_site():
    state = {"w": torch.full((3,), 1e12)}
    keys = {s: MaskingKey.generate() for s in "ab"}
    with pytest.raises(OverflowError, match="Site 'a'.*too large"):
        mask_update(state, 10, state, _round(["a", "b"], keys), "a", keys["a"])
    # nor does a site mask for a cohort of one (its "sum" would be its update), or one it is not in
    with pytest.raises(ValueError, match="Site 'a' refuses .* cohort of one"):
        mask_update({"w": torch.ones(3)}, 10, state, _round(["a"], keys), "a", keys["a"])
    with pytest.raises(ValueError, match="Site 'c' is not in the round's cohort"):
        mask_update({"w": torch.ones(3)}, 10, state, _round(["a", "b"], keys), "c", keys["a"])


class Recording(InProcess):
    """In-process sites that keep every reply, as the server receives it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[tuple[int, dict]] = []
        self.sent: list[tuple[int, dict]] = []

    def exchange(self, round_index, state, spec, config, instructions):
        self.sent.append((round_index, {k: v.clone() for k, v in state.items()}))
        replies = super().exchange(round_index, state, spec, config, instructions)
        self.received.append((round_index, replies))
        return replies


def test_the_server_receives_no_site_update_and_its_sum_is_fedavg(pbmc_sites, key):
    """Run the same federation in the clear and masked: every site's true update is known from the
    clear run (same seeds, same start), and nothing the server receives in the masked run matches it."""
    keys = dict.fromkeys(pbmc_sites, key)
    clear = Recording(pbmc_sites, keys)
    federate(clear, small_spec(pbmc_sites, key, rounds=1, secure_aggregation=False))
    masked = Recording(pbmc_sites, keys)
    run = federate(masked, small_spec(pbmc_sites, key, rounds=1))
    (_, clear_replies), (_, masked_replies) = clear.received[0], masked.received[0]
    assert clear.sent[0][1].keys() == masked.sent[0][1].keys()
    true_updates = {site: reply.update for site, reply in clear_replies.items()}
    for site, reply in masked_replies.items():
        update = reply.update
        assert isinstance(update, MaskedUpdate)
        assert update.n_obs == true_updates[site].n_obs
        truth = np.concatenate([t.double().reshape(-1).numpy() for t in true_updates[site].state.values()])
        received = update.masked.view(np.int64).astype(np.float64)[: truth.size]
        assert abs(np.corrcoef(received, truth)[0, 1]) < 0.05
        blob = serialised({"masked": update.masked, "metrics": update.metrics, "n": update.n_obs})
        for tensor in true_updates[site].state.values():
            if tensor.is_floating_point() and tensor.numel() >= 8:
                assert tensor.reshape(-1)[:8].numpy().tobytes() not in blob
    # the server's aggregate equals FedAvg of the true updates
    plain = fedavg(
        [u.state for u in true_updates.values()],
        [u.n_obs for u in true_updates.values()],
        base=clear.sent[0][1],
    )
    for name, tensor in plain.items():
        torch.testing.assert_close(run.final_state[name].double(), tensor.double(), rtol=0, atol=1e-6)
    # the masking keys' and identities' private halves never leave the sites
    received_blob = serialised([{s: r.update.masked for s, r in masked_replies.items()}])
    for secrets in masked.secrets.values():
        assert secrets.masking_key.to_bytes() not in received_blob
        assert secrets.identity.to_bytes() not in received_blob


def test_secure_and_clear_runs_reach_the_same_accuracy(pbmc_split, key):
    sites, held_out = pbmc_split
    scores = {}
    for secure in (True, False):
        model = si.tl.train_federated(
            sites, key=key, task=FAST_TASK, rounds=4, seed=0, copy=True, secure_aggregation=secure
        )
        scores[secure] = accuracy(model, held_out, key)
    assert abs(scores[True] - scores[False]) <= 0.03, scores
    assert scores[True] > 0.5


class Dropping(Recording):
    """A site that fails in the middle of a given round's first attempt, as a killed SuperNode would."""

    remote = True

    def __init__(self, *args, failing: str, in_round: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failing, self.in_round, self.attempts = failing, in_round, []

    def exchange(self, round_index, state, spec, config, instructions):
        replies = super().exchange(round_index, state, spec, config, instructions)
        secure = next((i.secure for i in instructions.values() if i.secure is not None), None)
        if secure is not None:
            self.attempts.append((round_index, secure.attempt, secure.cohort))
        if round_index == self.in_round and self.failing in replies:
            replies[self.failing] = "no reply before the deadline"
        return replies


def test_a_site_lost_mid_round_is_retried_without_it_or_stops_below_min_cohort(pbmc_sites, key, scinfl_log):
    keys = dict.fromkeys(pbmc_sites, key)
    transport = Dropping(pbmc_sites, keys, failing="site_1", in_round=2)
    run = federate(transport, small_spec(pbmc_sites, key, rounds=3, min_sites=2, min_cohort=2))
    assert transport.attempts == [
        (1, 0, ("site_0", "site_1", "site_2")),
        (2, 0, ("site_0", "site_1", "site_2")),
        (2, 1, ("site_0", "site_2")),  # retried: new attempt, new masks, without the lost site
        (3, 0, ("site_0", "site_2")),
    ]
    assert run.dropped == ["site_1"]
    assert "retrying the round with site_0, site_2 (attempt 1)" in scinfl_log.text
    assert run.history.loc[run.history["round"] == 3, "site"].tolist() == ["site_0", "site_2"]
    assert all(torch.isfinite(t).all() for t in run.final_state.values() if t.is_floating_point())
    # with min_cohort=3 the same loss stops the run, naming what is missing; nothing hangs
    with pytest.raises(SiteFailureError, match=r"Round 2: 2 site\(s\) can be summed.*min_cohort=3"):
        federate(
            Dropping(pbmc_sites, keys, failing="site_1", in_round=2),
            small_spec(pbmc_sites, key, rounds=3, min_sites=2),
        )
