"""The tutorials (``tutorials/*.ipynb``): each one executes top to bottom, and each committed one carries its
outputs, figures included, because the documentation renders them without executing them again (myst-nb).

Execution uses each notebook's small settings (``SCINFL_TUTORIAL_QUICK=1``: fewer rounds, seeds and attacks),
which checks that the code runs, not what it finds. The committed outputs come from the full run. A notebook
lists the optional packages it needs in its metadata (``"scinfl": {"requires": ["flwr"]}``), and the data files
of ``../shared/data`` it reads (``"scinfl": {"data": ["sepal_mob_st.h5ad"]}``; no package ships them): without
them its execution is skipped. The kernel finds the data in ``SCINFL_DATA_DIR``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"  # tests/docs/ -> the repository root
DATA_DIR = TUTORIALS.parents[1] / "shared" / "data"  # ../shared/data beside the checkout
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds; a quick Flower deployment takes one to two minutes on 2 busy cores
MAX_BYTES = 1_500_000  # committed notebooks stay small: figures at about 80 dpi


def _ids(path: Path) -> str:
    return path.stem


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.strip()]


def _kernel_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SCINFL_TUTORIAL_QUICK="1",
        MPLBACKEND="Agg",  # no figure output needed here; the committed notebooks carry them
        # One thread each for torch (OMP) and numpy's BLAS: on 2 shared cores a multithreaded OpenBLAS made
        # the privacy audit's SVDs ten times slower.
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYDEVD_DISABLE_FILE_VALIDATION="1",  # silences the debugger's warning about frozen modules
        SCINFL_DATA_DIR=str(DATA_DIR),
    )
    return env


def test_every_tutorial_is_found():
    assert len(NOTEBOOKS) >= 5, f"expected the tutorials in {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_tutorial_executes(path: Path, tmp_path: Path):
    """Top to bottom in a fresh kernel with the small settings, with no error and no file left behind."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no 'python3' Jupyter kernel")
    notebook = _read(path)
    missing = [
        name
        for name in notebook.metadata.get("scinfl", {}).get("requires", [])
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}")
    absent = [
        name
        for name in notebook.metadata.get("scinfl", {}).get("data", [])
        if not (DATA_DIR / name).is_file()
    ]
    if absent:
        pytest.skip(f"{path.name} reads {', '.join(absent)}, absent from {DATA_DIR}")
    tutorials_before = sorted(p.name for p in TUTORIALS.iterdir())

    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        startup_timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute(env=_kernel_environment())  # raises CellExecutionError at the first failing cell

    # Temporary files go to temporary directories that the notebook removes: nothing in its working
    # directory, nothing new in the repository.
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert sorted(p.name for p in TUTORIALS.iterdir()) == tutorials_before


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_committed_tutorial_carries_its_outputs(path: Path):
    """Executed in one run, top to bottom, without errors, with at least one figure, and not too large."""
    notebook = _read(path)
    cells = _code_cells(notebook)
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: not executed top to bottom in one run"
    outputs = [output for cell in cells for output in cell.outputs]
    errors = [output for output in outputs if output.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    assert any(cell.outputs for cell in cells), f"{path.name} has no outputs"
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert figures, f"{path.name} has no figure (image/png output) for the documentation"
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"


# A home, user or temporary directory of the machine that executed a notebook, in POSIX or Windows form.
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/(?:home|root|Users|tmp|work|private|var/folders)/|[A-Z]:\\Users)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_committed_tutorial_holds_no_absolute_path(path: Path):
    """Outputs must not show where the notebook was executed (a user name, a temporary directory)."""
    outputs = [output for cell in _code_cells(_read(path)) for output in cell.outputs]
    text = "\n".join(
        "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
        for output in outputs
    )
    found = sorted({match.group(0) for match in ABSOLUTE_PATH.finditer(text)})
    assert not found, f"{path.name}: outputs hold absolute paths starting {found}"


def test_absolute_paths_are_recognised():
    assert ABSOLUTE_PATH.search("written to /tmp/scinfl-xyz/model")
    assert ABSOLUTE_PATH.search("C:\\Users\\ana\\site.h5ad")
    assert not ABSOLUTE_PATH.search("model written to <workdir>/run/model; 20/30 rounds")
