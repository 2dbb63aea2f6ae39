"""Every notebook in colabs/ runs end to end (SAFETY_ALIGN_SMOKE=1 shrinks sizes; same cells)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("SAFETY_ALIGN_SMOKE", "1")
  monkeypatch.setenv("SAFETY_ALIGN_RUNS", str(tmp_path))
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors


def test_notebooks_use_only_the_public_api():
  """Notebooks import only ``safety_align`` itself (API.md) and call the CLI entry points."""
  for path in NOTEBOOKS:
    source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    assert "from safety_align." not in source and "import safety_align." not in source, path
