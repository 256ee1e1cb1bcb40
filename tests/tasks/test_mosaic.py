"""task="mosaic": MuData and one-modality AnnData sites, one encoder per modality, per-parameter FedAvg."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import scinfl as si
from helpers import key_secrets, serialised
from scinfl.data import FederationSchema, MosaicMatrix, site_modalities
from scinfl.federation import RunSpec, build_site, fedavg, initial_weights
from scinfl.nn import modality_parameter_names, use_key
from scinfl.privacy.audit import wrong_key
from scinfl.privacy.utility import knn_labels
from scinfl.tasks import ModelConfig, build_network
from scinfl.train import FitSettings, key_material

md = pytest.importorskip("mudata")

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # /work/shared/data beside the checkout
CITESEQ = DATA / "pbmc_citeseq_10k5k_subset.h5mu"
# celltype_adt_gate is a rule-based gate on CLR-normalised ADT: a heuristic label, not an annotation.
GATE = "celltype_adt_gate"

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning:mudata.*", "ignore:Cannot join columns:UserWarning"
)


def _transfer(reference, reference_labels, query, query_labels) -> float:
    """kNN (15) label transfer accuracy from reference cells to query cells."""
    categories = sorted(set(reference_labels) | set(query_labels))
    ref = np.searchsorted(categories, np.asarray(reference_labels))
    truth = np.searchsorted(categories, np.asarray(query_labels))
    return float(np.mean(knn_labels(reference, ref, query) == truth))


@pytest.fixture
def pseudo_mosaic(pbmc):
    """pbmc68k_reduced's log-normalised .raw cut into two pseudo-modalities ("rna": the first 600 genes,
    "prot": the other 165), and its cells into a paired MuData site and an RNA-only AnnData site."""
    full = pbmc.raw.to_adata()
    full.uns.pop("scinfl")  # pbmc's registration (use_raw=True): the pseudo-modalities are in .X
    full.obs["bulk_labels"] = pbmc.obs["bulk_labels"].astype(str)
    order = np.random.default_rng(0).permutation(full.n_obs)
    first, second = np.sort(order[:350]), np.sort(order[350:])
    paired = md.MuData({"rna": full[first, :600].copy(), "prot": full[first, 600:].copy()})
    paired.obs["bulk_labels"] = full.obs["bulk_labels"].iloc[first].to_numpy()
    rna_only = full[second, :600].copy()
    return {"paired": paired, "rna_only": rna_only}


MOSAIC_TASK = si.tasks.Mosaic(hidden=128, n_latent=8, label_key="bulk_labels")
MOSAIC = {"task": MOSAIC_TASK, "rounds": 30, "seed": 0, "secure_aggregation": {"min_cohort": 2}}


def _small(rounds: int, **options) -> dict:
    """MOSAIC with fewer rounds and a narrower network (or other task options)."""
    return MOSAIC | {"rounds": rounds, "task": MOSAIC_TASK.replace(**{"hidden": 32, **options})}


# --- FedAvg: each parameter over the sites that hold it ------------------------------------------------


def test_fedavg_averages_each_parameter_over_its_holders():
    base = {"shared": torch.zeros(2), "rna": torch.zeros(2), "prot": torch.full((2,), 7.0)}
    both = {"shared": torch.tensor([1.0, 1.0]), "rna": torch.tensor([2.0, 2.0])}
    paired = {"shared": torch.tensor([4.0, 4.0]), "rna": torch.tensor([5.0, 5.0])}
    rna_only = {"shared": torch.tensor([10.0, 10.0]), "rna": torch.tensor([8.0, 8.0])}
    paired["prot"] = torch.tensor([3.0, 3.0])
    out = fedavg([both, paired, rna_only], [1.0, 2.0, 1.0], base=base)
    torch.testing.assert_close(out["shared"], torch.full((2,), (1 + 8 + 10) / 4))
    torch.testing.assert_close(out["rna"], torch.full((2,), (2 + 10 + 8) / 4))
    torch.testing.assert_close(out["prot"], torch.full((2,), 3.0))  # only the paired site holds it
    # A parameter no update holds keeps its global value (a copy, not the tensor itself).
    out = fedavg([both], [3.0], base=base)
    torch.testing.assert_close(out["prot"], base["prot"])
    assert out["prot"] is not base["prot"]
    with pytest.raises(ValueError, match="the global model lacks"):
        fedavg([{"other": torch.zeros(2)}], [1.0], base=base)
    with pytest.raises(ValueError, match="other parameters"):  # without a base: same entries everywhere
        fedavg([both, paired], [1.0, 1.0])


def test_rna_only_site_trains_and_sends_only_its_modules(pseudo_mosaic, key):
    task = si.tasks.Mosaic(hidden=32, n_latent=8)
    spec = RunSpec(
        task=task,
        sites=tuple(pseudo_mosaic),
        key_fingerprint=key.fingerprint,
        scheme=key.scheme,
        fit=FitSettings(lr=1e-2, weight_decay=0.1),
        min_cohort=2,
    )
    schema = task.agree(
        {name: task.describe(data, name) for name, data in pseudo_mosaic.items()}, join="inner"
    )
    config = spec.model_config(schema)
    network = build_network(config)
    matrix = task.inputs(pseudo_mosaic["rna_only"], "rna_only", schema)
    assert matrix.modalities == ("rna",)
    site = build_site(spec, config, pseudo_mosaic["rna_only"], "rna_only", key)  # as every engine builds it
    initial = initial_weights(config, spec.seed, key)
    before = {k: v.clone() for k, v in initial.items()}
    result = site.fit(initial, seed=0)
    absent = set(before) - modality_parameter_names(network, ["rna"])
    assert absent
    assert all(".prot." in name for name in absent)
    assert not absent & set(result.state)  # the update holds no protein module
    for name in absent:  # weight decay 0.1 and lr 1e-2 did not move them either
        torch.testing.assert_close(site.network.state_dict()[name], before[name], rtol=0, atol=0)
    moved = [n for n in result.state if ".rna." in n and not torch.equal(result.state[n], before[n])]
    assert moved  # the RNA modules did train


def test_mosaic_matrix_reads_each_cells_modalities():
    rna = ad.AnnData(np.arange(12, dtype=np.float32).reshape(4, 3))
    rna.var_names = ["a", "b", "c"]
    rna.obs_names = ["c0", "c1", "c2", "c3"]
    prot = ad.AnnData(np.array([[100.0, 200.0], [300.0, 400.0]], dtype=np.float32))
    prot.var_names = ["p", "q"]
    prot.obs_names = ["c3", "c1"]  # two cells of four, in another order
    mdata = md.MuData({"rna": rna, "prot": prot})
    schema = FederationSchema(
        var_names=("rna:c", "rna:a", "prot:q", "prot:p"),
        categories=(),
        label_key=None,
        layer=None,
        use_raw=False,
        join="inner",
        modalities=(("rna", 2), ("prot", 2)),
    )
    position = {name: i for i, name in enumerate(mdata.obs_names)}
    matrix = MosaicMatrix(site_modalities(mdata, "s"), schema, mdata.n_obs, "s")
    rows = matrix.rows(np.array([position["c1"], position["c0"], position["c3"]]))
    np.testing.assert_array_equal(
        rows,
        [[5, 3, 400, 300, 1, 1], [2, 0, 0, 0, 1, 0], [11, 9, 200, 100, 1, 1]],
    )
    assert FederationSchema.from_dict(schema.to_dict()) == schema


# --- end to end on pbmc68k_reduced (always runs) -------------------------------------------------------


def test_mosaic_end_to_end_on_pseudo_modalities(pseudo_mosaic, key, tmp_path):
    sites = pseudo_mosaic
    paired_before = sites["paired"].copy()
    model = si.tl.train_federated(sites, key=key, copy=True, **MOSAIC)
    out = model.sites
    # copy=True: the caller's sites are untouched
    assert "X_scinfl" not in sites["paired"].obsm
    assert "scinfl" not in sites["paired"].uns
    assert "X_scinfl" not in sites["rna_only"].obsm
    assert (sites["paired"]["prot"].X != paired_before["prot"].X).nnz == 0
    assert list(sites["paired"].obs.columns) == list(paired_before.obs.columns)
    # Outputs: on the MuData itself, and on the AnnData
    z_paired, z_rna = out["paired"].obsm["X_scinfl"], out["rna_only"].obsm["X_scinfl"]
    assert z_paired.shape == (350, 8)
    assert z_rna.shape == (350, 8)
    assert out["paired"].uns["scinfl"]["key_fingerprint"] == key.fingerprint
    assert model.schema.modalities == (("rna", 600), ("prot", 165))
    # each site trained on the modalities it holds
    held = {name: model.inputs(site, site=name).modalities for name, site in out.items()}
    assert held == {"paired": ("rna", "prot"), "rna_only": ("rna",)}
    # RNA-only cells land next to the same cell types of the paired site
    labels = {name: site.obs["bulk_labels"].astype(str).to_numpy() for name, site in out.items()}
    accuracy = _transfer(z_paired, labels["paired"], z_rna, labels["rna_only"])
    chance = np.unique(labels["rna_only"], return_counts=True)[1].max() / 350
    assert accuracy > chance + 0.2, (accuracy, chance)

    # predict on new data: a MuData, a one-modality AnnData, an AnnData of the other modality
    again = model.predict(sites["paired"], key=key).embedding
    np.testing.assert_allclose(again, z_paired, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        model.predict(sites["rna_only"], key=key).embedding, z_rna, rtol=1e-5, atol=1e-6
    )
    prot_only = sites["paired"]["prot"].copy()
    z_prot = model.predict(prot_only, key=key, modality="prot").embedding
    assert z_prot.shape == (350, 8)
    assert not np.allclose(z_prot, z_paired)
    query = sites["rna_only"].copy()
    si.tl.predict(query, model, key=key)
    np.testing.assert_allclose(query.obsm["X_scinfl"], z_rna, rtol=1e-5, atol=1e-6)
    mquery = si.tl.predict(sites["paired"], model, key=key, copy=True)
    np.testing.assert_allclose(mquery.obsm["X_scinfl"], z_paired, rtol=1e-5, atol=1e-6)
    registered = prot_only.copy()
    si.pp.register_site(registered, site="b", modality="prot")
    np.testing.assert_allclose(model.predict(registered, key=key).embedding, z_prot, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="modality 'protein'"):
        model.predict(prot_only, key=key, modality="protein")
    with pytest.raises(ValueError, match="Site 'query' is a MuData: its modalities are named by its .mod"):
        model.predict(sites["paired"], key=key, modality="rna")

    # save / load round-trip; no key material in the files
    model.save(tmp_path / "model")
    loaded = si.FederatedModel.load(tmp_path / "model")
    assert loaded.config == model.config
    assert loaded.schema == model.schema
    np.testing.assert_allclose(
        loaded.predict(sites["paired"], key=key).embedding, again, rtol=1e-6, atol=1e-6
    )
    blobs = [path.read_bytes() for path in (tmp_path / "model").iterdir()]
    blobs.append(serialised(model.network.state_dict()))
    for blob in blobs:
        for secret in key_secrets(key):
            assert secret not in blob


def test_mosaic_is_deterministic_and_keyed(pseudo_mosaic):
    key = si.FederationKey(hashlib.sha256(b"scinfl mosaic test key").digest(), scheme="hardened")
    options = _small(3)
    first = si.tl.train_federated(pseudo_mosaic, key=key, copy=True, **options).sites
    second = si.tl.train_federated(pseudo_mosaic, key=key, copy=True, **options).sites
    for name in pseudo_mosaic:
        np.testing.assert_array_equal(first[name].obsm["X_scinfl"], second[name].obsm["X_scinfl"])


def test_hardened_mosaic_mixes_every_modalitys_input():
    schema = FederationSchema(
        var_names=(*(f"rna:g{i}" for i in range(40)), *(f"prot:p{i}" for i in range(10))),
        categories=(),
        label_key=None,
        layer=None,
        use_raw=False,
        join="inner",
        modalities=(("rna", 40), ("prot", 10)),
    )
    task = si.tasks.Mosaic(hidden=16, n_latent=4, likelihood={"prot": "clr"})  # rna: gaussian
    assert task.likelihoods(schema) == {"rna": "gaussian", "prot": "clr"}
    config = ModelConfig(task=task, schema=schema, scheme="hardened", norm="layer", mixing_block=8)
    network = build_network(config)
    names = {name: m.key_index for name, m in network.named_modules() if hasattr(m, "key_index")}
    assert network.layout.mixed == (0, names["network.encoders.prot.0"])
    material = key_material(si.FederationKey(b"\x01" * 32, scheme="hardened"), network)
    assert material.mixing_of(names["network.encoders.prot.0"]) is not None
    assert material.mixing_of(names["network.decoders.prot.0"]) is None
    # The network under the key computes what its plain equivalent computes without it.
    torch.manual_seed(0)
    x = torch.cat([torch.rand(6, 50) * 3, torch.ones(6, 2)], dim=1)
    network.eval()
    plain = build_network(config)
    plain.load_state_dict(network.to_plain(network.state_dict(), material))
    plain.eval()
    with torch.no_grad(), use_key(material):
        keyed = network.call("features", x)
    with torch.no_grad():
        torch.testing.assert_close(keyed, plain.call("features", x), rtol=1e-4, atol=1e-5)


def test_mosaic_privacy_audit_runs_wrong_key_and_analytic(pseudo_mosaic):
    key = si.FederationKey(hashlib.sha256(b"scinfl mosaic audit key").digest(), scheme="hardened")
    members = pseudo_mosaic["paired"][:300].copy()
    public = pseudo_mosaic["paired"][300:].copy()
    model = si.tl.train_federated({"a": members, "b": pseudo_mosaic["rna_only"]}, key=key, **MOSAIC)
    table = si.tl.privacy_audit(
        model,
        members,
        key=key,
        public=public,
        settings={"seeds": (0,), "n_victims": 6, "utility": {"n_wrong_keys": 2}},
    )
    attacks = set(table["attack"])
    assert {"first layer (dW / db) [rna]", "first layer (dW / db) [prot]"} <= attacks
    views = set(table.loc[table["family"] == "utility", "view"])
    assert {"right key", "wrong key", "no key"} <= views

    def value(attack, view, metric):
        row = table[(table["attack"] == attack) & (table["view"] == view) & (table["metric"] == metric)]
        return float(row["mean"].iloc[0])

    # The server's first-layer inversion no longer gives each modality's input (the mixing hides it).
    for modality in ("rna", "prot"):
        assert value(f"first layer (dW / db) [{modality}]", "server", "pearson") < 0.5


def test_mosaic_outer_join_and_registered_modality(pseudo_mosaic, key):
    # The RNA-only site measures 500 of the 600 genes and says so by registration; join="outer" keeps all.
    partial = pseudo_mosaic["rna_only"][:, 100:].copy()
    si.pp.register_site(partial, site="b", modality="rna")
    sites = {"paired": pseudo_mosaic["paired"], "rna_only": partial}
    model = si.tl.train_federated(sites, key=key, join="outer", **_small(2))
    assert model.schema.modalities == (("rna", 600), ("prot", 165))
    assert partial.obsm["X_scinfl"].shape == (350, 8)
    measured = model.task.inputs(partial, "rna_only", model.schema).measured  # as its site reads it
    assert measured.sum() == 500 + 2  # its genes, and the presence flags
    with pytest.warns(UserWarning, match="Modality 'rna': 100 features are not held by every site"):
        inner = si.tl.train_federated(sites, key=key, join="inner", **_small(1))
    assert inner.schema.modalities == (("rna", 500), ("prot", 165))


# --- bad input -----------------------------------------------------------------------------------------


def test_mosaic_errors_name_the_site_and_the_problem(pseudo_mosaic, key):
    sites = pseudo_mosaic
    with pytest.raises(
        ValueError, match="Site 'paired' is a MuData: multi-omics sites train with task='mosaic'"
    ):
        si.tl.train_federated(
            sites, key=key, task="embedding", rounds=1, secure_aggregation={"min_cohort": 2}
        )
    atac = sites["rna_only"].copy()
    si.pp.register_site(
        atac, site="rna_only", modality="atac"
    )  # an AnnData site's modality: its registration
    with pytest.raises(ValueError, match=r"Site\(s\) 'rna_only' hold modality 'atac'"):
        si.tl.train_federated({"paired": sites["paired"], "rna_only": atac}, key=key, **MOSAIC)
    with pytest.raises(ValueError, match="Site 'rna_only': a modality is a non-empty name without ':'"):
        si.pp.register_site(sites["rna_only"].copy(), site="rna_only", modality="rna:x")
    renamed = sites["rna_only"].copy()
    renamed.var_names = [f"ENSG{i:05d}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="Site 'rna_only' and the sites before it .* share no feature"):
        si.tl.train_federated({"paired": sites["paired"], "rna_only": renamed}, key=key, **MOSAIC)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        si.tasks.Mosaic(likelihood={"rna": "nb"})
    with pytest.raises(ValueError, match="likelihood= names modalities no site holds: 'atac'"):
        si.tl.train_federated(sites, key=key, **_small(1, likelihood={"rna": "poisson", "atac": "poisson"}))
    broken = sites["rna_only"].copy()
    broken.X.data[0] = np.nan
    with pytest.raises(ValueError, match="Modality 'rna': Site 'rna_only': .* NaN"):
        si.tl.train_federated({"paired": sites["paired"], "rna_only": broken}, key=key, **MOSAIC)
    assert not any("X_scinfl" in site.obsm for site in (*sites.values(), atac, renamed, broken))


# --- the real CITE-seq data (../shared/data) -----------------------------------------------------------


@pytest.mark.skipif(not CITESEQ.is_file(), reason="needs ../shared/data/pbmc_citeseq_10k5k_subset.h5mu")
def test_citeseq_rna_only_site_lands_next_to_paired_cell_types():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.read_h5mu(CITESEQ)
        paired = mdata[mdata.obs["batch"] == "pbmc10k"].copy()
        rna_only = mdata[mdata.obs["batch"] == "pbmc5k"].copy()["rna"].copy()
    sites = {"paired": paired, "rna_only": rna_only}
    key = si.FederationKey(hashlib.sha256(b"scinfl citeseq test key").digest(), scheme="hardened")
    task = si.tasks.Mosaic(
        hidden=128, n_latent=16, label_key=GATE, likelihood={"rna": "poisson", "prot": "clr"}
    )
    model = si.tl.train_federated(
        sites, key=key, task=task, rounds=40, copy=True, seed=0, secure_aggregation={"min_cohort": 2}
    )
    out = model.sites
    labels = {name: site.obs[GATE].astype(str).to_numpy() for name, site in out.items()}
    right = _transfer(
        out["paired"].obsm["X_scinfl"], labels["paired"], out["rna_only"].obsm["X_scinfl"], labels["rna_only"]
    )
    wrong = wrong_key(key, 0, 0)
    z = {name: model.predict(site, key=wrong, check_key=False).embedding for name, site in sites.items()}
    wrong_accuracy = _transfer(z["paired"], labels["paired"], z["rna_only"], labels["rna_only"])
    chance = np.unique(labels["rna_only"], return_counts=True)[1].max() / len(labels["rna_only"])
    # Heuristic labels (an ADT gate): the bar is well above chance (0.45) and far above a wrong key.
    assert right > 0.7, (right, chance)
    assert right > chance + 0.2, (right, chance)
    assert right > wrong_accuracy + 0.2, (right, wrong_accuracy)


def test_an_anndata_site_is_read_where_its_registration_says(pseudo_mosaic, pbmc):
    """An RNA-only AnnData site registered with use_raw=True is read from .raw (its .X is scaled)."""
    cells = pseudo_mosaic["rna_only"].obs_names
    site = pbmc[cells, pbmc.raw.var_names[:600]].copy()  # .X: scaled values; .raw: log-normalised ones
    si.pp.register_site(site, site="rna_only", use_raw=True, modality="rna")
    model = si.tl.train_federated(
        {"paired": pseudo_mosaic["paired"], "rna_only": site}, key=None, **_small(1)
    )
    rows = model.inputs(site, site="rna_only", min_overlap=None).rows(np.arange(5))
    np.testing.assert_allclose(rows[:, :600], pseudo_mosaic["rna_only"].X[:5].toarray(), rtol=1e-6)
    assert not np.allclose(rows[:, :600], np.asarray(site.X[:5]))  # not the scaled .X
