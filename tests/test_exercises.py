"""Exercises and solutions: solutions pass; blank exercises fail at a check with its helpful message."""
from pathlib import Path

import pytest

from guide.tour import run_notebook

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "test"
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


def test_every_exercise_has_a_solution():
    assert EXERCISES, "no exercises found"
    assert [p.name for p in EXERCISES] == [p.name for p in SOLUTIONS]


@pytest.mark.parametrize("nb", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solution_passes(nb):
    r = run_notebook(nb, OUT / "solutions" / nb.name, dict(tier="tiny", seed=0, out_dir=str(OUT)))
    assert r["ok"], r["error"]


@pytest.mark.parametrize("nb", EXERCISES, ids=[p.stem for p in EXERCISES])
def test_blank_exercise_fails_helpfully(nb):
    r = run_notebook(nb, OUT / "exercises" / nb.name, dict(tier="tiny", seed=0, out_dir=str(OUT)))
    assert not r["ok"], f"{nb.name} passes with its TODOs blank: its checks check nothing"
    assert "ExerciseFailed" in r["error"] and "not filled in" in r["error"], \
        f"{nb.name} should fail at a check saying the TODO is not filled in, not with:\n{r['error']}"
