"""The CPU benchmarks still run: each script's `--smoke` run (small sizes, a few seconds) exits 0 and writes its JSON
and plot to a scratch folder, never to benchmarks/results/. The numbers are not checked here: speed is the
scripts' own business, run in full (see README)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["rlhf_generation_split", "serve_batcher", "serve_chunked_prefill", "serve_detokenize", "serve_engine", "serve_grammar_masks",
         "serve_json_mode", "serve_onnx", "serve_prefix_cache", "serve_sampling", "serve_speculative", "serve_tool_masks", "vision_loader"]


def test_every_script_with_a_smoke_run_is_listed():
    have = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if "--smoke" in p.read_text()}
    assert have == set(SMOKE), f"benchmarks with --smoke not listed here: {sorted(have - set(SMOKE))}; listed without: {sorted(set(SMOKE) - have)}"


@pytest.mark.parametrize("name", SMOKE)
def test_benchmark_smoke_run_writes_its_results(name, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GUIDE_PROGRESS="0", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{name} --smoke failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    results = sorted(tmp_path.glob("*.json"))
    assert results and sorted(tmp_path.glob("*.png")), f"{name} wrote {sorted(p.name for p in tmp_path.iterdir())}"
    for path in results: assert json.loads(path.read_text()), path
