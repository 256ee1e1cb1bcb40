"""The privacy audit end to end on real PBMCs (CI-sized): it reproduces the paper scheme's known weaknesses,
its positive controls hold, and DP-SGD's clipped and noised payloads are what the attacks face."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

import scinfl as si
from helpers import FAST
from scinfl.privacy.audit import COLUMNS
from scinfl.privacy.gradients import PrivateGradient, client_gradient

SMALL = {
    "seeds": (0,),
    "n_victims": 6,
    "n_wrong_keys": 4,
    "inversion_victims": 2,
    "inversion_batches": (8,),
    "inversion_steps": 150,
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
    assert examples["truth"].shape == examples["first layer (dW / db) | server"].shape
    # audit tables concatenate (pandas compares their attrs, which hold the example arrays)
    both = pd.concat([table.assign(model="a"), table.copy().assign(model="b")])
    assert len(both) == 2 * len(table)


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
