"""The notebooks run top to bottom under a real Jupyter kernel, as a user runs them (nbclient, the library
behind ``jupyter nbconvert --execute``); the committed notebooks carry no outputs."""
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


# extended: a leave-one-modality-out study (the LOO CLI test is too); the planner's notebook (its functions
# are tested in test_plan.py, and 01 keeps a kernel in the default run)
SLOW = {"03_modality_study.ipynb", "02_model_parallel_plan.ipynb"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.extended) if p.name in SLOW else p
                                  for p in NOTEBOOKS], ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LAMPSEG_HOME", str(tmp_path / "home"))  # the kernel inherits this environment
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: commit it bare"
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell and its traceback on any error
    ran = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in ran)
    errors = [o for c in ran for o in c.outputs if o.output_type == "error"]
    assert not errors, json.dumps(errors)[:2000]
