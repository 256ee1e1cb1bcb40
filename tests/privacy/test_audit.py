"""The privacy audit end to end on real PBMCs (CI-sized): it reproduces the paper scheme's known weaknesses,
its positive controls hold, and DP-SGD's clipped and noised payloads are what the attacks face."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import warnings

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

import scinfl as si
from helpers import FAST
from scinfl.data import label_codes
from scinfl.privacy.audit import COLUMNS, membership_candidates, two_sample_scores
from scinfl.privacy.gradients import PrivateGradient, client_gradient
from scinfl.privacy.metrics import membership_metrics

SMALL = {
    "settings": {
        "seeds": (0,),
        "n_victims": 6,
        "utility": {"n_wrong_keys": 4},
        "inversion": {"victims": 2, "batches": (8,), "steps": 150},
    }
}


@pytest.fixture(scope="module")
def keyed_audit(pbmc_split, key):
    sites, public = pbmc_split
    model = si.tl.train_federated(sites, key=key, copy=True, **{**FAST, "rounds": 10})
    site = model.sites["site_1"]
    table = si.tl.privacy_audit(
        model, site, key=key, public=public, attacks=("utility", "analytic", "inversion"), **SMALL
    )
    return model, site, table


def _value(table, attack, view, metric):
    row = table[(table.attack == attack) & (table.view == view) & (table.metric == metric)]
    assert len(row) == 1, (attack, view, metric)
    return float(row["mean"].iloc[0])


def test_audit_table_is_tidy_and_stored(keyed_audit):
    _, site, table = keyed_audit
    assert list(table.columns) == COLUMNS
    assert set(table.family) == {"utility", "analytic", "inversion", "prior"}
    assert (table.ci_low <= table["mean"] + 1e-12).all()
    assert (table["mean"] <= table.ci_high + 1e-12).all()
    assert (table.n >= 1).all()
    pd.testing.assert_frame_equal(site.uns["scinfl_privacy"], table)
    examples = site.uns["scinfl_privacy_examples"]
    assert examples["truth"].shape == examples["first layer (dW ∕ db) | server"].shape  # "∕": U+2215
    # audit tables concatenate (pandas compares their attrs, which hold the example arrays)
    both = pd.concat([table.assign(model="a"), table.copy().assign(model="b")])
    assert len(both) == 2 * len(table)


def test_an_audited_site_is_written_and_read_back(keyed_audit, tmp_path):
    """The audit's .uns entries are valid h5ad: no "/" in a key (anndata warns, and will refuse)."""
    _, site, _ = keyed_audit
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        site.write_h5ad(tmp_path / "site.h5ad")
    back = ad.read_h5ad(tmp_path / "site.h5ad")
    examples = site.uns["scinfl_privacy_examples"]
    assert set(back.uns["scinfl_privacy_examples"]) == set(examples)
    np.testing.assert_array_equal(back.uns["scinfl_privacy_examples"]["truth"], examples["truth"])


def test_audit_reproduces_the_paper_schemes_weakness(keyed_audit):
    """Wrong keys from the same generator work; the keyless server reads the input off the first layer."""
    _, _, table = keyed_audit
    right = _value(table, "accuracy", "right key", "accuracy")
    wrong = _value(table, "accuracy", "wrong key", "accuracy")
    chance = _value(table, "accuracy", "chance", "accuracy")
    assert right > chance + 0.25
    assert wrong > right - 0.05
    assert _value(table, "first layer (dW / db)", "server", "pearson_minus_mean") > 0.99
    assert _value(table, "first layer (dW / db)", "server", "reidentified") == 1.0
    # and it beats what the attacker has for free
    assert _value(table, "cell-type mean profile", "free", "pearson_minus_mean") < 0.8


def test_positive_controls_hold(keyed_audit):
    """With the right key the attacks work; otherwise the audit would measure nothing."""
    _, _, table = keyed_audit
    view = "right key (positive control)"
    assert _value(table, "gradient, 1 cell", view, "pearson_minus_mean") > 0.8
    assert _value(table, "gradient, 1 cell", view, "reidentified") == 1.0
    assert _value(table, "label from last bias (iDLG)", view, "label_recovered") == 1.0


def test_privacy_plot_draws_every_family(keyed_audit, tmp_path):
    model, site, table = keyed_audit
    axes = si.pl.privacy(table, save=tmp_path / "audit.png")
    assert [ax.get_title() for ax in axes] == ["utility", "analytic", "inversion"]
    utility = axes[0]
    assert [t.get_text() for t in utility.get_yticklabels()] == [
        "right key",
        "no key",
        "wrong key",
        "one-bit flip",
    ]
    bars = [p.get_width() for p in utility.patches]
    assert bars[0] == pytest.approx(_value(table, "accuracy", "right key", "accuracy"))
    recon = si.pl.reconstruction(
        site.uns["scinfl_privacy_examples"], var_names=model.schema.var_names, show=False
    )
    assert len(recon) == len(site.uns["scinfl_privacy_examples"]) - 1
    with pytest.raises(ValueError, match="no family"):
        si.pl.privacy(table, families=("membership",))
    plt.close("all")


def test_audit_needs_the_models_key(keyed_audit, pbmc_split, key):
    model, site, _ = keyed_audit
    _, public = pbmc_split
    with pytest.raises(ValueError, match="trained under key"):
        si.tl.privacy_audit(model, site, key=si.FederationKey.generate(scheme="infl"), public=public, **SMALL)
    with pytest.raises(ValueError, match="Unknown attacks"):
        si.tl.privacy_audit(model, site, key=key, public=public, attacks=("telepathy",), **SMALL)


def test_dp_client_payload_is_clipped_and_noised(pbmc_split):
    """What a DP-SGD client sends: no per-cell gradient above the clip, plus noise that hides the input."""
    sites, _ = pbmc_split
    adata = sites["site_0"]
    x = torch.from_numpy(adata.raw.X[:1].toarray().astype(np.float32))
    y = torch.zeros(1, dtype=torch.long)
    torch.manual_seed(0)
    network = si.nn.ResidualMLPClassifier(x.shape[1], 10, hidden=32, norm="layer")
    raw = client_gradient(network, x, y, key_material=None)
    clipped = client_gradient(network, x, y, key_material=None, private=PrivateGradient(0.1, 0.0))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in clipped.values()))
    assert norm == pytest.approx(0.1, rel=1e-3)
    cos = sum((a * b).sum() for a, b in zip(raw.values(), clipped.values(), strict=True)) / (
        norm * torch.sqrt(sum(g.pow(2).sum() for g in raw.values()))
    )
    assert cos == pytest.approx(1.0, abs=1e-4)  # clipping only rescales a single cell's gradient
    noised = client_gradient(network, x, y, key_material=None, private=PrivateGradient(1.0, 2.0, seed=3))
    again = client_gradient(network, x, y, key_material=None, private=PrivateGradient(1.0, 2.0, seed=3))
    for name in noised:
        torch.testing.assert_close(noised[name], again[name])  # seeded
    first = "embedding.0"
    estimate = si.privacy.analytic.invert_first_layer(noised[f"{first}.weight"], noised[f"{first}.bias"])
    assert abs(np.corrcoef(estimate, x[0].numpy())[0, 1]) < 0.3  # the analytic attack no longer works


def test_membership_candidates_are_matched_by_label():
    rng = np.random.default_rng(0)
    members = np.r_[np.zeros(80, int), np.ones(15, int), np.full(5, 2)]
    nonmembers = np.r_[np.zeros(10, int), np.ones(30, int), np.full(3, 3)]
    m, n, matched = membership_candidates(members, nonmembers, rng, cap=250)
    assert matched
    assert np.bincount(members[m], minlength=4).tolist() == [10, 15, 0, 0]
    assert np.bincount(nonmembers[n], minlength=4).tolist() == [10, 15, 0, 0]
    m, n, _ = membership_candidates(members, nonmembers, rng, cap=5)  # scaled down together
    assert len(m) == len(n) <= 5
    m, n, matched = membership_candidates(np.zeros(50, int), np.ones(50, int), rng, cap=250)
    assert not matched  # nothing to match: unmatched draws
    assert len(m) == len(n) == 50


def test_two_sample_scores_sit_at_chance_within_one_population_and_see_a_shift(pbmc):
    """The values-alone score is unbiased when members and non-members are one population (label-matched
    halves of the same cells) and separates them when the non-members are another batch."""
    values = pbmc.raw.X.toarray()
    labels = pbmc.obs["bulk_labels"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    same, shifted = [], []
    for seed in range(12):
        order = rng.permutation(len(values))[:300]
        is_member = np.zeros(300, bool)
        for label in np.unique(labels[order]):
            where = rng.permutation(np.flatnonzero(labels[order] == label))
            is_member[where[: len(where) // 2]] = True
        x = values[order]
        scores = two_sample_scores(x, is_member, labels[order], seed=seed)
        same.append(membership_metrics(scores[is_member], scores[~is_member])["auc"])
        x = x.copy()
        x[~is_member] *= 1.3  # the non-members from another protocol
        scores = two_sample_scores(x, is_member, labels[order], seed=seed)
        shifted.append(membership_metrics(scores[is_member], scores[~is_member])["auc"])
    assert abs(np.mean(same) - 0.5) < 0.03
    assert np.mean(shifted) > 0.8


def test_membership_compares_like_with_like_on_a_label_skewed_site(pbmc_split, scinfl_log):
    """On a label-skewed site the earlier design (public cells as non-members, unmatched) separates members
    from non-members by the site's label mix alone; with the site's own held-out cells, matched by label,
    the model-free rows sit at 0.5 and the audit stays silent. Non-members of another batch make it warn."""
    sites, public = pbmc_split
    site = "site_0"  # 92 of its 113 cells are dendritic; the public cohort is stratified
    kept, held = si.pp.split_holdout(sites[site], label_key="bulk_labels", fraction=0.3, seed=0)
    model = si.tl.train_federated({**sites, site: kept}, key=None, **FAST)
    validation = model.validation_mask(kept, site=site)
    assert validation.sum() == model.history.query("site == @site")["n_val"].iloc[0] > 0
    with pytest.raises(ValueError, match="the run trained on"):
        model.validation_mask(sites["site_1"], site=site)

    members = label_codes(kept, model.schema, site)[~validation]
    frequency = np.bincount(members, minlength=model.schema.n_classes) / len(members)
    outside = label_codes(public, model.schema, "public")
    earlier = membership_metrics(frequency[members], frequency[outside])["auc"]
    assert earlier > 0.7

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        table = si.tl.privacy_audit(
            model,
            kept,
            key=None,
            public=public,
            site=site,
            nonmembers=held,
            attacks=("membership",),
            settings={"seeds": (0, 1)},
        )
    assert _value(table, "label frequency", "no model", "auc") == 0.5
    assert abs(_value(table, "untrained network", "no model", "auc") - 0.5) < 0.1
    assert abs(_value(table, "values alone (nearest neighbours)", "no model", "auc") - 0.5) < 0.15
    assert {"loss threshold", "LiRA (online)", "LiRA (offline)", "RMIA"} <= set(table["attack"])
    progress = [r.getMessage() for r in scinfl_log.records if r.getMessage().startswith("Audit ")]
    assert [m.split(" (")[0] for m in progress] == [
        "Audit 1 of 2: membership, seed 0",
        "Audit 2 of 2: membership, seed 1",
    ]

    other_batch = held.copy()
    other_batch.raw = ad.AnnData(held.raw.X * 1.3, var=held.raw.var)
    with pytest.warns(UserWarning, match="values alone .* separates members from non-members"):
        si.tl.privacy_audit(
            model,
            kept,
            key=None,
            public=public,
            nonmembers=other_batch,
            attacks=("membership",),
            settings={"seeds": (0,)},
        )


def test_a_family_of_ones_own_is_one_registration(keyed_audit, key, pbmc_split):
    """A new attack family is one Family: tl.privacy_audit runs it by name with its own settings, its rows
    join the table, pl.privacy draws its panel; unknown settings and families are refused by name."""
    from dataclasses import dataclass

    import matplotlib.pyplot as plt

    from scinfl.privacy.audit import Family, family_names, register_family
    from scinfl.privacy.audit.core import _FAMILIES

    @dataclass(frozen=True)
    class GuessSettings:
        guesses: int = 3

    def guess_labels(ctx, out, seed):
        rng = np.random.default_rng(seed)
        truth = ctx.data.public_y.numpy()
        for _ in range(ctx.options("guess").guesses):
            out.add(
                "guess",
                "random labels",
                "server",
                {"accuracy": float((rng.permutation(truth) == truth).mean())},
            )

    register_family(
        Family("guess", runs={"classes": guess_labels}, panel=("accuracy", "guessed"), settings=GuessSettings)
    )
    try:
        model, site, _ = keyed_audit
        _, public = pbmc_split
        assert family_names()[-1] == "guess"
        table = si.tl.privacy_audit(
            model,
            site,
            key=key,
            public=public,
            attacks=["guess"],
            settings={"seeds": (0,), "guess": {"guesses": 5}},
        )
        row = table.set_index("family").loc["guess"]
        assert (row["attack"], row["n"]) == ("random labels", 5)
        assert 0.0 < row["mean"] < 0.6  # a permutation of the labels, not the labels
        axes = si.pl.privacy(table, show=False)
        assert [axis.get_xlabel() for axis in axes] == ["guessed"]
        plt.close("all")
        with pytest.raises(
            ValueError, match=r"Unknown 'guess' audit setting\(s\) \['tries'\]; allowed: guesses"
        ):
            si.tl.privacy_audit(
                model, site, key=key, public=public, attacks=["guess"], settings={"guess": {"tries": 1}}
            )
        with pytest.raises(ValueError, match=r"Unknown audit setting\(s\) \['victims'\]"):
            si.tl.privacy_audit(model, site, key=key, public=public, settings={"victims": 1})
    finally:
        _FAMILIES.pop("guess")
