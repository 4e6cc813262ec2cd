"""The notebooks are committed without outputs and run top to bottom on the CPU (a copy is executed)."""

import time

import nbformat
import pytest
import torch

from conftest import REPO

nbclient = pytest.importorskip("nbclient")
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_forward_process.ipynb", "02_sampling.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: a short training in 02 (the notebook's default is about 2 minutes),
    # the test session's thread count, and a working directory of its own.
    monkeypatch.setenv("DDPMLAB_NOTEBOOK_STEPS", "40")
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    monkeypatch.delenv("DDPMLAB_CKPT", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # 02's training run directory (tempfile.mkdtemp) lands here
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    seconds = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 4, f"{path.name} drew {len(figures)} figures"
    print(f"{path.name}: {seconds:.0f}s")  # each notebook is meant to run in under 3 minutes on a CPU
