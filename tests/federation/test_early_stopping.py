"""Early stopping on the validation loss: the stopped run is the long run's prefix, it stops where the
rule says, keeps the best round, survives a resume, and says where it ended."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import scinfl as si
from helpers import FAST

RUN = {**FAST, "rounds": 14, "seed": 3, "fit": {"lr": 1e-2}}  # converges (and overfits) within the rounds
RULE = {"patience": 2, "min_delta": 0.01}


def _selection_losses(history: pd.DataFrame) -> list[float]:
    return [
        float(np.average(rows["val_loss"], weights=rows["n_val"])) for _, rows in history.groupby("round")
    ]


def _expected_stop(losses: list[float], patience: int, min_delta: float) -> int | None:
    """The round the run trains last: the one after the first evaluated round that is ``patience`` rounds
    past the last improvement by more than ``min_delta`` (relative); None if it never stops early."""
    improved, reference = 0, None
    for evaluated, loss in enumerate(losses, start=1):
        if reference is None or loss < reference * (1 - min_delta):
            improved, reference = evaluated, loss
        if evaluated < len(losses) and evaluated - improved >= patience:
            return evaluated + 1
    return None


@pytest.fixture(scope="module")
def runs(pbmc_split):
    sites, _ = pbmc_split
    fixed = si.tl.train_federated(sites, key=None, copy=True, **RUN)
    stopped = si.tl.train_federated(sites, key=None, copy=True, early_stopping=RULE, **RUN)
    return fixed, stopped


def test_a_stopped_run_is_the_long_runs_prefix_and_stops_where_the_rule_says(runs):
    fixed, stopped = runs
    losses = _selection_losses(fixed.history)
    stop = _expected_stop(losses, **RULE)
    assert stop is not None
    assert stop < RUN["rounds"]
    assert stopped.params["stopped_round"] == stop
    assert stopped.history["round"].max() == stop
    prefix = fixed.history[fixed.history["round"] <= stop].reset_index(drop=True)
    pd.testing.assert_frame_equal(stopped.history.reset_index(drop=True), prefix)
    # the selected round is the best one of the rounds it ran
    assert stopped.params["best_round"] == int(np.argmin(losses[:stop])) + 1
    assert "stopped_round" not in fixed.params
    assert stopped.spec.early_stopping
    assert stopped.spec.patience == RULE["patience"]


def test_the_stop_is_drawn_and_saved(runs, tmp_path):
    _, stopped = runs
    axes = si.pl.history(stopped, metrics=["val_loss"], show=False)
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    assert lines["early stop"].get_xdata()[0] == stopped.params["stopped_round"]
    plt.close("all")
    stopped.save(tmp_path / "model")
    back = si.FederatedModel.load(tmp_path / "model")
    assert back.params["stopped_round"] == stopped.params["stopped_round"]
    assert back.spec == stopped.spec


def test_resuming_a_stopped_run_returns_it(pbmc_split, runs, tmp_path):
    sites, _ = pbmc_split
    _, stopped = runs
    options = {"key": None, "copy": True, "early_stopping": RULE, "checkpoint_dir": tmp_path, **RUN}
    si.tl.train_federated(sites, **options)
    again = si.tl.train_federated(sites, resume=True, **options)
    pd.testing.assert_frame_equal(again.history, stopped.history)
    assert again.params["stopped_round"] == stopped.params["stopped_round"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"patience": 0}, "patience must be"),
        ({"min_delta": 1.5}, "min_delta is relative"),
        (
            {"patients": 3},
            r"Unknown early_stopping setting\(s\) \['patients'\]; allowed: patience, min_delta",
        ),
    ],
)
def test_bad_stopping_settings_are_refused(pbmc_split, option, message):
    sites, _ = pbmc_split
    with pytest.raises(ValueError, match=message):
        si.tl.train_federated(sites, key=None, early_stopping=option, **RUN)
