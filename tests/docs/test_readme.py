"""The README's Python blocks run as written, top to bottom in one namespace, as a reader pastes them into a
notebook: in a temporary working directory, with what the README's install line and the test extras install.

The README leaves some inputs to the reader's own data (it names them in a comment: spatial spots, CRISPR
screens, CITE-seq sites). No package ships such data, so they are given stand-ins of the same shape here,
cut from pbmc68k_reduced: they check that the code runs, not what it finds (tutorials 04 and 05 run the same
calls on real data). Any other name the README uses without defining it fails the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

import scinfl as si

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning:mudata.*")]

README = Path(__file__).resolve().parents[2] / "README.md"
# The names the README leaves to the reader's data, as its comment names them.
YOURS = ("spots", "screens", "mdata_a", "rna_b", "labs")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def stand_ins() -> dict[str, object]:
    """Sites of the README's shapes from pbmc68k_reduced (its log-normalised .raw): 3 "sections" with its
    UMAP as coordinates, 3 "screens" whose Louvain clusters are guides (0 the control) and cell-cycle
    phases conditions, and a "CITE-seq" site whose last 12 genes stand in for proteins (pseudo-counts
    from the normalised values), beside an RNA-only one; and 3 "labs" of raw counts (pbmc68k_reduced's
    UMI counts, recovered as ``rint(expm1(raw) * n_counts / 1e4)``)."""
    import mudata as md

    adata = sc.datasets.pbmc68k_reduced()
    si.pp.register_site(adata, use_raw=True)
    sections = adata.copy()
    sections.obsm["spatial"] = sections.obsm["X_umap"]
    spots = si.pp.split_sites(sections, n_sites=3, label_key="bulk_labels", seed=0)
    screen = adata.copy()
    clusters = screen.obs["louvain"].astype(str)
    screen.obs["guide"] = np.where(clusters == "0", "control", "guide_" + clusters)
    screen.obs["condition"] = screen.obs["phase"].astype(str)
    split = si.pp.split_sites(screen, n_sites=3, label_key="guide", alpha=100.0, seed=0)
    screens = dict(zip(("lab_a", "lab_b", "lab_c"), split.values(), strict=True))
    counts = np.rint(np.expm1(adata.raw.X.toarray() if hasattr(adata.raw.X, "toarray") else adata.raw.X))
    genes = adata.raw.var_names
    rna = ad.AnnData(counts[:, :-12].astype(np.float32), obs=adata.obs[[]].copy())
    rna.var_names = genes[:-12]
    prot = ad.AnnData(counts[:, -12:].astype(np.float32), obs=adata.obs[[]].copy())
    prot.var_names = [f"{gene}_protein" for gene in genes[-12:]]
    mdata_a = md.MuData({"rna": rna[:400].copy(), "prot": prot[:400].copy()})
    rna_b = rna[400:].copy()
    si.pp.register_site(rna_b, modality="rna")
    umis = adata.raw.to_adata()
    umis.X = np.rint(np.expm1(umis.X.toarray()) * adata.obs["n_counts"].to_numpy()[:, None] / 1e4)
    labs = si.pp.split_sites(umis, n_sites=3, label_key="bulk_labels", seed=0)
    return {"spots": spots, "screens": screens, "mdata_a": mdata_a, "rna_b": rna_b, "labs": labs}


def test_the_readme_names_what_it_leaves_to_the_reader():
    lines = "\n".join(python_blocks(README.read_text())).splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("# Your own sites")]
    comments = " ".join(line for i in starts for line in lines[i : i + 3] if line.startswith("#"))
    assert [name for name in YOURS if name not in comments] == []


def test_the_readme_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    pytest.importorskip("igraph")
    monkeypatch.chdir(tmp_path)  # the README writes its model, files and checkpoints where it runs
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for index, block in enumerate(python_blocks(README.read_text())):
        if "# Your own sites" in block:
            namespace.update(stand_ins())
        exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
    # What the README says it leaves behind, where it says
    sites, model = namespace["sites"], namespace["model"]
    assert set(sites) == {"site_0", "site_1", "site_2"}
    assert "leiden" in sites["site_0"].obs
    assert "X_scinfl" in namespace["query"].obsm
    assert "bulk_labels_transferred" in namespace["query"].obs
    assert (tmp_path / "model_dir" / "model.json").is_file()
    assert namespace["pseudobulk"].n_obs > 0
    assert model.spec.sites == ("site_0", "site_1", "site_2")
    assert (tmp_path / "run").is_dir()
    labs = namespace["labs"]
    assert labs["site_1"].obsm["X_pca"].shape == (labs["site_1"].n_obs, 30)  # pbmc68k_reduced's own had 50
    assert labs["site_1"].uns["pca"]["params"]["use_highly_variable"]
    joint = namespace["joint"]  # the integration: two founding labs and one mapped in
    assert set(joint.obs["site"]) == {"site_0", "site_1", "site_2"}
    assert np.isfinite(joint.obs["site_mixing"]).all()
    assert namespace["integrated"].task.batches(namespace["integrated"].schema) == ("site_0", "site_1")
