"""The notebooks are the source of truth: nbdev_export and nbdev_clean must leave the repo unchanged."""
import shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _copy_repo(tmp):
    for name in ["nbs", "guide", "exercises", "solutions", "settings.ini", "setup.py", "README.md"]:
        src = ROOT / name
        if src.is_dir(): shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__", "artifacts", ".ipynb_checkpoints"))
        elif src.exists(): shutil.copy(src, tmp / name)
    return tmp


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_package_is_exported_from_notebooks(tmp_path):
    repo = _copy_repo(tmp_path)
    shutil.rmtree(repo / "guide"); (repo / "guide").mkdir(); shutil.copy(ROOT / "guide" / "__init__.py", repo / "guide")
    subprocess.run([BIN / "nbdev_export"], cwd=repo, check=True, capture_output=True)
    exported, committed = _files(repo / "guide"), _files(ROOT / "guide")
    assert sorted(exported) == sorted(committed), "guide/ has files nbdev_export does not write (never edit guide/ by hand); run `nbdev_export`"
    stale = [f for f in exported if exported[f] != committed[f]]
    assert not stale, f"guide/ is out of sync with nbs/ for {stale}: run `nbdev_export` (never edit guide/ by hand)"


def test_notebooks_are_clean(tmp_path):
    repo = _copy_repo(tmp_path)
    for folder in ["nbs", "exercises", "solutions"]:
        if not (repo / folder).exists(): continue
        before = _files(repo / folder)
        subprocess.run([BIN / "nbdev_clean", "--fname", str(repo / folder)], cwd=repo, check=True, capture_output=True)
        after = _files(repo / folder)
        dirty = [f for f in before if before[f] != after.get(f)]
        assert not dirty, f"notebooks not clean (run `nbdev_clean`): {dirty}"
