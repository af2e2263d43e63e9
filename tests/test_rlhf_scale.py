"""RLHF chapter (nbs/50-56): the TRL GRPO trainer entry point, in one process and as 2 CPU processes under torchrun."""
import json, os, subprocess, sys


ENV = os.environ | dict(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", GUIDE_PROGRESS="0")


def _run(args, tmp_path, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"] if nproc > 1 \
        else [sys.executable]
    cmd = launcher + ["-m", "guide.rlhf.scale", "--model", "fresh", "--tier", "tiny", "--out", str(tmp_path)] + args
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((tmp_path / "results.json").read_text())


def test_grpo_entry_point_two_processes(tmp_path):
    res = _run(["--trainer", "grpo", "--steps", "2", "--batch-size", "8"], tmp_path, nproc=2)
    assert res["world_size"] == 2 and res["steps"] == 2
    assert len(res["reward"]) == 2 and all(0.0 <= r <= 1.0 for r in res["reward"])


def test_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "guide.rlhf.scale", "--help"], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--trainer" in proc.stdout and "grpo" in proc.stdout


def test_bad_trainer_is_refused():
    proc = subprocess.run([sys.executable, "-m", "guide.rlhf.scale", "--trainer", "ppo"], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
