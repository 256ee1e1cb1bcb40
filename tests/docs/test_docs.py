"""The documentation builds with warnings as errors, and every page a reader needs is in it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("sphinx_book_theme")

ROOT = Path(__file__).resolve().parents[2]  # tests/docs/ -> the repository root
DOCS = ROOT / "docs"


def sphinx_build(source: Path, out: Path) -> subprocess.CompletedProcess:
    """``sphinx-build -W --keep-going -b html``: any warning (broken reference, bad docstring) fails it."""
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d"]
    command += [str(out / ".doctrees"), str(source), str(out / "html")]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_docs_build_without_warnings(tmp_path):
    result = sphinx_build(DOCS, tmp_path)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr[-5000:]}"
    html = tmp_path / "html"
    pages = {
        "index.html": "Key-embedded federated learning",
        "api/tl.html": "train_federated",
        "api/pp.html": "split_sites",
        "api/tasks.html": "Classification",
        "api/pl.html": "history",
        "api/key.html": "FederationKey",
        "api/model.html": "FederatedModel",
        "api/privacy.html": "invert_first_layer",
        "api/internals.html": "RunSpec",
        "privacy.html": "Threat model",
        "across_sites.html": "Flower",
        "architecture.html": "Architecture",
        "benchmarks.html": "Benchmarks",
    }
    for page, text in pages.items():
        assert (html / page).is_file(), f"docs page {page} was not built"
        assert text in (html / page).read_text(encoding="utf-8"), f"{page} lacks {text!r}"
    assert (html / "_images" / "overview.png").is_file(), "the overview figure is missing"
    # Every tutorial notebook is reached through docs/tutorials -> ../tutorials and the toctree glob.
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    for notebook in notebooks:
        assert (html / "tutorials" / f"{notebook.stem}.html").is_file(), f"{notebook.name} is not in the docs"


def test_docs_build_fails_on_broken_reference(tmp_path):
    """The docs' own configuration fails the build on a broken link or a reference to no scinfl object."""
    source = tmp_path / "src"
    (source / "_static").mkdir(parents=True)
    shutil.copy(DOCS / "conf.py", source / "conf.py")
    (source / "index.md").write_text(
        "# Broken\n\nSee [a page that does not exist](no_such_page.md) and {func}`scinfl.tl.no_such_function`.\n"
    )
    result = sphinx_build(source, tmp_path / "out")
    assert result.returncode != 0
    assert "no_such_page" in result.stderr
    assert "scinfl.tl.no_such_function" in result.stderr
