"""pl.history draws one line per site for each metric."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

import scinfl as si
from helpers import FAST


@pytest.fixture(scope="module")
def model():
    import scanpy as sc

    sites = si.pp.split_sites(
        sc.datasets.pbmc68k_reduced(), n_sites=3, label_key="bulk_labels", alpha=0.5, seed=0
    )
    si.pp.register_site(sites, use_raw=True)
    return si.tl.train_federated(sites, key=None, copy=True, **{**FAST, "rounds": 3})


def test_history_lines_follow_the_history(model, tmp_path):
    axes = si.pl.history(model, metrics=("train_loss", "val_accuracy"), save=tmp_path / "h.png")
    assert len(axes) == 2
    assert (tmp_path / "h.png").stat().st_size > 1000
    for ax, metric in zip(axes, ("train_loss", "val_accuracy"), strict=True):
        site_lines = [line for line in ax.get_lines() if line.get_label().startswith("site_")]
        assert sorted(line.get_label() for line in site_lines) == ["site_0", "site_1", "site_2"]
        for line in site_lines:
            expected = model.history.loc[model.history.site == line.get_label(), metric].to_numpy()
            np.testing.assert_allclose(line.get_ydata(), expected)
        selected = [line for line in ax.get_lines() if line.get_label() == "selected round"]
        assert selected[0].get_xdata()[0] == model.params["best_round"]
    plt.close("all")


def test_history_by_default_draws_what_selects_the_round(model):
    """Accuracy for a classifier; the validation loss for a model without one (regression, embedding)."""
    axes = si.pl.history(model, show=False)
    assert [ax.get_ylabel() for ax in axes] == [
        si.pl._LABELS.get(m, m) for m in ("train_loss", "val_accuracy")
    ]
    no_accuracy = copy.copy(model)
    no_accuracy.history = model.history.drop(columns="val_accuracy")
    axes = si.pl.history(no_accuracy, show=False)
    assert [ax.get_ylabel() for ax in axes] == [si.pl._LABELS.get(m, m) for m in ("train_loss", "val_loss")]
    plt.close("all")


def test_history_into_given_axes_and_errors(model):
    _fig, ax = plt.subplots()
    assert si.pl.history(model, metrics=("val_loss",), ax=ax) == [ax]
    with pytest.raises(ValueError, match="no column"):
        si.pl.history(model, metrics=("auroc",), ax=ax)
    with pytest.raises(ValueError, match="1 Axes for 2 metrics"):
        si.pl.history(model, ax=ax)
    plt.close("all")


def test_history_ticks_whole_rounds_and_leaves_a_callers_layout_alone(model):
    fig, (left, _) = plt.subplots(1, 2)
    fig.subplots_adjust(left=0.3, wspace=0.6)  # the caller's own layout
    si.pl.history(model, metrics=["train_loss"], ax=left, show=False)
    assert all(float(t).is_integer() for t in left.get_xticks())
    assert fig.subplotpars.left == 0.3  # no tight_layout over the caller's figure
    plt.close(fig)
