"""Sphinx configuration for scinfl's documentation.

Build it with ``pip install -e ".[docs]" && sphinx-build -b html docs docs/_build/html``; CI builds it with
warnings as errors (``tests/docs/test_docs.py``). The tutorials are notebooks in ``tutorials/`` at the
repository root, reached through the committed symlink ``docs/tutorials``; they are rendered with the outputs
they were saved with, not re-executed here.
"""

from __future__ import annotations

from importlib.metadata import version as _version
from importlib.util import find_spec
from pathlib import Path

from sphinx import addnodes

project = "scinfl"
author = "scinfl developers"
copyright = "2026, scinfl developers"
release = _version("scinfl")
version = release

extensions = [
    "myst_nb",  # Markdown (MyST) pages and Jupyter notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # numpy-style docstrings
    "sphinx.ext.viewcode",
]

exclude_patterns = [
    "_build",
    "**.ipynb_checkpoints",
    "Thumbs.db",
    ".DS_Store",
    "make_figures.py",
    "tutorials/README.md",  # GitHub's index of the notebooks; tutorials.md is the site's
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# Notebooks are shown as committed, with their saved outputs; the build never runs them.
nb_execution_mode = "off"
nb_merge_streams = True

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3  # `[text](#a-heading)` links, as on GitHub

# API reference: autodoc with numpy-style docstrings; types are read from the signatures.
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
# The Flower pieces (scinfl.flower_apps, scinfl.federation.flower) import Flower, an optional extra: without it
# (`pip install -e ".[docs]"` alone) their pages are built from mocks of flwr and of its tomli_w.
autodoc_mock_imports = [] if find_spec("flwr") else ["flwr", "tomli_w"]
autodoc_inherit_docstrings = False  # torch's own docstrings (nn.Module methods) are not scinfl's docs
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
# Returns sections are prose in this project (STYLE.md: types live in the signature), often followed by a
# list of the AnnData fields a function writes. Napoleon's numpy parser would read the first "text: more"
# as "name: type"; rendering the section as written keeps both that prose and the typed entries intact.
napoleon_custom_sections = ["Returns"]

# Every reference to a scinfl object must resolve, so a typo in a docstring's :func:`scinfl....` fails the
# build. References to other packages (torch, numpy, AnnData, ... in signatures) cannot be resolved
# offline (no intersphinx) and are not checked; neither are unqualified names (`~.predict`, `KeyFileError`).
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!scinfl\.).*")]

html_theme = "sphinx_book_theme"
html_title = f"scinfl {release}"
html_static_path = ["_static"]
html_theme_options = {"show_toc_level": 2}


_TUTORIALS = (Path(__file__).parent / "tutorials").resolve()


def _link_tutorials(app, doctree) -> None:
    """Point links to notebooks back into ``docs/tutorials``.

    Sphinx resolves symlinks in link targets (``BuildEnvironment.relfn2path``), so a link to a notebook, for
    example from one tutorial to the next, names ``<repository>/tutorials/02_privacy``: a document outside
    the source directory, which MyST reports as unknown. This maps such targets to ``tutorials/02_privacy``;
    a link to a notebook that does not exist still fails the build.
    """
    prefix = _TUTORIALS.as_posix() + "/"
    for node in doctree.findall(addnodes.pending_xref):
        target = node.get("reftarget", "")
        if node.get("reftype") == "myst" and target.startswith(prefix):
            node["reftarget"] = "tutorials/" + target.removeprefix(prefix)


def setup(app):
    app.connect("doctree-read", _link_tutorials)
