"""The round loop's stages, one at a time (:class:`scinfl.federation.RoundLoop`), over scripted sites that
answer without training: what each stage asks, keeps, retries and refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import FAST_TASK
from scinfl.federation import (
    Hello,
    LoopState,
    Reply,
    RoundLoop,
    RunSpec,
    SiteFailureError,
    site_seed,
)
from scinfl.federation.secure import MaskedUpdate

SITES = ("a", "b", "c", "d")


class ScriptedSites:
    """Sites that answer from a script: ``silent`` sites do not reply, ``no_update`` sites reply without
    their masked update. Every exchange's instructions are kept in ``asked``."""

    remote = False

    def __init__(self, *, silent=(), no_update=()) -> None:
        self.silent, self.no_update, self.asked = set(silent), set(no_update), []

    def exchange(self, round_index, state, spec, config, instructions):
        self.asked.append((round_index, dict(instructions)))
        replies = {}
        for site, instruction in instructions.items():
            if site in self.silent:
                replies[site] = "no reply before the deadline"
                continue
            update = None
            if instruction.train and site not in self.no_update:
                update = MaskedUpdate(
                    np.zeros(3, dtype=np.uint64), 10, spec.key_fingerprint, {"train_loss": 1.0}
                )
            evaluation = {"loss": 1.0, "n": 5.0} if instruction.evaluate else None
            replies[site] = Reply(10, spec.key_fingerprint, update, evaluation, {"steps": round_index})
        return replies


def _loop(transport, **options) -> tuple[RoundLoop, LoopState]:
    spec = RunSpec(task=FAST_TASK, sites=SITES, **{"min_cohort": 2, "min_sites": 2, **options})
    loop = RoundLoop(transport, spec)
    loop.config = None  # the scripted sites build no network
    hellos = {s: Hello({"n_obs": 10}, None, masking_key=bytes([i]) * 32) for i, s in enumerate(SITES)}
    state = {"w": torch.zeros(2)}
    return loop, LoopState(state, state, np.random.default_rng(0), hellos, list(SITES))


def test_configure_gives_each_cohort_site_its_own_seed_and_the_others_none():
    loop, state = _loop(ScriptedSites())
    state.restore = {"b": {"steps": 3}}
    asked = loop.configure(state, 4, list(SITES), ["a", "c"], evaluate=True, attempt=1)
    assert [asked[s].train for s in SITES] == [True, False, True, False]
    assert all(asked[s].evaluate for s in SITES)
    assert asked["a"].fit_seed == site_seed(0, 4, 0, 1) != asked["c"].fit_seed == site_seed(0, 4, 2, 1)
    assert asked["b"].fit_seed == asked["d"].fit_seed == 0
    assert asked["a"].fit_seed != site_seed(0, 4, 0, 0)  # a retried attempt never refits with the same seed
    assert asked["b"].restore == {"steps": 3}
    assert asked["a"].restore is None


def test_send_drops_a_silent_site_and_stops_below_the_minimum(scinfl_log):
    loop, state = _loop(ScriptedSites(silent={"b"}))
    replies = loop.send(state, 2, loop.configure(state, 2, list(SITES), [], evaluate=True))
    assert set(replies) == {"a", "c", "d"}
    assert state.nodes == ["a", "c", "d"]
    assert state.dropped == ["b"]
    assert state.site_states == {s: {"steps": 2} for s in "acd"}
    assert "Round 2: site 'b' dropped from the run (no reply before the deadline)" in scinfl_log.text
    loop, state = _loop(ScriptedSites(silent={"b", "c", "d"}))
    with pytest.raises(SiteFailureError, match=r"Round 5: 1 site\(s\) answered .*needs at least 2"):
        loop.send(state, 5, loop.configure(state, 5, list(SITES), [], evaluate=True))


def test_a_secure_round_without_one_masked_update_is_retried_without_that_site():
    transport = ScriptedSites(no_update={"c"})
    loop, state = _loop(transport)
    result = loop.train_secure(state, 3, list(SITES))
    (first_round, first), (second_round, second) = transport.asked
    assert first_round == second_round == 3
    assert first["a"].secure.cohort == ("a", "b", "c", "d")
    assert first["a"].evaluate
    # the retry: the others only, a new attempt (new masks and seeds), no second evaluation
    assert list(second) == ["a", "b", "d"]
    assert second["a"].secure.cohort == ("a", "b", "d")
    assert second["a"].secure.attempt == 1
    assert not second["a"].evaluate
    assert second["a"].fit_seed != first["a"].fit_seed
    assert set(result.updates) == {"a", "b", "d"}
    assert result.rejected == []  # (none for its key version: c sent no update)
    assert all(reply.evaluation is not None for reply in result.replies.values())  # attempt 0's


def test_a_secure_round_below_min_cohort_stops_the_run_rather_than_sum_fewer():
    loop, state = _loop(ScriptedSites(no_update={"b", "c"}), min_cohort=3)
    with pytest.raises(SiteFailureError, match=r"Round 1: 2 site\(s\) can be summed \(a, d\).*min_cohort=3"):
        loop.train_secure(state, 1, list(SITES))


def test_aggregate_evaluate_completes_the_rows_keeps_the_best_round_and_notes_improvements():
    loop, state = _loop(ScriptedSites(), min_delta=0.1)

    def evaluated(round_index, losses):
        state.pending = {s: {"round": round_index, "site": s} for s in losses}
        state.state = {"w": torch.full((2,), float(round_index))}
        replies = {
            s: Reply(10, None, None, {"loss": loss, "n": 4.0 if s == "a" else 1.0})
            for s, loss in losses.items()
        }
        return loop.aggregate_evaluate(state, round_index, replies)

    assert evaluated(1, {"a": 2.0, "b": 7.0}) == pytest.approx((2.0 * 4 + 7.0) / 5)  # weighted by cells
    assert (state.best_round, state.improved_round) == (1, 1)
    evaluated(2, {"a": 2.5, "b": 7.0})  # worse
    assert (state.best_round, state.improved_round) == (1, 1)
    assert torch.equal(state.best_state["w"], torch.full((2,), 1.0))
    evaluated(3, {"a": 1.9, "b": 7.0})  # better, but by less than min_delta=0.1 of 3.0
    assert (state.best_round, state.improved_round) == (3, 1)
    evaluated(4, {"a": 1.0, "b": 6.0})  # better by more than 10%
    assert (state.best_round, state.improved_round) == (4, 4)
    assert [(row["round"], row["site"], row["n_val"]) for row in state.rows[:2]] == [
        (1, "a", 4.0),
        (1, "b", 1.0),
    ]
    assert state.rows[0]["val_loss"] == 2.0
    assert not state.pending


def test_the_loop_state_round_trips_through_its_checkpoint():
    _, state = _loop(ScriptedSites())
    state.rng.random(3)
    state.best_round, state.best_loss, state.rows, state.site_states = 2, 0.5, [{"round": 1}], {"a": {"s": 1}}
    content = state.checkpoint(3, "signature")
    assert content["round"] == 3
    assert content["signature"] == "signature"
    _, again = _loop(ScriptedSites())
    again.restore_checkpoint(content)
    assert again.next_round == 4
    assert (again.best_round, again.best_loss, again.rows) == (2, 0.5, [{"round": 1}])
    assert again.restore == again.site_states == {"a": {"s": 1}}  # handed back to the sites next round
    assert again.rng.random() == state.rng.random()  # sampling continues where it was
