"""The round loop (FedAvg, the key-version gate, sampling, selection, dropped sites) and what a site sends."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import torch

import scinfl as si
from helpers import FAST, assert_no_secret, key_secrets, serialised, small_spec
from scinfl.federation import (
    InProcess,
    Instruction,
    KeyVersionError,
    Reply,
    SiteFailureError,
    aggregate,
    fedavg,
    federate,
    sample_sites,
)
from scinfl.federation.site import hello, site_secrets
from scinfl.train import LocalFitResult


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
        else:  # num_batches_tracked: the weighted mean, rounded (the rule secure aggregation can follow)
            counts = torch.tensor([float(s[name]) for s in states], dtype=torch.float64)
            expected_count = (counts * torch.tensor(weights, dtype=torch.float64)).sum() / sum(weights)
            assert int(tensor) == int(expected_count.round())
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


def test_updates_sent_to_the_aggregator_hold_no_key_material(pbmc_sites, key):
    transport = InProcess(pbmc_sites, dict.fromkeys(pbmc_sites, key))
    spec = small_spec(pbmc_sites, key)
    hello = transport.connect(spec)
    schema = spec.task.agree({s: h.description for s, h in hello.items()}, join="inner")
    config = spec.model_config(schema)
    initial = si.federation.initial_weights(config, spec.seed)
    (reply,) = transport.exchange(
        1, initial, spec, config, {"site_0": Instruction(train=True, evaluate=True)}
    ).values()
    assert isinstance(reply, Reply)
    update = reply.update
    assert update.key_fingerprint == reply.key_fingerprint == key.fingerprint
    assert update.n_obs == reply.n_train == transport.trainers["site_0"].n_train
    assert set(reply.evaluation) == {"loss", "accuracy", "n"}
    # the reply is the whole message: weights, count, fingerprint, metrics, running state, description
    blob = serialised(
        {
            "state": update.state,
            "n": update.n_obs,
            "fp": update.key_fingerprint,
            **update.metrics,
            **reply.evaluation,
            "local": reply.local_state,
            "hello": [h.description for h in hello.values()],
        }
    )
    assert_no_secret(blob, key_secrets(key))
    # and the weights really moved: this is a trained update, not the initial state
    moved = max((update.state[k] - v).abs().max() for k, v in initial.items() if v.is_floating_point())
    assert moved > 1e-4


@pytest.mark.parametrize("secure", [True, False])
def test_site_with_another_key_version_is_rejected_every_round(pbmc_sites, key, scinfl_log, secure):
    stale = si.FederationKey.generate(scheme="infl")
    keys = {"site_0": key, "site_1": key, "site_2": stale}
    spec = small_spec(pbmc_sites, key, secure_aggregation=secure, min_cohort=2)
    run = federate(InProcess(pbmc_sites, keys), spec)
    history = run.history
    assert history.loc[history.site == "site_2", "rejected"].all()
    assert history.sampled.all()
    assert not history.loc[history.site != "site_2", "rejected"].any()
    # in the clear its update is thrown away; masked, it is never made (it could not be taken out of the sum)
    said = "left site 'site_2' out of the sum" if secure else "rejected the update of site 'site_2'"
    assert scinfl_log.text.count(said) == 2
    assert "Site 'site_2' holds key version" in scinfl_log.text  # said when it joined


def test_federate_is_deterministic_and_seed_sensitive(pbmc_sites, key):
    def run(seed):
        spec = small_spec(pbmc_sites, key, seed=seed, fraction=0.67, min_cohort=2)
        return federate(InProcess(pbmc_sites, dict.fromkeys(pbmc_sites, key)), spec)

    first, again, other = run(0), run(0), run(1)
    for name, tensor in first.final_state.items():
        torch.testing.assert_close(tensor, again.final_state[name], rtol=0, atol=0)
    assert any(not torch.equal(t, other.final_state[n]) for n, t in first.final_state.items())
    assert (first.history.groupby("round").sampled.sum() == 2).all()  # 0.67 x 3 sites = 2 per round


def test_best_round_is_the_lowest_validation_loss(pbmc_sites, key):
    run = federate(
        InProcess(pbmc_sites, dict.fromkeys(pbmc_sites, key)), small_spec(pbmc_sites, key, rounds=4)
    )
    h = run.history
    weighted = h.assign(w=h.val_loss * h.n_val).groupby("round").w.sum() / h.groupby("round").n_val.sum()
    assert run.best_round == int(weighted.idxmin())
    # every round is evaluated once, on the weights that round produced (the last by a final exchange)
    assert h.groupby("round").size().tolist() == [3, 3, 3, 3]
    assert h.val_loss.notna().all()


class FailingSite(InProcess):
    """In-process sites where one site stops answering from a given round, as a dead SuperNode would."""

    remote = True

    def __init__(self, sites, keys, *, failing: str, from_round: int) -> None:
        super().__init__(sites, keys)
        self.failing, self.from_round = failing, from_round

    def exchange(self, round_index, state, spec, config, instructions):
        replies = super().exchange(round_index, state, spec, config, instructions)
        if round_index >= self.from_round:
            replies[self.failing] = "no reply before the deadline"
        return replies


def test_a_site_that_stops_answering_is_dropped_and_the_run_goes_on_above_min_sites(pbmc_sites, scinfl_log):
    spec = small_spec(pbmc_sites, None, rounds=3, min_sites=2, min_cohort=2)
    run = federate(FailingSite(pbmc_sites, {}, failing="site_1", from_round=2), spec)
    assert run.dropped == ["site_1"]
    assert "site 'site_1' dropped from the run (no reply before the deadline)" in scinfl_log.text
    h = run.history
    assert set(h.loc[h["round"] == 1, "site"]) == {"site_0", "site_1", "site_2"}
    assert set(h.loc[h["round"] == 3, "site"]) == {"site_0", "site_2"}
    # round 1's row of the dropped site has no evaluation: it left before evaluating round 1's weights
    assert h.loc[(h["round"] == 1) & (h.site == "site_1"), "n_val"].item() == 0
    with pytest.raises(
        SiteFailureError, match=r"Round 2: 2 site\(s\) answered.*needs at least 3 \(min-sites\)"
    ):
        federate(
            FailingSite(pbmc_sites, {}, failing="site_1", from_round=2),
            small_spec(pbmc_sites, None, min_sites=3, min_cohort=2),
        )


class ComingBack(FailingSite):
    """A site that stops answering in one round and whose SuperNode is back from the next, as a restarted
    one would be (``data`` replaces its data when it comes back)."""

    def __init__(self, sites, keys, *, failing: str, in_round: int, data=None) -> None:
        super().__init__(sites, keys, failing=failing, from_round=in_round)
        self.in_round, self.data, self.rounds = in_round, data, []

    def exchange(self, round_index, state, spec, config, instructions):
        self.rounds.append(round_index)
        replies = InProcess.exchange(self, round_index, state, spec, config, instructions)
        if round_index == self.in_round:
            replies[self.failing] = "no reply before the deadline"
        return replies

    def rejoin(self, spec, sites):
        if not self.rounds or self.rounds[-1] < self.in_round or self.failing not in sites:
            return {}
        if self.data is not None:
            self.sites[self.failing] = self.data
            self.trainers.pop(self.failing, None)
        if spec.secure_aggregation:  # a restarted site draws a new masking key; the others keep theirs
            identity = self.identities[self.failing]
            self.secrets[self.failing] = site_secrets(spec, self.failing, identity, self.roster)
        data, key = self.sites[self.failing], self.keys.get(self.failing)
        return {self.failing: hello(spec, data, self.failing, key, self.secrets.get(self.failing))}


@pytest.mark.parametrize("secure", [True, False])
def test_a_site_that_comes_back_rejoins_at_the_next_round(pbmc_sites, scinfl_log, secure):
    spec = small_spec(pbmc_sites, None, rounds=4, min_sites=2, min_cohort=2, secure_aggregation=secure)
    run = federate(ComingBack(pbmc_sites, {}, failing="site_1", in_round=2), spec)
    assert run.dropped == []
    assert "Round 3: site 'site_1' rejoined the run." in scinfl_log.text
    h = run.history
    assert sorted(h.loc[h.site == "site_1", "round"]) == [1, 3, 4]  # gone in round 2 only
    assert h.loc[(h.site == "site_1") & (h["round"] >= 3), "sampled"].all()
    # masked with its new key, the rejoined site's update cancels with the others': masks that did not
    # cancel would leave values of order 2^63 / 2^24 / cells, about 1e9
    assert max(t.abs().max().item() for t in run.final_state.values() if t.is_floating_point()) < 10
    # the same site with other data is not taken back
    other = pbmc_sites["site_1"][:-5].copy()
    run = federate(ComingBack(pbmc_sites, {}, failing="site_1", in_round=2, data=other), spec)
    assert run.dropped == ["site_1"]
    assert "site 'site_1' is back but not as it joined" in scinfl_log.text


def test_hardened_initial_weights_are_drawn_by_a_key_holder(pbmc_sites):
    """The server cannot draw a hardened network's first weights (they come from a key-derived seed): the
    loop asks the first site holding the run's key, and a run with no such site stops."""
    hardened = si.FederationKey.generate(scheme="hardened")

    asked: list[str] = []

    class Recording(InProcess):
        def initial_state(self, site, spec, config):
            asked.append(site)
            return super().initial_state(site, spec, config)

    keys = {"site_0": None, "site_1": hardened, "site_2": hardened}
    transport = Recording(pbmc_sites, keys)
    run = federate(transport, small_spec(pbmc_sites, hardened, rounds=1, min_cohort=2))
    assert asked == ["site_1"]
    assert run.history.set_index("site")["rejected"].to_dict() == {
        "site_0": True,
        "site_1": False,
        "site_2": False,
    }
    # the same key and seed give the same first weights, another key others: the seed alone does not fix them
    config = run.config
    first = si.federation.initial_weights(config, 0, hardened)
    assert all(
        torch.equal(t, si.federation.initial_weights(config, 0, hardened)[n]) for n, t in first.items()
    )
    other = si.federation.initial_weights(config, 0, si.FederationKey.generate(scheme="hardened"))
    assert not torch.equal(first["network.embedding.0.weight"], other["network.embedding.0.weight"])
    with pytest.raises(ValueError, match="where the key is"):
        si.federation.initial_weights(config, 0, None)
    with pytest.raises(SiteFailureError, match="No site holds the run's key version"):
        federate(InProcess(pbmc_sites, {}), small_spec(pbmc_sites, hardened, rounds=1, min_sites=1))


def test_a_reused_checkpoint_directory_is_refused_unless_resuming(pbmc_sites, tmp_path):
    spec = small_spec(pbmc_sites, None, rounds=1)
    federate(InProcess(pbmc_sites, {}), spec, checkpoint_dir=tmp_path)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        federate(InProcess(pbmc_sites, {}), spec, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        federate(InProcess(pbmc_sites, {}), spec, resume=True)


def test_a_site_of_a_few_cells_trains_with_a_warning_that_names_it(pbmc_sites):
    sites = {"big": pbmc_sites["site_1"], "tiny": pbmc_sites["site_2"][:4].copy()}
    with pytest.warns(UserWarning, match=r"Site 'tiny' has 4 cells \(fewer than 20\)") as record:
        model = si.tl.train_federated(
            sites, key=None, **{**FAST, "rounds": 2}, secure_aggregation={"min_cohort": 2}
        )
    assert [w.filename for w in record if "'tiny'" in str(w.message)] == [__file__]  # the user's call
    assert not any("'big'" in str(w.message) for w in record)
    assert set(model.history["site"]) == {"big", "tiny"}


def test_a_non_finite_update_stops_the_run_naming_site_and_round(pbmc_sites):
    with pytest.raises(
        FloatingPointError, match=r"Round 1: site 'site_0' trained to a non-finite .*lr=1e\+12"
    ):
        si.tl.train_federated(pbmc_sites, key=None, **{**FAST, "rounds": 3}, fit={"lr": 1e12})
    assert "X_scinfl" not in pbmc_sites["site_0"].obsm


def test_no_progress_bar_goes_into_a_log(pbmc_sites, capfd, monkeypatch):
    """A progress bar needs a notebook or a terminal; written to a log file it is noise."""
    monkeypatch.setattr(si.settings, "progress", True)
    si.tl.train_federated(pbmc_sites, key=None, **{**FAST, "rounds": 2})
    assert "federated rounds" not in capfd.readouterr().err
