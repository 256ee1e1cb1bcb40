"""Input robustness, property-based: random federations of small, messy AnnData sites.

Hypothesis draws 2-4 sites with partly overlapping gene panels, their own label category sets (categorical,
string or integer labels), dense or sparse matrices of several dtypes, views, non-unique obs names, features
in ``.X``, a layer or ``.raw`` (registered with ``pp.register_site``, as the label column may be; else it is
given to ``train_federated``), and sometimes one problem per site (no cells, NaN/inf values, duplicate gene
names, missing labels, a missing layer or ``.raw``, no genes, no gene in common). For every input the test
decides what must happen, independently of the package's code:

- it works, and the outputs are right: the agreed genes and categories, one categorical prediction per cell
  with the model's categories, probabilities that sum to 1, a confidence equal to the top probability, the same
  predictions again from ``tl.predict`` and from the same cells in any format or gene order;
- or it raises a ValueError/TypeError whose message names the offending site and the problem.

Either way the user's AnnData objects are unchanged apart from their registration and the documented output
keys (and not at all after an error or with ``copy=True``, which returns the written copies as
``model.sites``); the parents of views are never changed.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field, replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from scipy import sparse

import scinfl as si

GENES = tuple(f"gene{i}" for i in range(60))
LABELS = ("B", "T", "NK", "Mono", "DC", "Platelet")
LABEL = "cell_type"
LAYER = "counts"
VALIDATION_FRACTION = 0.1  # train_federated's default
TASK = si.tasks.Classification(hidden=16)
# One quick round of two sites, masked (a two-site cohort: each site may learn the other's update).
ONE_ROUND = {"task": TASK, "rounds": 1, "fit": {"batch_size": 16}, "secure_aggregation": {"min_cohort": 2}}
KEYS = {
    "none": None,
    "infl": si.FederationKey(bytes(range(32)), scheme="infl"),
    "hardened": si.FederationKey(bytes(range(1, 33)), scheme="hardened"),
}

# Problems that make a site unusable, and what the error must say besides the site's name.
SITE_PROBLEMS = {
    "empty": "has no cells",
    "nan": "NaN or infinite",
    "inf": "NaN or infinite",
    "dup_var": "duplicate feature names",
    "nan_label": "no (value|label)",
    "missing_label": "label column .* missing",
    "missing_layer": f"layer '{LAYER}' not found",
    "missing_raw": r"no \.raw",
    "no_genes": "no features",
    "bad_uns": r"\.uns\['scinfl'\] is a str",
}
# Harmless oddities: the site must work.
QUIRKS = ("nan_in_unused_matrix", "all_zero_features", "negative", "non_unique_obs", "unused_category")


@dataclass(frozen=True)
class SiteSpec:
    """One site, as data (so that explicit examples are easy to write)."""

    n_obs: int = 20
    genes: tuple[str, ...] = GENES[:12]
    categories: tuple[str, ...] = LABELS[:3]
    label_kind: str = "category"  # "category", "str", "int", "int_category"
    fmt: str = "dense"  # "dense", "csr", "csc", "csr_array", "csc_array"
    dtype: str = "float32"
    view: bool = False
    quirks: frozenset[str] = frozenset()
    problem: str | None = None  # a key of SITE_PROBLEMS, or "disjoint" (no gene shared with the others)
    seed: int = 0


@dataclass(frozen=True)
class FedSpec:
    sites: tuple[SiteSpec, ...]
    source: str = "X"  # where the features live: "X", "layer" or "raw" (the last two are registered)
    join: str = "inner"
    registered: bool = False  # the label column registered too (else given to train_federated)
    label_in_task: bool = False  # not registered: the label column in the task object, else label_key=
    copy: bool = False
    key: str = "none"
    key_added: str = "scinfl"
    query: SiteSpec | None = None
    min_overlap: float = 0.5  # of the query


@dataclass
class Built:
    """The AnnData objects of a federation, the AnnData its views were cut from, and the labels."""

    sites: dict[str, ad.AnnData]
    parents: dict[str, ad.AnnData] = field(default_factory=dict)  # the AnnData a view site was cut from
    labels: dict[str, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Building AnnData objects from specs


def _labels(spec: SiteSpec, rng: np.random.Generator, n: int, cells: np.ndarray) -> pd.Series:
    names = [str(LABELS.index(c) + 1) if spec.label_kind.startswith("int") else c for c in spec.categories]
    values = rng.choice(np.array(names, dtype=object), size=n)
    if spec.label_kind == "str":
        series = pd.Series(values, dtype=object)
    elif spec.label_kind == "int":
        series = pd.Series(values.astype(int))
    else:
        cats = list(names) + (["Unused"] if "unused_category" in spec.quirks else [])
        if spec.label_kind == "int_category":
            cats = [int(c) if c.isdigit() else c for c in cats]
            values = np.array([int(v) for v in values], dtype=object)
        series = pd.Series(pd.Categorical(values, categories=cats))
    if spec.problem == "nan_label" and len(cells):
        series = series.astype(float) if spec.label_kind == "int" else series
        series.iloc[rng.choice(cells)] = np.nan  # in the site, not only in the AnnData it is a view of
    return series


def _format(matrix: np.ndarray, fmt: str):
    return {
        "dense": np.asarray,
        "csr": sparse.csr_matrix,
        "csc": sparse.csc_matrix,
        "csr_array": sparse.csr_array,
        "csc_array": sparse.csc_array,
    }[fmt](matrix)


def site_genes(spec: SiteSpec) -> list[str]:
    if spec.problem == "no_genes":
        return []
    if spec.problem == "disjoint":
        return [f"other{i}" for i in range(len(spec.genes))]
    genes = list(spec.genes)
    if spec.problem == "dup_var" and len(genes) >= 2:
        genes[-1] = genes[0]
    return genes


def build_site(spec: SiteSpec, source: str, name: str) -> tuple[ad.AnnData, ad.AnnData | None, np.ndarray]:
    """The site (a view of a larger parent if ``spec.view``), the parent, and the cells' labels as strings."""
    rng = np.random.default_rng(spec.seed)
    n = 0 if spec.problem == "empty" else spec.n_obs
    n_parent = n + (int(rng.integers(1, 8)) if spec.view else 0)
    genes = site_genes(spec)
    dtype = spec.dtype
    if dtype == "float16" and spec.fmt != "dense":
        dtype = "float32"  # scipy.sparse has no float16
    if spec.problem in ("nan", "inf") or "nan_in_unused_matrix" in spec.quirks:
        dtype = dtype if np.dtype(dtype).kind == "f" else "float64"
    values = rng.poisson(2.0, size=(n_parent, len(genes))).astype(np.float64)
    if "negative" in spec.quirks:
        values -= 3.0
    if "all_zero_features" in spec.quirks:
        values[:] = 0.0
    values = values.astype(dtype)
    cells = rng.choice(n_parent, size=n, replace=False) if spec.view else np.arange(n)
    cells = np.sort(cells)
    if spec.problem in ("nan", "inf") and n and len(genes):
        values[rng.choice(cells), rng.integers(len(genes))] = np.nan if spec.problem == "nan" else -np.inf

    labels = _labels(spec, rng, n_parent, cells)
    obs_names = (
        [f"cell{i % 3}" for i in range(n_parent)]
        if "non_unique_obs" in spec.quirks
        else [f"{name}_cell{i}" for i in range(n_parent)]
    )
    obs = pd.DataFrame(
        {LABEL: labels.to_numpy(), "batch": pd.Categorical([name] * n_parent), "score": rng.random(n_parent)},
        index=pd.Index(obs_names),
    )
    if isinstance(labels.dtype, pd.CategoricalDtype):
        obs[LABEL] = pd.Categorical(labels, categories=labels.cat.categories)
    if spec.problem == "missing_label":
        del obs[LABEL]
    var = pd.DataFrame({"highly_variable": rng.random(len(genes)) > 0.5}, index=pd.Index(genes))
    features = _format(values, spec.fmt)
    decoy = values.astype(np.float32)  # what .X holds when the features are elsewhere
    if "nan_in_unused_matrix" in spec.quirks and n and len(genes):
        decoy[rng.choice(cells), 0] = np.nan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-unique names
        if source == "X":
            adata = ad.AnnData(features, obs=obs, var=var)
            if "nan_in_unused_matrix" in spec.quirks:
                adata.layers["unused"] = decoy
        elif source == "layer":
            adata = ad.AnnData(decoy, obs=obs, var=var)
            if spec.problem != "missing_layer":
                adata.layers[LAYER] = features
        else:  # raw: .raw holds every gene, .X a subset (as after selecting highly variable genes)
            kept = (
                np.arange(len(genes)) if len(genes) < 2 else np.sort(rng.choice(len(genes), 2, replace=False))
            )
            adata = ad.AnnData(decoy[:, kept], obs=obs, var=var.iloc[kept])
            if spec.problem != "missing_raw":
                adata.raw = ad.AnnData(features, obs=obs, var=var)
        adata.layers["empty"] = sparse.csr_matrix(adata.shape, dtype=np.float32)
        adata.obsm["X_pca"] = rng.normal(size=(n_parent, 2))
        adata.varm["PCs"] = rng.normal(size=(adata.n_vars, 2))
        adata.uns["note"] = {"array": np.arange(3), "text": name}
        if spec.seed % 2:  # an earlier run's entry: register_site keeps it
            adata.uns["scinfl"] = {"user_entry": [1, 2]}
        if spec.problem == "bad_uns":  # where scinfl keeps its registration and outputs, but not a dict
            adata.uns["scinfl"] = "an earlier note"
    if spec.view:
        return adata[cells], adata, labels.iloc[cells].astype(str).to_numpy()
    return adata, None, labels.astype(str).to_numpy()


def build(spec: FedSpec) -> Built:
    built = Built(sites={})
    for i, site in enumerate(spec.sites):
        name = f"site_{i}"
        built.sites[name], parent, built.labels[name] = build_site(site, spec.source, name)
        if parent is not None:
            built.parents[name] = parent
    return built


# ---------------------------------------------------------------------------------------------------------
# What must happen, decided from the specs


def n_training_cells(labels: np.ndarray) -> int:
    """Cells left to train on after holding out VALIDATION_FRACTION of every class with two or more cells."""
    held = 0
    for count in pd.Series(labels).value_counts():
        if count >= 2:
            held += min(count - 1, max(1, round(VALIDATION_FRACTION * count)))
    return len(labels) - held


def site_categories(adata: ad.AnnData) -> set[str]:
    """The label names a site declares: a categorical's categories (used or not), else the values present.

    (Subsetting drops unused categories, so a view declares only the categories of its own cells.)
    """
    labels = adata.obs[LABEL]
    if isinstance(labels.dtype, pd.CategoricalDtype):
        return {str(c) for c in labels.cat.categories}
    return {str(v) for v in labels}


def problem_of(site: SiteSpec, source: str) -> str | None:
    """The site's problem, if it is one where the features live (a missing layer is none when using .X)."""
    if (site.problem, source) in (("missing_layer", "X"), ("missing_layer", "raw")):
        return None
    if (site.problem, source) in (("missing_raw", "X"), ("missing_raw", "layer")):
        return None
    return site.problem


def label_coding_of(adata: ad.AnnData) -> str:
    """Whether a site writes its labels as numbers (integer codes, a float column with NaN) or names."""
    column = adata.obs[LABEL]
    values = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else column
    return "numbers" if pd.api.types.is_numeric_dtype(values.dtype) else "names"


def expected_training_errors(spec: FedSpec, built: Built) -> list[str]:
    """Regular expressions, one of which the error must match; empty if training must work."""
    errors = []
    for (name, _adata), site in zip(built.sites.items(), spec.sites, strict=True):
        if problem_of(site, spec.source) in SITE_PROBLEMS:
            errors.append(f"Site '{name}'.*{SITE_PROBLEMS[problem_of(site, spec.source)]}")
    codings = {label_coding_of(adata) for adata in built.sites.values() if LABEL in adata.obs}
    if len(codings) > 1:  # integer codes at one site, names at another: both spellings would be classes
        errors.append(f"code the label column '{LABEL}' differently")
    unusable = ("empty", "missing_layer", "missing_raw", "no_genes")
    usable = [s for s in spec.sites if problem_of(s, spec.source) not in unusable]
    if spec.join == "inner":
        shared = set.intersection(*(set(site_genes(s)) for s in usable)) if usable else set()
        if not shared:
            errors.append("Site '[^']+'.*share no feature names")
    if not errors:
        categories = set().union(*(site_categories(a) for a in built.sites.values()))
        if len(categories) < 2:
            errors.append("at least 2 label categories")
        for name, labels in built.labels.items():
            if n_training_cells(labels) < 2:
                errors.append(f"Site '{name}' has {n_training_cells(labels)} training cell")
    return errors


def expected_schema(spec: FedSpec, built: Built) -> tuple[list[str], list[str]]:
    panels = [site_genes(s) for s in spec.sites]
    ordered = list(dict.fromkeys(g for panel in panels for g in panel))
    if spec.join == "inner":
        ordered = [g for g in ordered if all(g in panel for panel in panels)]
    categories = sorted(set().union(*(site_categories(a) for a in built.sites.values())))
    return ordered, categories


# ---------------------------------------------------------------------------------------------------------
# Comparing AnnData objects


def assert_same_matrix(after, before, what: str) -> None:
    assert sparse.issparse(after) == sparse.issparse(before), what
    if sparse.issparse(before):
        assert after.format == before.format, what
        assert isinstance(after, sparse.sparray) == isinstance(before, sparse.sparray), what
        after, before = after.toarray(), before.toarray()
    after, before = np.asarray(after), np.asarray(before)
    assert after.dtype == before.dtype, what
    assert after.shape == before.shape, what
    assert np.array_equal(after, before, equal_nan=before.dtype.kind in "fc"), what


def assert_same_value(after, before, what: str) -> None:
    if isinstance(before, dict):
        assert isinstance(after, dict), what
        assert after.keys() == before.keys(), what
        for k in before:
            assert_same_value(after[k], before[k], f"{what}[{k!r}]")
    elif isinstance(before, np.ndarray) or sparse.issparse(before):
        assert_same_matrix(after, before, what)
    elif isinstance(before, pd.DataFrame):
        pd.testing.assert_frame_equal(after, before, obj=what)
    else:
        assert type(after) is type(before), what
        assert after == before, what


def assert_unchanged(
    after: ad.AnnData,
    before: ad.AnnData,
    *,
    outputs: str | None = None,
    registration: bool = False,
) -> None:
    """``after`` equals the snapshot ``before``, except the outputs under ``outputs`` (a key_added), and
    ``.uns["scinfl"]["registration"]`` if ``registration``."""
    obs_out = {f"{outputs}_prediction", f"{outputs}_confidence"} if outputs else set()
    obsm_out = {f"{outputs}_probabilities", f"X_{outputs}"} if outputs else set()
    uns_out = {outputs} if outputs else set()
    assert after.shape == before.shape
    pd.testing.assert_index_equal(after.obs_names, before.obs_names)
    pd.testing.assert_index_equal(after.var_names, before.var_names)
    assert_same_matrix(after.X, before.X, "X")
    assert set(after.layers) == set(before.layers)
    for name in before.layers:
        assert_same_matrix(after.layers[name], before.layers[name], f"layers[{name!r}]")
    assert [c for c in after.obs.columns if c not in obs_out] == [
        c for c in before.obs.columns if c not in obs_out
    ]
    kept = [c for c in before.obs.columns if c not in obs_out]
    pd.testing.assert_frame_equal(after.obs[kept], before.obs[kept])
    pd.testing.assert_frame_equal(after.var, before.var)
    for attr, out in (("obsm", obsm_out), ("varm", set()), ("obsp", set()), ("varp", set())):
        a, b = getattr(after, attr), getattr(before, attr)
        assert set(a) - out == set(b) - out, attr
        for k in set(b) - out:
            assert_same_value(a[k], b[k], f"{attr}[{k!r}]")
    uns_after, uns_before = (_plain_uns(a.uns, uns_out, registration) for a in (after, before))
    assert_same_value(uns_after, uns_before, "uns")
    assert (after.raw is None) == (before.raw is None)
    if before.raw is not None:
        assert_same_matrix(after.raw.X, before.raw.X, "raw.X")
        pd.testing.assert_frame_equal(after.raw.var, before.raw.var)


def _plain_uns(uns, outputs: set[str], registration: bool) -> dict:
    """``uns`` without the outputs (and without ``["scinfl"]["registration"]``, and then an empty
    ``["scinfl"]``, if ``registration``)."""
    out = {k: v for k, v in uns.items() if k not in outputs}
    if registration and "scinfl" in out:
        entry = {k: v for k, v in out.pop("scinfl").items() if k != "registration"}
        if entry:
            out["scinfl"] = entry
    return out


def snapshot(built: Built) -> tuple[dict[str, ad.AnnData], dict[str, ad.AnnData]]:
    return (
        {n: a.copy() for n, a in built.sites.items()},
        {n: copy.deepcopy(a) for n, a in built.parents.items()},
    )


def assert_parents_unchanged(built: Built, parents_before: dict[str, ad.AnnData]) -> None:
    for name, parent in built.parents.items():
        assert_unchanged(parent, parents_before[name])


def assert_error(err: pytest.ExceptionInfo, expected: list[str]) -> None:
    message = str(err.value)
    assert any(re.search(p, message, flags=re.DOTALL) for p in expected), (message, expected)


# ---------------------------------------------------------------------------------------------------------
# Checking outputs


def assert_outputs(adata: ad.AnnData, model: si.FederatedModel, key_added: str) -> None:
    categories = list(model.schema.categories)
    prediction = adata.obs[f"{key_added}_prediction"]
    assert isinstance(prediction.dtype, pd.CategoricalDtype)
    assert list(prediction.cat.categories) == categories
    assert prediction.notna().all()
    assert len(prediction) == adata.n_obs
    probabilities = adata.obsm[f"{key_added}_probabilities"]
    assert probabilities.shape == (adata.n_obs, len(categories))
    assert np.isfinite(probabilities).all()
    assert (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(prediction.cat.codes.to_numpy(), probabilities.argmax(axis=1))
    np.testing.assert_allclose(adata.obs[f"{key_added}_confidence"], probabilities.max(axis=1), rtol=1e-6)
    embedding = adata.obsm[f"X_{key_added}"]
    assert embedding.shape[0] == adata.n_obs
    assert embedding.ndim == 2
    assert np.isfinite(embedding).all()
    assert adata.uns[key_added]["categories"] == categories
    assert adata.uns[key_added]["n_features"] == model.schema.n_features


def features_of(adata: ad.AnnData, source: str):
    if source == "raw":
        return adata.raw.X, adata.raw.var_names
    return (adata.layers[LAYER] if source == "layer" else adata.X), adata.var_names


def reshaped(adata: ad.AnnData, source: str, rng: np.random.Generator) -> ad.AnnData:
    """The same cells and values with the genes shuffled, as a dense float64 matrix in a new AnnData."""
    matrix, names = features_of(adata, source)
    matrix = matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix)
    order = rng.permutation(len(names))
    out = ad.AnnData(
        np.zeros((adata.n_obs, 1), dtype=np.float32), obs=pd.DataFrame(index=adata.obs_names.copy())
    )
    features = ad.AnnData(matrix[:, order].astype(np.float64), var=pd.DataFrame(index=names[order]))
    if source == "raw":
        out.raw = features
    else:
        out = ad.AnnData(features.X, obs=out.obs, var=features.var)
        if source == "layer":
            out.layers[LAYER] = out.X.copy()
            out.X = np.full_like(out.X, np.nan)  # must not be read
    return out


# ---------------------------------------------------------------------------------------------------------
# Strategies

site_problems = st.sampled_from([None] * 12 + [*SITE_PROBLEMS, "disjoint"])


@st.composite
def site_specs(draw, problems=site_problems, core=GENES[:4], clean: bool = False) -> SiteSpec:
    pool = [g for g in GENES if g not in core]
    extra = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=36, unique=True))
    genes = draw(st.permutations(list(core) + extra))
    return SiteSpec(
        n_obs=draw(st.integers(4, 60) if clean else st.one_of(st.integers(1, 3), st.integers(4, 60))),
        genes=tuple(genes),
        categories=tuple(
            draw(st.lists(st.sampled_from(LABELS), min_size=1 + clean, max_size=4, unique=True))
        ),
        label_kind=draw(st.sampled_from(["category", "str", "int", "int_category"])),
        fmt=draw(st.sampled_from(["dense", "csr", "csc", "csr_array", "csc_array"])),
        dtype=draw(st.sampled_from(["float32", "float64", "int64", "int32", "float16", "bool"])),
        view=draw(st.booleans()),
        quirks=frozenset(draw(st.lists(st.sampled_from(QUIRKS), max_size=2))),
        problem=draw(problems),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def federations(draw) -> FedSpec:
    n_sites = draw(st.integers(2, 4))
    core = tuple(draw(st.lists(st.sampled_from(GENES[:10]), min_size=1, max_size=6, unique=True)))
    # Half the federations have no problem and no tiny site, so that many examples train.
    clean = draw(st.booleans())
    problems = st.just(None) if clean else site_problems
    sites = tuple(draw(site_specs(problems=problems, core=core, clean=clean)) for _ in range(n_sites))
    query_problems = st.sampled_from(
        [None] * 6 + ["nan", "dup_var", "empty", "disjoint", "bad_uns", "missing_label"]
    )
    return FedSpec(
        sites=sites,
        source=draw(st.sampled_from(["X", "layer", "raw"])),
        join=draw(st.sampled_from(["inner", "outer"])),
        registered=draw(st.booleans()),
        label_in_task=draw(st.booleans()),
        copy=draw(st.booleans()),
        key=draw(st.sampled_from(list(KEYS))),
        key_added=draw(st.sampled_from(["scinfl", "fl"])),
        query=draw(st.none() | site_specs(problems=query_problems, core=core)),
        min_overlap=draw(st.sampled_from([0.0, 0.5])),
    )


# ---------------------------------------------------------------------------------------------------------
# The property

TWO_SITES = (SiteSpec(seed=1), SiteSpec(seed=2, genes=GENES[4:14], fmt="csr"))


def _train(spec: FedSpec, sites: dict[str, ad.AnnData]) -> si.FederatedModel:
    task, labels = TASK, {}
    if not spec.registered:
        task, labels = (
            (TASK.replace(label_key=LABEL), {}) if spec.label_in_task else (TASK, {"label_key": LABEL})
        )
    return si.tl.train_federated(
        sites,
        key=KEYS[spec.key],
        task=task,
        join=spec.join,
        rounds=1,
        fit={"batch_size": 16},
        secure_aggregation={"min_cohort": 2},
        key_added=spec.key_added,
        copy=spec.copy,
        **labels,
    )


def source_fields(source: str) -> dict:
    """The registration of where the features live."""
    return {"layer": LAYER} if source == "layer" else {"use_raw": True} if source == "raw" else {}


# The problems register_site finds (the label column's only when it registers one).
REGISTRATION_PROBLEMS = ("empty", "missing_label", "missing_layer", "missing_raw", "bad_uns")


def register(spec: FedSpec, built: Built, before: dict, parents_before: dict) -> bool:
    """Register the sites as ``spec`` says (nothing for unregistered features in .X); False if
    register_site raised, as it must, naming the site and the problem (and left everything unchanged)."""
    if not spec.registered and spec.source == "X":
        return True
    labels = {"label_key": LABEL} if spec.registered else {}
    fields = source_fields(spec.source)
    for (name, adata), site in zip(built.sites.items(), spec.sites, strict=True):
        problem = problem_of(site, spec.source)
        if problem not in REGISTRATION_PROBLEMS or (problem == "missing_label" and not labels):
            problem = None
        if problem is not None:
            with pytest.raises((ValueError, TypeError), match=f"Site '{name}'") as err:
                si.pp.register_site(adata, site=name, **labels, **fields)
            assert_error(err, [f"Site '{name}'.*{SITE_PROBLEMS[problem]}"])
            event(f"register_site raised: {problem}")
            assert_unchanged(adata, before[name])
            assert_parents_unchanged(built, parents_before)
            return False
        si.pp.register_site(adata, site=name, **labels, **fields)
        registration = adata.uns["scinfl"]["registration"]
        assert registration["site"] == name
        assert registration.get("label_key") == labels.get("label_key")
        assert registration.get("layer") == fields.get("layer")
        assert registration["use_raw"] == (spec.source == "raw")
        assert_unchanged(adata, before[name], registration=True)
    assert_parents_unchanged(built, parents_before)
    return True


@pytest.mark.filterwarnings("ignore")  # gene-panel, view and name-uniqueness warnings are not under test
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(spec=federations())
@example(spec=FedSpec(sites=TWO_SITES))
@example(spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="nan")), key="hardened"))
@example(spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="inf")), source="layer"))
@example(spec=FedSpec(sites=TWO_SITES, source="raw", label_in_task=True, copy=True, key="infl"))
@example(spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="missing_raw")), source="raw"))
@example(
    spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="missing_label")), label_in_task=True)
)
@example(spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="bad_uns"))))
@example(spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="nan_label")), registered=True))
@example(spec=FedSpec(sites=(replace(TWO_SITES[0], problem="empty"), TWO_SITES[1])))
@example(
    spec=FedSpec(
        sites=(replace(TWO_SITES[0], quirks=frozenset({"nan_in_unused_matrix"})), *TWO_SITES[1:]),
        source="raw",
    )
)
@example(spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="dup_var")), registered=True))
@example(
    spec=FedSpec(
        sites=(replace(TWO_SITES[0], view=True, quirks=frozenset({"non_unique_obs"})), *TWO_SITES[1:]),
        registered=True,
        key="infl",
    )
)
@example(spec=FedSpec(sites=(replace(TWO_SITES[0], view=True), replace(TWO_SITES[1], view=True)), copy=True))
@example(
    spec=FedSpec(
        sites=(replace(TWO_SITES[0], label_kind="int"), replace(TWO_SITES[1], label_kind="str")), key="infl"
    )
)
@example(
    spec=FedSpec(sites=(replace(TWO_SITES[0], quirks=frozenset({"negative"}), dtype="int64"), *TWO_SITES[1:]))
)
@example(
    spec=FedSpec(
        sites=(replace(TWO_SITES[0], quirks=frozenset({"all_zero_features"}), fmt="csc"), *TWO_SITES[1:]),
        source="layer",
    )
)
@example(spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="no_genes")), join="outer"))
@example(spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="disjoint"))))
@example(spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="disjoint")), join="outer"))
@example(
    spec=FedSpec(
        sites=(TWO_SITES[0], replace(TWO_SITES[1], problem="missing_layer")), source="layer", registered=True
    )
)
@example(spec=FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], n_obs=2, categories=("T",)))))
@example(spec=FedSpec(sites=TWO_SITES, query=replace(TWO_SITES[0], problem="dup_var")))
@example(spec=FedSpec(sites=TWO_SITES, query=replace(TWO_SITES[0], problem="nan", view=True), copy=True))
def test_any_federation_works_or_names_the_site_and_leaves_the_data_alone(spec: FedSpec):
    built = build(spec)
    before, parents_before = snapshot(built)

    if not register(spec, built, before, parents_before):
        return
    before, _ = snapshot(built)

    errors = expected_training_errors(spec, built)
    views = [a.is_view for a in built.sites.values()]  # (registering made views actual AnnData objects)
    if errors:
        with pytest.raises((ValueError, TypeError)) as err:
            _train(spec, built.sites)
        assert_error(err, errors)
        assert [a.is_view for a in built.sites.values()] == views  # nothing was written into a view
        event(f"train_federated raised: {re.sub('site_[0-9]', 'site_i', str(err.value))[:50]}")
        for name, adata in built.sites.items():
            assert_unchanged(adata, before[name])
        assert_parents_unchanged(built, parents_before)
        return

    model = _train(spec, built.sites)
    event(f"trained ({spec.join} join, features in {spec.source})")
    assert isinstance(model, si.FederatedModel)
    if spec.copy:  # the written copies, by site
        written = model.sites
        assert list(written) == list(built.sites)
    else:
        written = built.sites
        assert model.sites is None
    assert model.task == (
        TASK if spec.registered else TASK.replace(label_key=LABEL)
    )  # else: the registration's
    assert model.schema.label_key == LABEL
    assert (model.schema.layer, model.schema.use_raw) == (
        source_fields(spec.source).get("layer"),
        spec.source == "raw",
    )
    assert_parents_unchanged(built, parents_before)
    var_names, categories = expected_schema(spec, built)
    assert list(model.schema.var_names) == var_names
    assert list(model.schema.categories) == categories
    for name, adata in written.items():
        assert_outputs(adata, model, spec.key_added)
        if spec.copy:
            assert_unchanged(built.sites[name], before[name])
            assert adata is not built.sites[name]
        assert_unchanged(adata, before[name], outputs=spec.key_added)
        if "registration" in before[name].uns.get("scinfl", {}):
            assert adata.uns["scinfl"]["registration"] == before[name].uns["scinfl"]["registration"]
    if spec.copy:
        assert [a.is_view for a in built.sites.values()] == views

    # the same cells predicted again, in the same AnnData, and reshaped: the same outputs
    key = KEYS[spec.key]
    name, adata = next(iter(written.items()))
    before_again = adata.copy()
    # (min_overlap=0: with join="outer" a site may hold few of the model's features)
    again = si.tl.predict(adata, model, key=key, key_added="again", copy=True, min_overlap=0.0)
    assert_unchanged(adata, before_again)
    np.testing.assert_allclose(
        again.obsm["again_probabilities"], adata.obsm[f"{spec.key_added}_probabilities"], atol=1e-5
    )
    other = reshaped(adata, spec.source, np.random.default_rng(0))
    si.tl.predict(other, model, key=key, key_added="again", min_overlap=0.0)
    np.testing.assert_allclose(
        other.obsm["again_probabilities"], adata.obsm[f"{spec.key_added}_probabilities"], atol=1e-4
    )

    if spec.query is not None:
        check_query(spec, model)


def check_query(spec: FedSpec, model: si.FederatedModel) -> None:
    query, parent, _ = build_site(spec.query, spec.source, "query")
    before, parent_before = query.copy(), copy.deepcopy(parent)
    genes = set(site_genes(spec.query))
    overlap = sum(g in genes for g in model.schema.var_names) / model.schema.n_features
    problem = spec.query.problem if spec.query.problem != "missing_label" else None  # predict needs no labels
    errors = [f"Site 'query'.*{SITE_PROBLEMS[p]}" for p in [problem] if p in SITE_PROBLEMS]
    if spec.query.problem == "dup_var" and spec.query.genes[0] not in model.schema.var_names:
        errors = []  # a duplicated gene the model does not use is no problem
    if overlap < spec.min_overlap:
        errors.append("Site 'query' shares only")
    key = KEYS[spec.key]
    if errors:
        with pytest.raises((ValueError, TypeError)) as err:
            si.tl.predict(
                query, model, key=key, key_added=spec.key_added, copy=spec.copy, min_overlap=spec.min_overlap
            )
        assert_error(err, errors)
        event("predict raised")
        assert_unchanged(query, before)
    else:
        out = si.tl.predict(
            query, model, key=key, key_added=spec.key_added, copy=spec.copy, min_overlap=spec.min_overlap
        )
        event("predicted")
        if spec.copy:
            assert_unchanged(query, before)
        else:
            assert out is None
            out = query
        assert_outputs(out, model, spec.key_added)
        assert_unchanged(out, before, outputs=spec.key_added)
    if parent is not None:
        assert_unchanged(parent, parent_before)


@pytest.mark.filterwarnings("ignore:.*features are not held by every site")
def test_what_is_not_an_anndata_is_refused_by_name():
    sites = build(FedSpec(sites=TWO_SITES)).sites
    with pytest.raises(TypeError, match="Site 'site_0' is a ndarray, not an AnnData"):
        si.pp.register_site(sites["site_0"].X, site="site_0", label_key=LABEL)
    with pytest.raises(TypeError, match="Site 'site_1' is a DataFrame, not an AnnData"):
        si.tl.train_federated(
            {**sites, "site_1": sites["site_1"].to_df()},
            key=None,
            label_key=LABEL,
            secure_aggregation={"min_cohort": 2},
        )
    model = si.tl.train_federated(
        sites,
        key=None,
        label_key=LABEL,
        **ONE_ROUND,
    )
    with pytest.raises(TypeError, match="adata must be an AnnData, got ndarray"):
        si.tl.predict(sites["site_0"].X, model, key=None)


def test_sites_cut_from_one_anndata_leave_it_alone():
    """Views of one AnnData that already has an ``.uns["scinfl"]`` entry: registering and training write into
    the views (which become actual AnnData objects), never into the AnnData they were cut from."""
    spec = replace(TWO_SITES[0], n_obs=60, seed=1)  # an odd seed: .uns["scinfl"] holds an earlier entry
    parent, _, _ = build_site(spec, "X", "parent")
    parent_before = parent.copy()
    halves = {"left": parent[:30], "right": parent[30:]}
    for name, view in halves.items():
        si.pp.register_site(view, site=name, label_key=LABEL)
    assert_unchanged(parent, parent_before)
    assert [halves[n].uns["scinfl"]["registration"]["site"] for n in halves] == ["left", "right"]
    assert all(v.uns["scinfl"]["user_entry"] == [1, 2] for v in halves.values())
    model = si.tl.train_federated(
        halves,
        key=KEYS["infl"],
        **ONE_ROUND,
    )
    assert_unchanged(parent, parent_before)
    for name, site in halves.items():
        assert not site.is_view
        assert site.uns["scinfl"]["registration"]["site"] == name
        assert_outputs(site, model, "scinfl")


@pytest.mark.filterwarnings("ignore")  # the overflow itself, and the gene panels
@pytest.mark.parametrize("where", ["train", "predict"])
def test_values_beyond_float32_raise_naming_the_site(where):
    built = build(FedSpec(sites=(TWO_SITES[0], replace(TWO_SITES[1], dtype="float64"))))
    sites = built.sites
    if where == "predict":
        model = si.tl.train_federated(
            sites,
            key=None,
            label_key=LABEL,
            **ONE_ROUND,
        )
        query = build_site(replace(TWO_SITES[1], dtype="float64"), "X", "query")[0]
        query.X[0, 0] = 1e39
        before = query.copy()
        with pytest.raises(ValueError, match="Site 'query'.*(infinite|float32)"):
            si.tl.predict(query, model, key=None)
        assert_unchanged(query, before)
    else:
        sites["site_1"].X[0, 0] = 1e39
        before = sites["site_1"].copy()
        with pytest.raises(ValueError, match="Site 'site_1'.*(infinite|float32)"):
            si.tl.train_federated(
                sites,
                key=None,
                label_key=LABEL,
                **ONE_ROUND,
            )
        assert_unchanged(sites["site_1"], before)


@pytest.mark.filterwarnings("ignore:.*features are not held by every site")
@pytest.mark.parametrize("source", ["layer", "raw", "labels"])
def test_a_registration_that_no_longer_holds_names_the_site(source):
    """Registered fields that were removed afterwards: training raises naming the site and the field, and
    changes nothing."""
    built = build(FedSpec(sites=TWO_SITES, source="raw" if source == "raw" else "layer"))
    si.pp.register_site(built.sites, label_key=LABEL, **source_fields("raw" if source == "raw" else "layer"))
    assert [s.uns["scinfl"]["registration"]["site"] for s in built.sites.values()] == ["site_0", "site_1"]
    stale = built.sites["site_1"]
    if source == "layer":
        del stale.layers[LAYER]
    elif source == "raw":
        del stale.raw
    else:
        del stale.obs[LABEL]
    before, _ = snapshot(built)
    problem = {"layer": "missing_layer", "raw": "missing_raw", "labels": "missing_label"}[source]
    with pytest.raises(ValueError, match=f"Site 'site_1'.*{SITE_PROBLEMS[problem]}"):
        si.tl.train_federated(
            built.sites,
            key=KEYS["infl"],
            **ONE_ROUND,
        )
    for name, adata in built.sites.items():
        assert_unchanged(adata, before[name])
