"""`guide train` and the Azure ML specs: help, commands, a real single-process run, YAML validated offline."""
import json, subprocess, sys
from pathlib import Path

import pytest

from guide.launch import build_parser, launch_command, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_explains_every_launcher(capsys):
    with pytest.raises(SystemExit): main(["--help"])
    out = capsys.readouterr().out
    for word in ["single", "torchrun", "--rdzv-endpoint", "--node-rank", "deepspeed", "--hostfile", "azure", "--submit",
                 "DefaultAzureCredential", "--dry-run"]:
        assert word in out, word


def test_guide_cli_delegates_train():
    exe = Path(sys.executable).parent / "guide"                      # the console script
    if not exe.exists(): pytest.skip("the guide console script is not installed in this environment")
    r = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--launcher" in r.stdout


def test_commands():
    a = build_parser().parse_args(["--launcher", "torchrun", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:1",
                                   "--nproc-per-node", "4", "--strategy", "fsdp2"])
    cmd = launch_command(a)
    assert "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--rdzv-endpoint=h:1" in cmd and cmd[-1] == "fsdp2"
    a = build_parser().parse_args(["--launcher", "deepspeed", "--hostfile", "hosts", "--strategy", "zero2"])
    cmd = launch_command(a)
    assert cmd[0].endswith("deepspeed") and cmd[1:3] == ["--hostfile", "hosts"] and "--no_local_rank" in cmd
    with pytest.raises(SystemExit, match="rdzv-endpoint"): main(["--launcher", "torchrun", "--nnodes", "2"])
    with pytest.raises(ValueError, match="needs a launcher"): main(["--strategy", "ddp", "--steps", "1"])


def test_single_process_run_writes_model(tmp_path):
    assert main(["--steps", "3", "--micro-batch", "2", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "losses.json").read_text())
    assert len(rec["losses"]) == 3 and all(7.0 < l < 8.0 for l in rec["losses"])      # ~ln(2048) at init
    assert (tmp_path / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "azure").glob("train-*.yml")))
def test_committed_azure_job_specs_load_and_validate(spec):
    from guide.azure import validate_job_yaml
    job = validate_job_yaml(ROOT / "azure" / spec)
    assert job.code == ".." and job.distribution.type == "pytorch"
    assert job.command.startswith("python -m guide.launch --launcher single")


def test_azure_dry_run_is_default_and_submit_needs_workspace(tmp_path, monkeypatch):
    from guide.azure import validate_job_yaml
    for v in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_ML_WORKSPACE"): monkeypatch.delenv(v, raising=False)
    assert main(["--launcher", "azure", "--out", str(tmp_path)]) == 0
    validate_job_yaml(tmp_path / "azure-job.yml")
    with pytest.raises(RuntimeError, match="AZURE_SUBSCRIPTION_ID"):
        main(["--launcher", "azure", "--out", str(tmp_path), "--submit"])


def test_deepspeed_launcher_runs_zero2_on_cpu_and_matches_single(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu"); monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["--steps", "3", "--micro-batch", "4", "--out", str(tmp_path / "single")]) == 0
    rc = main(["--launcher", "deepspeed", "--nproc-per-node", "2", "--strategy", "zero2", "--steps", "3", "--micro-batch", "2",
               "--out", str(tmp_path / "ds")])
    assert rc == 0
    single = json.loads((tmp_path / "single" / "losses.json").read_text())["losses"]
    ds = json.loads((tmp_path / "ds" / "losses.json").read_text())
    assert ds["world_size"] == 2 and ds["strategy"] == "zero2"
    assert max(abs(a - b) for a, b in zip(single, ds["losses"])) < 1e-4


def test_two_node_torchrun_rendezvous_on_loopback(tmp_path):
    """Multi-node for real: two `guide train --launcher torchrun --nnodes 2` agents (one process each) meet at a
    c10d rendezvous on 127.0.0.1, train DDP together, and match one process with the combined batch."""
    import os, socket
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    assert main(["--steps", "3", "--micro-batch", "4", "--out", str(tmp_path / "single")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [sys.executable, "-m", "guide.launch", "--launcher", "torchrun", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--strategy", "ddp", "--steps", "3", "--micro-batch", "2",
              "--out", str(tmp_path / "two-nodes")]
    nodes = [subprocess.Popen(common + ["--node-rank", str(r)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None: p.kill()
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-2000:] for o in outs)
    single = json.loads((tmp_path / "single" / "losses.json").read_text())["losses"]
    two = json.loads((tmp_path / "two-nodes" / "losses.json").read_text())
    assert two["world_size"] == 2 and two["strategy"] == "ddp"
    assert max(abs(a - b) for a, b in zip(single, two["losses"])) < 1e-4
