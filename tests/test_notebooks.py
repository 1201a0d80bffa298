"""The notebooks in notebooks/: committed without outputs, and every cell runs (small mode).

Each notebook is executed top to bottom in a fresh IPython kernel by nbclient with
DSPARK_NOTEBOOK_SMALL=1 (its first cell reads it and shrinks sizes: a handful of training steps,
short generations); any cell error fails the test with the cell's traceback. The install cell is a
no-op here because the checkout is importable (PYTHONPATH).
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]


def test_notebooks_exist():
    assert {"quickstart", "train_a_drafter", "serving"} <= set(NAMES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has outputs: strip them"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_executes(path, tmp_path, monkeypatch):
    target, draft = REPO / "models" / "pystd-qwen3-target", REPO / "models" / "pystd-dspark-k7"
    monkeypatch.setenv("DSPARK_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("DSPARK_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("DSPARK_TARGET_DIR", str(target))  # exercises the "your own model" cell
    monkeypatch.setenv("DSPARK_DRAFT_DIR", str(draft))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except CellExecutionError as err:  # the message carries the failing cell and its traceback
        pytest.fail(f"{path.name}: a cell failed:\n{err}")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
