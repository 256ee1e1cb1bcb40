"""Integration across sites: ``si.tasks.Embedding(site_effects=True)`` and ``batch_key``.

Real cells with known site effects: pbmc68k_reduced's UMI counts (recovered as ``rint(expm1(raw) *
n_counts / 1e4)``), split at random into three sites, each given its own simulated capture efficiency per
gene and sequencing depth (:func:`scinfl.pp.simulate_site_effects`).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import scinfl as si
from scinfl.federation import RunSpec
from scinfl.federation.site import build_site
from scinfl.model import KeyMismatchError
from scinfl.nn import BatchwiseNorm
from scinfl.privacy.analytic import site_mean_inputs
from scinfl.privacy.utility import knn_labels
from scinfl.tasks import ModelConfig

SECRET = bytes(range(32))
# 30 rounds of a 64-wide network: enough for both models' mixing to level off on these 700 cells.
FIT = {"rounds": 30, "seed": 0}


def _counts(pbmc) -> ad.AnnData:
    values = np.rint(np.expm1(pbmc.raw.X.toarray()) * pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4)
    counts = ad.AnnData(values.astype(np.float32), obs=pbmc.obs[["bulk_labels"]].copy())
    counts.var_names = pbmc.raw.var_names
    return counts


@pytest.fixture(scope="module")
def sites(_pbmc) -> dict[str, ad.AnnData]:
    even = si.pp.split_sites(_counts(_pbmc), n_sites=3, label_key="bulk_labels", alpha=100.0, seed=0)
    return si.pp.simulate_site_effects(even, seed=0)


def _task(**options) -> si.tasks.Embedding:
    return si.tasks.Embedding(likelihood="poisson", hidden=64, **options)


def _scores(model: si.FederatedModel) -> tuple[float, float]:
    """Site mixing, and kNN label transfer from each site to the other two (mean)."""
    joint = ad.concat(model.sites, label="site")
    mixing = si.tl.site_mixing(joint, batch_key="site")
    labels, site, latent = (
        joint.obs["bulk_labels"].astype(str).to_numpy(),
        joint.obs["site"],
        joint.obsm["X_scinfl"],
    )
    transfer = [
        np.mean(knn_labels(latent[site == s], labels[site == s], latent[site != s]) == labels[site != s])
        for s in model.sites
    ]
    return mixing, float(np.mean(transfer))


@pytest.fixture(scope="module")
def trained(sites):
    key = si.FederationKey(SECRET)
    aware = si.tl.train_federated(sites, key=key, task=_task(site_effects=True), copy=True, **FIT)
    unaware = si.tl.train_federated(sites, key=key, task=_task(), copy=True, **FIT)
    return key, aware, unaware


def test_simulated_site_effects_change_counts_not_cells(sites, pbmc):
    original = si.pp.split_sites(_counts(pbmc), n_sites=3, label_key="bulk_labels", alpha=100.0, seed=0)
    for name, site in sites.items():
        before, after = original[name].X, site.X
        assert np.array_equal(after, np.round(after))
        assert after.min() >= 0
        assert list(site.obs_names) == list(original[name].obs_names)
        # a gene's counts scale by one factor per site: their ratio is constant up to the rounding
        ratio = after.sum(0) / np.maximum(before.sum(0), 1)
        assert np.std(np.log(ratio[before.sum(0) > 200])) > 0.3  # the effects are there
    assert not np.array_equal(np.asarray(original["site_0"].X), np.asarray(sites["site_0"].X))
    with pytest.raises(ValueError, match="Site 'a'.*raw counts"):
        si.pp.simulate_site_effects({"a": ad.AnnData(np.full((3, 2), 0.5, np.float32))})


def test_batchwise_norm_normalises_each_batch_by_its_own_statistics():
    torch.manual_seed(0)
    norm = BatchwiseNorm(4, 2, momentum=1.0)  # momentum 1: running statistics = the last batch's
    x = torch.cat([torch.randn(50, 4) + 5.0, 3.0 * torch.randn(50, 4) - 2.0])
    onehot = torch.zeros(100, 2)
    onehot[:50, 0] = onehot[50:, 1] = 1.0
    out = norm(x, onehot)
    for rows in (slice(0, 50), slice(50, 100)):  # each batch's shift and scale are gone
        torch.testing.assert_close(out[rows].mean(0), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[rows].std(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(norm.running_mean_0, x[:50].mean(0))
    torch.testing.assert_close(norm.running_var_1, x[50:].var(0))
    norm.eval()
    evaluated = norm(x, onehot)
    torch.testing.assert_close(evaluated[:50].mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    # a cell of an unknown batch: the mean of the known batches' statistics
    unknown = norm(x[:1], torch.zeros(1, 2))
    mean = (norm.running_mean_0 + norm.running_mean_1) / 2
    var = (norm.running_var_0 + norm.running_var_1) / 2
    torch.testing.assert_close(unknown[0], (x[0] - mean) / torch.sqrt(var + norm.eps))


def test_site_effects_mix_the_sites_and_keep_the_cell_types(trained):
    _, aware, unaware = trained
    mixing, transfer = _scores(aware)
    mixing_before, transfer_before = _scores(unaware)
    # Measured: 0.90 against 0.64, label transfer 0.76 against 0.76 (sites fully mixed: 1); over split
    # and simulation seeds 0-2: 0.90-0.94 against 0.58-0.64.
    assert mixing > 0.85, (mixing, mixing_before)
    assert mixing > mixing_before + 0.1, (mixing, mixing_before)
    assert transfer > transfer_before - 0.03, (transfer, transfer_before)


def test_the_encoder_reads_the_features_and_each_site_its_own_batch_parameters(trained, sites):
    key, aware, _ = trained
    assert aware.task.batches(aware.schema) == ("site_0", "site_1", "site_2")
    spec = RunSpec(task=aware.task, sites=tuple(sites), key_fingerprint=key.fingerprint, scheme="hardened")
    trainer = build_site(spec, aware.config, sites["site_1"], "site_1", key)
    trained_names = set(trainer._trained)
    batch_entries = {n for n in aware.network.state_dict() if "batch_shifts" in n or "running_" in n}
    own = {n for n in batch_entries if n.endswith(("_shifts.1", "mean_1", "var_1"))}
    assert own
    assert batch_entries & trained_names == own
    # Each site's shift moved from zero, trained where its cells are.
    shifts = [aware.network.state_dict()[f"network.batch_shifts.{i}"] for i in range(3)]
    assert all(float(s.abs().mean()) > 1e-3 for s in shifts)
    # The batch flags choose statistics only: the first layer reads the features, not them.
    rows = torch.from_numpy(aware.inputs(sites["site_0"], site="site_0").rows(np.arange(5)))
    assert rows.shape[1] == aware.schema.n_features + 3
    assert bool((rows[:, -3] == 1).all())
    first = next(m for m in aware.network.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == aware.schema.n_features


def test_a_site_outside_the_federation_is_embedded_without_retraining(trained, sites):
    key, aware, _ = trained
    outside = sites["site_2"].copy()
    predicted = aware.predict(outside, key=key, site="new hospital").embedding
    assert np.isfinite(predicted).all()
    # Its cells land next to the same cell types of the training sites (no batch of its own).
    joint = ad.concat({k: v for k, v in aware.sites.items() if k != "site_2"})
    labels = outside.obs["bulk_labels"].astype(str).to_numpy()
    reference = joint.obs["bulk_labels"].astype(str).to_numpy()
    accuracy = np.mean(knn_labels(joint.obsm["X_scinfl"], reference, predicted) == labels)
    own = np.mean(
        knn_labels(joint.obsm["X_scinfl"], reference, aware.sites["site_2"].obsm["X_scinfl"]) == labels
    )
    assert accuracy > own - 0.05, (accuracy, own)


def test_batch_key_conditions_a_central_model_on_batches_within_a_site(sites):
    pooled = ad.concat(sites, label="donor", index_unique="-")
    options = {"key": None, "copy": True, "secure_aggregation": False, **FIT}
    aware = si.tl.train_federated({"all": pooled}, task=_task(batch_key="donor"), **options)
    unaware = si.tl.train_federated({"all": pooled}, task=_task(), **options)
    assert aware.task.batches(aware.schema) == ("site_0", "site_1", "site_2")
    after = si.tl.site_mixing(aware.sites["all"], batch_key="donor")
    before = si.tl.site_mixing(unaware.sites["all"], batch_key="donor")
    assert after > before + 0.2, (after, before)


def test_saved_site_aware_models_predict_the_same(trained, sites, tmp_path):
    key, aware, _ = trained
    loaded = si.FederatedModel.load(aware.save(tmp_path / "model"))
    assert loaded.schema == aware.schema
    for site in ("site_0", "new"):
        np.testing.assert_array_equal(
            loaded.predict(sites["site_0"], key=key, site=site).embedding,
            aware.predict(sites["site_0"], key=key, site=site).embedding,
        )


def test_site_effect_options_are_checked(sites):
    with pytest.raises(ValueError, match="batch_key and label_key are both 'x'"):
        si.tasks.Embedding(batch_key="x", label_key="x")
    with pytest.raises(ValueError, match="Site 'site_0'.*'donor'.*missing"):
        si.tl.train_federated(sites, key=None, task=_task(batch_key="donor"), rounds=1)
    with pytest.raises(NotImplementedError, match="DP-SGD"):
        si.tl.train_federated(sites, key=None, task=_task(site_effects=True), rounds=1, dp={"epsilon": 8.0})
    config = ModelConfig(
        task=_task(site_effects=True),
        schema=si.tasks.Embedding().agree(
            {
                "a": {
                    "var_names": ["g"],
                    "categories": [],
                    "covariates": {},
                    "label_key": None,
                    "layer": None,
                    "use_raw": False,
                    "n_obs": 3,
                }
            },
            join="inner",
        ),
    )
    assert si.tasks.Embedding.batches(config.schema) == ()  # an unconditioned task records no batches


def test_the_audit_attacks_the_features_of_a_site_aware_model(trained, sites):
    """The first layer's leak is compared with the cell's features, not with its batch flags too."""
    key, aware, _ = trained
    audited = sites["site_0"].copy()
    table = si.tl.privacy_audit(
        aware,
        audited,
        key=key,
        public=sites["site_1"],
        site="site_0",
        label_key="bulk_labels",
        attacks=("analytic",),
        settings={"seeds": (0,)},
    )
    truth = audited.uns["scinfl_privacy_examples"]["truth"]
    assert len(truth) == aware.schema.n_features
    leak = table.query("attack == 'first layer (dW / db)' and metric == 'pearson'")
    assert len(leak) == 1
    assert np.isfinite(leak["mean"]).all()


def test_a_new_site_maps_into_the_latent_without_changing_the_consortium(trained, sites):
    """scArches-style query mapping: the new site trains only its own batch parameters."""
    key, full, unaware = trained
    two = {name: site for name, site in sites.items() if name != "site_2"}
    options = {
        "key": key,
        "task": _task(site_effects=True),
        "secure_aggregation": {"min_cohort": 2},
        "copy": True,
        **FIT,
    }
    consortium = si.tl.train_federated(two, **options)
    before = {name: tensor.clone() for name, tensor in consortium.network.state_dict().items()}
    new_site = sites["site_2"].copy()
    mapped = si.tl.map_site(new_site, consortium, key=key, site="site_2")
    assert mapped.task.batches(mapped.schema) == ("site_0", "site_1", "site_2")
    assert mapped.params["mapped"] == {"site_2": 20}
    after = mapped.network.state_dict()
    for name, tensor in before.items():  # every consortium weight and statistic, bit for bit
        assert torch.equal(after[name], tensor), name
        assert torch.equal(consortium.network.state_dict()[name], tensor), name  # the old model untouched
    assert float(after["network.encoder.1.running_mean_2"].abs().mean()) > 0.05  # its own statistics
    assert "X_scinfl" in new_site.obsm
    assert dict(new_site.uns["scinfl"]["params"]["mapped"]) == {"site_2": 20}

    # Its cells land next to the same cell types of the training sites, as well as (within 0.03) when the
    # site trained with the federation. Measured: 0.759 against 0.776 (seeds 0-2: 0.017-0.022 below).
    def transfer(model: si.FederatedModel, embedding: np.ndarray) -> float:
        reference = ad.concat({name: model.sites[name] for name in two})
        labels = reference.obs["bulk_labels"].astype(str).to_numpy()
        predicted = knn_labels(reference.obsm["X_scinfl"], labels, embedding)
        return float(np.mean(predicted == new_site.obs["bulk_labels"].astype(str).to_numpy()))

    mapped_transfer = transfer(consortium, new_site.obsm["X_scinfl"])
    joined_transfer = transfer(full, full.sites["site_2"].obsm["X_scinfl"])
    assert mapped_transfer > joined_transfer - 0.03, (mapped_transfer, joined_transfer)

    with pytest.raises(ValueError, match="batch 'site_0' is already in the model"):
        si.tl.map_site(sites["site_0"], consortium, key=key, site="site_0")
    with pytest.raises(ValueError, match="map_site needs a site-aware model"):
        si.tl.map_site(new_site, unaware, key=key, site="site_2")
    with pytest.raises(KeyMismatchError):
        si.tl.map_site(new_site, consortium, key=si.FederationKey(bytes(32)), site="site_2")


def test_a_server_reads_site_means_from_site_statistics_of_plain_models_only(trained, sites):
    """Each site's normalisation statistics reach the server as they are: for plain FedAvg they give
    away the site's mean profile within the first layer's row space (the positive control); under the
    hardened key they are in its mixed basis. ``benchmarks/site_statistics.py`` measures both."""
    _, hardened, _ = trained
    plain = si.tl.train_federated(sites, key=None, task=_task(site_effects=True), **FIT)
    truths = np.stack([np.log1p(sites[name].X).mean(0) for name in hardened.task.batches(hardened.schema)])
    truths -= truths.mean(0)
    for model, expected in ((plain, "read"), (hardened, "hidden")):
        state = model.network.state_dict()
        estimates = site_mean_inputs(state)
        estimates -= estimates.mean(0)  # each site's deviation from the sites' mean
        weight = next(t for n, t in state.items() if n.endswith("encoder.0.weight")).double().numpy()
        row_space = np.linalg.pinv(weight) @ weight
        scores = [np.corrcoef(e, row_space @ t)[0, 1] for e, t in zip(estimates, truths, strict=True)]
        if expected == "read":
            assert min(scores) > 0.9, scores  # measured 0.97-0.98
        else:
            assert max(np.abs(scores)) < 0.3, scores  # measured within 0.24 over 9 sites


def test_site_mixing_is_one_for_random_sites_and_near_zero_for_sites_that_are_clusters(pbmc):
    cells = pbmc.copy()
    cells.obs["random site"] = np.random.default_rng(0).choice(["a", "b", "c"], size=cells.n_obs)
    cells.obs["cluster site"] = cells.obs["louvain"].astype(str)
    random = si.tl.site_mixing(cells, batch_key="random site", use_rep="X_pca")
    assert 0.9 < random < 1.1
    assert cells.obs["site_mixing"].shape == (cells.n_obs,)
    clustered = si.tl.site_mixing(cells, batch_key="cluster site", use_rep="X_pca", key_added="m")
    assert clustered < 0.2
    with pytest.raises(ValueError, match="holds one batch"):
        si.tl.site_mixing(
            cells[cells.obs["random site"] == "a"].copy(), batch_key="random site", use_rep="X_pca"
        )
    with pytest.raises(ValueError, match=r"No .obsm\['X_scinfl'\]"):
        si.tl.site_mixing(cells, batch_key="random site")
