"""Data parallelism under real torchrun (2 gloo processes): parity with one process, memory vs formulas."""
import pytest

from guide.train.parallel import launch_strategies, zero_bytes_per_rank


def test_naive_ddp_fsdp2_zero2_match_single_process():
    res = launch_strategies(["single", "naive", "ddp", "fsdp2", "zero2"], nproc=2, steps=3, micro_batch=2)
    by = {r["strategy"]: r for r in res["results"]}
    ref = by["single"]["losses"]
    for s in ["naive", "ddp", "fsdp2", "zero2"]:
        assert max(abs(a - b) for a, b in zip(by[s]["losses"], ref)) < 1e-4, (s, by[s]["losses"], ref)
    psi = by["single"]["params"]
    assert abs(max(by["ddp"]["bytes_per_rank"]) / (16 * psi) - 1) < 0.1
    assert abs(max(by["fsdp2"]["bytes_per_rank"]) / (16 * psi / 2) - 1) < 0.1
    assert abs(max(by["zero2"]["bytes_per_rank"]) / zero_bytes_per_rank(psi, 2, "zero2", 4, 4, 12) - 1) < 0.1


def test_bad_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown strategy"):          # before any process starts
        launch_strategies(["zero9"], nproc=2, steps=1)
