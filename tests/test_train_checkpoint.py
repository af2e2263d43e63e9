"""Checkpoints under fire: SIGKILL a training process mid-run, resume, compare with the uninterrupted run."""
import os, signal, subprocess, sys, time

import pytest

from guide.train.checkpoint import CheckpointError, latest_checkpoint, read_losses, train_resumable, verify_checkpoint

STEPS, SAVE_EVERY = 24, 4


def _cmd(run_dir, delay=0.0):
    return [sys.executable, "-m", "guide.train.checkpoint", "train", "--run-dir", str(run_dir), "--steps", str(STEPS),
            "--save-every", str(SAVE_EVERY), "--step-delay", str(delay)]


def test_sigkill_then_resume_reproduces_the_loss_curve_bit_for_bit(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the reference, uninterrupted, in this process (same code, same single thread)
    full = train_resumable(tmp_path / "full", STEPS, SAVE_EVERY, log=lambda m: None)
    run = tmp_path / "killed"
    p = subprocess.Popen(_cmd(run, delay=0.05), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:                   # wait until it is past two checkpoints
            log = run / "losses.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= 2 * SAVE_EVERY + 2: break
            if p.poll() is not None: pytest.fail(f"training exited early:\n{p.stdout.read()}")
            time.sleep(0.05)
        else: pytest.fail("training did not reach step 10 in 120 s")
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    killed_at = len(read_losses(run))
    assert SAVE_EVERY * 2 <= killed_at < STEPS, killed_at
    # resume: same command line
    r = subprocess.run(_cmd(run), env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step_" in r.stdout
    resumed = read_losses(run)
    assert [resumed[s] for s in range(STEPS)] == full          # exact float equality, every step


def test_corrupted_checkpoint_falls_back_to_last_good(tmp_path):
    train_resumable(tmp_path, 8, 2, log=lambda m: None)
    ckpts = sorted((tmp_path / "ckpt").glob("step_*"))
    w = ckpts[-1] / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])                                 # truncated
    with pytest.raises(CheckpointError, match="truncated"): verify_checkpoint(ckpts[-1])
    msgs = []
    assert latest_checkpoint(tmp_path / "ckpt", log=msgs.append) == ckpts[-2]
    assert "truncated" in msgs[0]
    # resuming uses the good one and finishes
    train_resumable(tmp_path, 8, 2, log=msgs.append)
    assert any("resumed from step_000006" in m for m in msgs)
