"""Every chapter notebook, executed through papermill in the tiny tier (the integration tests)."""
from pathlib import Path

import pytest

from guide.tour import chapter_notebooks, run_notebook

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "test"
NOTEBOOKS = chapter_notebooks(ROOT / "nbs")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_tiny_tier(nb):
    r = run_notebook(nb, OUT / "notebooks" / nb.name, dict(tier="tiny", seed=0, out_dir=str(OUT), device="cpu"))
    assert r["ok"], f"notebook {nb.name} failed after {r['seconds']:.0f}s:\n{r['error']}"


def test_every_notebook_has_parameters_and_one_module():
    import nbformat
    for nb_path in NOTEBOOKS:
        nb = nbformat.read(nb_path, as_version=4)
        tags = [c.metadata.get("tags", []) for c in nb.cells]
        assert any("parameters" in t for t in tags), f"{nb_path.name} has no papermill parameters cell"
        exps = [c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("#| default_exp")]
        assert len(exps) == 1, f"{nb_path.name} must declare exactly one `#| default_exp` module"
