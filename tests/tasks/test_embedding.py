"""task="embedding": a keyed autoencoder whose latent feeds scanpy's neighbours and Leiden."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from sklearn.metrics import adjusted_rand_score

import scinfl as si
from scinfl.data import FederationSchema
from scinfl.nn.networks import DISPERSION_STEP
from scinfl.tasks import ModelConfig
from scinfl.tasks.embedding import check_counts
from scinfl.train import SiteTrainer

pytest.importorskip("igraph")  # scanpy's Leiden

# 60 rounds: where the federated autoencoder's validation loss levels off on these 700 cells.
N_LATENT = 16
EMBED = {
    "task": si.tasks.Embedding(hidden=128, n_latent=N_LATENT),
    "rounds": 60,
    "seed": 0,
    "secure_aggregation": {"min_cohort": 2},
}
SECRET = bytes(range(32))  # a fixed hardened key; hardened training does not depend on the key's bytes


def _leiden_ari(embedding: np.ndarray, labels) -> float:
    cells = ad.AnnData(obs={"label": np.asarray(labels)}, obsm={"rep": embedding})
    sc.pp.neighbors(cells, use_rep="rep", random_state=0)
    sc.tl.leiden(cells, random_state=0, flavor="igraph", n_iterations=2, directed=False)
    return adjusted_rand_score(cells.obs["label"], cells.obs["leiden"])


def _registered(adata: ad.AnnData) -> ad.AnnData:
    """A copy of pbmc68k_reduced registered with use_raw=True (its log-normalised values are in .raw)."""
    adata = adata.copy()
    si.pp.register_site(adata, use_raw=True)
    return adata


def _objective(task: si.tasks.Embedding, n_features: int, measured: np.ndarray | None = None):
    """The task's objective for a network of ``n_features`` features (a site measuring ``measured``)."""
    names = tuple(f"g{i}" for i in range(n_features))
    schema = FederationSchema(names, (), label_key=None, layer=None, use_raw=False, join="inner")
    return task.objective(ModelConfig(task=task, schema=schema), measured)


@pytest.fixture(scope="module")
def embedded(_pbmc):
    key = si.FederationKey(SECRET)
    pbmc = _registered(_pbmc)
    sites = si.pp.split_sites(pbmc, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=0)
    model = si.tl.train_federated(sites, key=key, **EMBED)
    central = si.tl.train_federated({"all": pbmc}, key=key, **{**EMBED, "secure_aggregation": False})
    return key, sites, model, central


def test_federated_embedding_clusters_like_central_and_pca(embedded, pbmc):
    key, sites, model, central = embedded
    labels = pbmc.obs["bulk_labels"]
    # Leiden's ARI moves by about 0.02-0.03 from seed to seed: compare means over two seeds
    second = {"seed": 1}
    federated = np.mean(
        [
            _leiden_ari(m.predict(pbmc, key=key).embedding, labels)
            for m in (model, si.tl.train_federated(sites, key=key, copy=True, **{**EMBED, **second}))
        ]
    )
    centralised = np.mean(
        [
            _leiden_ari(m.predict(pbmc, key=key).embedding, labels)
            for m in (
                central,
                si.tl.train_federated(
                    {"all": pbmc}, key=key, copy=True, **{**EMBED, **second, "secure_aggregation": False}
                ),
            )
        ]
    )
    pca = _leiden_ari(pbmc.obsm["X_pca"], labels)
    # the targets: within 0.05 of the same autoencoder trained centrally, and of PCA + Leiden
    assert federated > centralised - 0.05
    assert federated > pca - 0.05


def test_write_back_is_the_latent_only(embedded, pbmc):
    key, sites, model, _ = embedded
    for adata in sites.values():
        assert adata.obsm["X_scinfl"].shape == (adata.n_obs, N_LATENT)
        assert adata.obsm["X_scinfl"].dtype == np.float32
        assert not {"scinfl_prediction", "scinfl_confidence"} & set(adata.obs)
        assert "scinfl_probabilities" not in adata.obsm
        assert adata.uns["scinfl"]["params"]["task"]["name"] == "embedding"
        assert adata.uns["scinfl"]["params"]["task"]["n_latent"] == N_LATENT
    site = sites["site_0"]
    np.testing.assert_array_equal(site.obsm["X_scinfl"], model.predict(site, key=key).embedding)
    sc.pp.neighbors(site, use_rep="X_scinfl")  # what scanpy users do next
    sc.tl.leiden(site, flavor="igraph", n_iterations=2, directed=False)
    assert site.obs["leiden"].nunique() > 1
    with pytest.raises(ValueError, match="predicts no classes"):
        _ = model.predict(site, key=key).labels


def test_wrong_keys_give_a_useless_embedding(embedded, pbmc):
    key, _, model, _ = embedded
    labels = pbmc.obs["bulk_labels"]
    right = _leiden_ari(model.predict(pbmc, key=key).embedding, labels)
    wrong = [
        _leiden_ari(
            model.predict(pbmc, key=si.FederationKey(bytes([i] * 32)), check_key=False).embedding, labels
        )
        for i in (1, 2, 3)
    ]
    keyless = _leiden_ari(model.predict(pbmc, key=None, check_key=False).embedding, labels)
    assert np.mean(wrong) < right - 0.2
    assert keyless < right - 0.2


def test_save_load_and_embed_new_cells(embedded, pbmc, tmp_path):
    key, _, model, _ = embedded
    loaded = si.FederatedModel.load(model.save(tmp_path / "model"))
    assert loaded.task == EMBED["task"]
    assert loaded.task.name == "embedding"
    assert loaded.task.n_latent == N_LATENT
    query = pbmc[:50].copy()
    si.tl.predict(query, loaded, key=key)
    np.testing.assert_array_equal(query.obsm["X_scinfl"], model.predict(pbmc[:50], key=key).embedding)


def test_poisson_loss_is_the_count_likelihood():
    counts = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 2.0]])
    logits = torch.tensor([[0.1, 1.2, -0.3], [0.5, -1.0, 0.0]])
    rate = torch.softmax(logits, dim=1) * counts.sum(dim=1, keepdim=True)
    expected = torch.nn.functional.poisson_nll_loss(rate.log(), counts, log_input=True, full=False)
    labels = torch.zeros(2, dtype=torch.int64)  # an autoencoder's objective ignores them
    poisson = _objective(si.tasks.Embedding(likelihood="poisson"), 3)
    torch.testing.assert_close(poisson.loss(logits, counts, labels), expected)
    gaussian = _objective(si.tasks.Embedding(likelihood="gaussian"), 3).loss(logits, counts, labels)
    torch.testing.assert_close(gaussian, ((logits - counts) ** 2).mean())
    with pytest.raises(ValueError, match="likelihood"):
        si.tasks.Embedding(likelihood="negative-binomial")


@pytest.mark.parametrize(
    ("likelihood", "scheme"), [("poisson", "hardened"), ("nb", "hardened"), ("nb", "infl")]
)
def test_count_autoencoders_learn_counts(pbmc, likelihood, scheme):
    # Integer counts back from the log-normalised values (scanpy's log1p of counts scaled per cell).
    counts = np.rint(np.expm1(pbmc.raw.X.toarray() if hasattr(pbmc.raw.X, "toarray") else pbmc.raw.X))
    cells = ad.AnnData(counts.astype(np.float32), obs=pbmc.obs[["bulk_labels"]].copy())
    cells.var_names = pbmc.raw.var_names
    sites = si.pp.split_sites(cells, n_sites=2, label_key="bulk_labels", alpha=5.0, seed=0)
    key = si.FederationKey(SECRET, scheme=scheme)
    model = si.tl.train_federated(
        sites,
        key=key,
        **{**EMBED, "rounds": 15, "task": EMBED["task"].replace(likelihood=likelihood)},
    )
    loss = model.history.groupby("round")["val_loss"].mean()
    assert loss.iloc[-1] < 0.8 * loss.iloc[0]
    assert model.task.likelihood == likelihood
    state = model.network.state_dict()
    dispersion = [name for name in state if name.endswith("dispersion")]
    if likelihood == "poisson":
        assert not dispersion
        return
    # one inverse dispersion per gene, learned from the sites' counts (it starts at 0 for every gene)
    (name,) = dispersion
    assert state[name].shape == (cells.n_vars,)
    log_theta = state[name] * DISPERSION_STEP
    assert log_theta.std() > 0.1  # measured: 0.15 after 15 rounds
    # the embedding is the latent, whatever the likelihood; a wrong key gives another one
    right = model.predict(sites["site_0"], key=key).embedding
    wrong = model.predict(
        sites["site_0"], key=si.FederationKey.generate(scheme=scheme), check_key=False
    ).embedding
    assert right.shape == (sites["site_0"].n_obs, EMBED["task"].n_latent)
    assert not np.allclose(right, wrong)


def test_nb_is_refused_where_it_is_not_built(pbmc):
    with pytest.raises(ValueError, match="likelihood must be one of 'gaussian', 'poisson', 'clr'"):
        si.tasks.Mosaic(likelihood="nb")
    with pytest.raises(NotImplementedError, match="DP-SGD"):
        si.tl.train_federated(
            {"a": pbmc}, key=None, task=si.tasks.Embedding(likelihood="nb"), dp={"epsilon": 8.0}
        )


@pytest.fixture(scope="module")
def audited(_pbmc):
    train, public = si.pp.split_holdout(_registered(_pbmc), label_key="bulk_labels", fraction=0.3, seed=0)
    sites = si.pp.split_sites(train, n_sites=3, label_key="bulk_labels", alpha=0.5, seed=0)
    tables = {}
    for scheme in ("hardened", "infl"):
        key = si.FederationKey(SECRET, scheme=scheme)
        model = si.tl.train_federated(sites, key=key, copy=True, **{**EMBED, "rounds": 30})
        tables[scheme] = si.tl.privacy_audit(
            model,
            sites["site_0"],
            key=key,
            public=public,
            label_key="bulk_labels",
            settings={"seeds": (0,), "n_victims": 8, "utility": {"n_wrong_keys": 3}},
        )
    return tables


def _value(table, attack: str, view: str, metric: str) -> float:
    row = table[(table["attack"] == attack) & (table["view"] == view) & (table["metric"] == metric)]
    assert len(row) == 1, (attack, view, metric)
    return float(row["mean"].iloc[0])


def test_audit_of_embedding_models_reads_the_reconstruction_gradient(audited):
    hardened, infl = audited["hardened"], audited["infl"]
    assert set(hardened["family"]) == {"utility", "analytic", "geometry", "prior"}
    # The paper's scheme: the server reads each cell exactly from the first layer's dW / db, without the key.
    assert _value(infl, "first layer (dW / db)", "server", "pearson_minus_mean") > 0.99
    # The hardened scheme: the same attack on the same kind of gradient gives little.
    assert _value(hardened, "first layer (dW / db)", "server", "pearson_minus_mean") < 0.3
    transfer = "kNN label transfer"
    right = _value(hardened, transfer, "right key", "balanced_accuracy")
    assert right > _value(hardened, transfer, "wrong key", "balanced_accuracy") + 0.05
    assert right > _value(hardened, transfer, "chance", "balanced_accuracy") + 0.15
    assert _value(hardened, transfer, "input profiles (no model)", "balanced_accuracy") > 0.1


def test_audit_of_embedding_models_matches_geometry_in_both_server_views(audited):
    """The reconstruction gradient leaks each cell's geometry as a classifier's does (the positive
    control), and the secure sum's vectors tell the server no victim's cell type or own cell."""
    per_site, secure = "server, one site's single-cell gradients", "server, secure sum"
    for table in audited.values():
        majority = _value(table, "majority class", "free", "accuracy")
        # measured: 0.47 and 0.51 against 0.38; top-1 linkage 42x and 152x chance
        assert _value(table, "cell type", per_site, "accuracy") > majority + 0.05
        assert _value(table, "linkage", per_site, "top1_x_chance") > 10
        assert _value(table, "cell type", secure, "accuracy") <= majority + 0.05
        assert _value(table, "reconstruction", secure, "pearson_minus_mean") <= 0.1
        assert _value(table, "linkage", secure, "mrr_x_chance") <= 2


def test_audit_refuses_attacks_that_need_classes(embedded, pbmc):
    key, sites, model, _ = embedded
    with pytest.raises(ValueError, match="'utility', 'analytic', 'geometry' only"):
        si.tl.privacy_audit(
            model, sites["site_0"], key=key, public=pbmc, attacks=["inversion"], label_key="bulk_labels"
        )
    with pytest.raises(ValueError, match="trained without labels: pass label_key"):
        si.tl.privacy_audit(model, sites["site_0"], key=key, public=pbmc)


@pytest.mark.parametrize("likelihood", ["gaussian", "poisson"])
def test_loss_ignores_features_a_site_does_not_measure(likelihood):
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 6, (4, 6), generator=generator).float()
    measured = torch.tensor([True, True, False, True, False, True])
    output = torch.randn(4, 6, generator=generator, requires_grad=True)
    labels = torch.zeros(4, dtype=torch.int64)
    task = si.tasks.Embedding(likelihood=likelihood)
    loss = _objective(task, 6, measured.numpy()).loss(output, counts, labels)
    (grad,) = torch.autograd.grad(loss, output)
    assert torch.all(grad[:, ~measured] == 0)  # an unmeasured gene's reconstruction is free
    assert torch.all(grad[:, measured].abs().sum(0) > 0)
    # the same loss as a task over the measured genes alone
    alone = _objective(task, int(measured.sum())).loss(output[:, measured], counts[:, measured], labels)
    torch.testing.assert_close(loss, alone)


def test_sites_with_different_panels_mask_their_absent_genes(pbmc):
    genes = pbmc.raw.var_names
    a = ad.AnnData(pbmc.raw.X[:350, :500], obs=pbmc.obs[:350][[]], var=pd.DataFrame(index=genes[:500]))
    b = ad.AnnData(pbmc.raw.X[350:, 265:], obs=pbmc.obs[350:][[]], var=pd.DataFrame(index=genes[265:]))
    sites = {"a": a, "b": b}
    seen = {}
    fit = SiteTrainer.fit

    def record(self, *args, **kwargs):
        seen[self.name] = self.objective.measured.clone()
        return fit(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SiteTrainer, "fit", record)
        model = si.tl.train_federated(
            sites, key=si.FederationKey(SECRET), join="outer", **{**EMBED, "rounds": 2}
        )
    assert model.schema.n_features == len(genes)
    order = pd.Index(model.schema.var_names)
    assert seen["a"].sum() == 500
    assert seen["b"].sum() == len(genes) - 265
    assert set(order[seen["a"].numpy()]) == set(genes[:500])
    assert set(order[seen["b"].numpy()]) == set(genes[265:])
    assert a.obsm["X_scinfl"].shape == (350, N_LATENT)


def test_a_count_likelihood_checks_for_counts():
    """pbmc68k_reduced's .X is scaled (negative values): Poisson refuses it, naming the site; its .raw is
    log-normalised (not whole numbers): Poisson warns. Nothing trains to NaN in silence."""
    pbmc = sc.datasets.pbmc68k_reduced()
    task = si.tasks.Embedding(likelihood="poisson", hidden=32, n_latent=4)
    scaled = si.pp.split_sites(pbmc, n_sites=2, label_key="bulk_labels", alpha=100.0, seed=0)
    with pytest.raises(ValueError, match=r"Site 'site_0': likelihood='poisson' models raw counts.*negative"):
        si.tl.train_federated(scaled, key=None, task=task, rounds=1, secure_aggregation={"min_cohort": 2})
    assert "X_scinfl" not in scaled["site_0"].obsm
    logged = si.pp.split_sites(pbmc.raw.to_adata(), n_sites=2, label_key="bulk_labels", alpha=100.0, seed=0)
    with pytest.warns(UserWarning, match=r"Site 'site_1': likelihood='poisson'.*not whole numbers"):
        si.tl.train_federated(logged, key=None, task=task, rounds=1, secure_aggregation={"min_cohort": 2})
    counts = np.round(np.expm1(logged["site_0"].X.toarray()))  # whole numbers again
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        check_counts(counts, "poisson", "site_0")
