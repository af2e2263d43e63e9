"""Fast unit tests of guide.train: accumulation parity, the loop, mixtures, EWC, ZeRO arithmetic, atomic writes."""

import numpy as np
import pytest
import torch

from guide.model import Llama, ModelConfig
from guide.train.checkpoint import atomic_write, load_checkpoint, save_checkpoint, verify_checkpoint, CheckpointError
from guide.train.continual import MixtureStream, rewarm_lr
from guide.train.ewc import EWC, fisher_diagonal, split_prose_code
from guide.train.loop import accumulate, autocast_ctx, mfu, train
from guide.train.parallel import zero_bytes_per_rank

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


def _model(seed=0):
    torch.manual_seed(seed); return Llama(CFG)


def test_k_micro_batches_equal_one_big_batch():
    x, y = torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16))
    a, b = _model(), _model()
    accumulate(a, [(x, y)]); accumulate(b, zip(x.chunk(4), y.chunk(4)))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)


class _Loader:
    block_size = 16
    def __init__(self): self.g = torch.Generator().manual_seed(0)
    def next_batch(self):
        x = torch.randint(0, 8, (4, 17), generator=self.g)    # a tiny vocabulary: learnable in a few steps
        return x[:, :-1], x[:, 1:]


def test_train_loop_records_and_learns():
    m = _model(); hist = train(m, _Loader(), _Loader(), steps=30, lr=1e-2, warmup=3, accum=2, eval_every=10, peak_flops=1e9)
    assert len(hist) == 30 and {"lr", "loss", "grad_norm", "tokens_per_s", "mfu"} <= set(hist[0])
    assert hist[-1]["val_loss"] < hist[0]["loss"] - 1.0
    assert hist[2]["lr"] == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="CUDA"): autocast_ctx("cpu", torch.float16)
    with pytest.raises(ValueError): mfu(1, 1, 0)


def test_compiled_bf16_loop_matches_eager():
    """`train(compile=True)` (torch.compile) gives the eager loss curve; bf16 autocast stays near fp32
    (on CPU the attention core runs in fp32, see guide.model.attend)."""
    eager = train(_model(), _Loader(), steps=4, lr=1e-2, warmup=1, peak_flops=1e9)
    compiled = train(_model(), _Loader(), steps=4, lr=1e-2, warmup=1, peak_flops=1e9, compile=True)
    np.testing.assert_allclose([h["loss"] for h in compiled], [h["loss"] for h in eager], rtol=1e-4)
    bf16 = train(_model(), _Loader(), steps=4, lr=1e-2, warmup=1, peak_flops=1e9, dtype=torch.bfloat16)
    np.testing.assert_allclose([h["loss"] for h in bf16], [h["loss"] for h in eager], atol=0.05)


def test_mixture_stream_weights_and_resume():
    doms = {"a": np.arange(500), "b": np.arange(500) + 1000}
    s = MixtureStream(doms, {"a": 1, "b": 3}, 8, 256, seed=1)
    s.next_batch(); assert abs((s.last_domains == 1).mean() - 0.75) < 0.08
    st = s.state_dict(); x = s.next_batch()[0]; s.load_state_dict(st)
    assert torch.equal(s.next_batch()[0], x)
    assert rewarm_lr(0, 1.0, 10, 100) == pytest.approx(0.1)


def test_ewc_penalty_and_online_fisher():
    m = torch.nn.Linear(4, 1)
    F = fisher_diagonal(m, lambda mm, b: mm(b).pow(2).mean(), [torch.randn(3, 4) for _ in range(5)])
    e = EWC(10.0, gamma=0.5); e.consolidate(m, F)
    assert e.penalty(m).item() == 0.0
    with torch.no_grad(): m.weight.add_(1.0)
    assert e.penalty(m).item() == pytest.approx(5.0 * F["weight"].sum().item(), rel=1e-5)
    prose, code = split_prose_code('def f():\n    """Doc."""\n    return 1  # one\n')
    assert prose == "Doc.\none" and code == "def f():\n    return 1"


def test_zero_formulas():
    assert zero_bytes_per_rank(10, 2, "ddp") == 160
    assert zero_bytes_per_rank(10, 2, "zero1") == 40 + 60
    assert zero_bytes_per_rank(10, 2, "zero2") == 20 + 70
    assert zero_bytes_per_rank(10, 2, "zero3-bf16") == 80


def test_checkpoint_roundtrip_and_atomicity(tmp_path):
    m = _model(); opt = torch.optim.AdamW(m.parameters()); accumulate(m, [(torch.randint(0, 64, (2, 8)),) * 2]); opt.step()
    path = save_checkpoint(tmp_path, 3, m, opt)
    m2 = _model(1); opt2 = torch.optim.AdamW(m2.parameters())
    assert load_checkpoint(path, m2, opt2)["step"] == 3
    for p, q in zip(m.parameters(), m2.parameters()): assert torch.equal(p, q)
    assert opt2.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
    (path / "state.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError): verify_checkpoint(path)
    def fail(t): t.write_text("partial"); raise OSError("disk full")
    with pytest.raises(OSError): atomic_write(tmp_path / "x.txt", fail)
    assert not (tmp_path / "x.txt").exists() and not list(tmp_path.glob(".x.txt*"))
