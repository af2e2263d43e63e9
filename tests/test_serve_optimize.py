"Regression tests for guide.serve.optimize: export caching, int8 staleness, logging state, OrtDecoder and TrtRunner checks."
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from guide.model import Llama, ModelConfig, generate

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from guide.serve.optimize import (OrtDecoder, TrtRunner, _weights_key, export_decoder, export_encoder,  # noqa: E402
                                  ort_session, quantize_int8)

CFG = dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64)


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return Llama(ModelConfig(**{**CFG, **overrides})).eval()


@pytest.fixture(scope="module")
def cached_decoder(tmp_path_factory):
    "One implicit (cached) export of a tiny decoder, shared by the tests below."
    mp = pytest.MonkeyPatch()
    mp.setenv("GUIDE_CACHE", str(tmp_path_factory.mktemp("cache")))
    model = tiny_llama()
    yield model, export_decoder(model)
    mp.undo()


def prefill_logits(session, ids):
    empty = np.zeros((1, ids.shape[0], 1, 0, 16), np.float32)
    return OrtDecoder(session, 1, 1, 16).step(ids, empty, empty.copy())[0]


# 1. export caching

def test_cache_key_covers_buffers_and_config():
    a, b = tiny_llama(), tiny_llama(rope_theta=500.0)
    b.load_state_dict(a.state_dict())                 # same weights; only the rope tables and config differ
    assert _weights_key(a) != _weights_key(b)
    c = tiny_llama(norm_eps=1e-6); c.load_state_dict(a.state_dict())    # config only: no tensor differs
    assert _weights_key(a) != _weights_key(c)
    d = tiny_llama(); d.load_state_dict(a.state_dict())
    assert _weights_key(a) == _weights_key(d)
    with torch.no_grad(): d.rope_cos[3, 0] += 1       # a non-persistent buffer
    assert _weights_key(a) != _weights_key(d)


def test_implicit_export_is_reused(cached_decoder):
    model, path = cached_decoder
    before = path.stat().st_mtime_ns
    assert export_decoder(model) == path and path.stat().st_mtime_ns == before


def test_explicit_path_is_always_rewritten(cached_decoder, tmp_path):
    model, _ = cached_decoder
    dec, enc_path = tmp_path / "dec.onnx", tmp_path / "enc.onnx"
    dec.write_bytes(b"an older export"); enc_path.write_bytes(b"an older export")
    x = torch.randint(0, 64, (1, 7))
    with torch.no_grad(): want = model(x)[0].numpy()
    np.testing.assert_allclose(prefill_logits(ort_session(export_decoder(model, dec)), x.numpy()), want, atol=1e-4)
    from guide.serve.batcher import TextEncoder, pad_batch
    enc = TextEncoder(64, dim=32, n_layers=1, n_heads=2, max_len=32).eval()
    root, tonnx = logging.getLogger(), logging.getLogger("torch.onnx")
    saved = root.level, tonnx.level
    try:
        root.setLevel(logging.WARNING); tonnx.setLevel(logging.INFO)
        sess = ort_session(export_encoder(enc, enc_path))
        assert (root.level, tonnx.level) == (logging.WARNING, logging.INFO)     # 3. export restores the logger
    finally:
        root.setLevel(saved[0]); tonnx.setLevel(saved[1])
    xb, mb = pad_batch([[1, 2, 3], [4, 5]])
    with torch.no_grad(): ref = enc(xb, mb)[0].numpy()
    np.testing.assert_allclose(sess.run(None, {"input_ids": xb.numpy(), "attention_mask": mb.numpy()})[0], ref, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec.onnx", "enc.onnx"]         # no temp files left


def test_export_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="Llama"): export_decoder(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="path"): export_decoder(tiny_llama(), 3)
    with pytest.raises(TypeError, match="TextEncoder"): export_encoder("model", tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


# 2. and 3. int8

def matmul_model(path, w):
    "A one-MatMul ONNX model `y = x @ w`: quantizable, and built in milliseconds."
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
                              [numpy_helper.from_array(w.astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def run_mm(path, x): return ort_session(path).run(None, {"x": x})[0]


def test_quantize_int8_is_never_stale(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    w1, w2 = rng.standard_normal((16, 16)), rng.standard_normal((16, 16))
    src = matmul_model(tmp_path / "m.onnx", w1)
    q = quantize_int8(src)
    np.testing.assert_allclose(run_mm(q, x), x @ w1, atol=0.2)
    built = q.stat().st_ino                                                # a rebuild is a new file (atomic replace)
    assert quantize_int8(src) == q and q.stat().st_ino == built            # the same source: reused
    os.utime(src)                                                          # touched, same content: still reused
    assert quantize_int8(src) == q and q.stat().st_ino == built
    matmul_model(src, w2)                                                  # the source changes, and its mtime goes
    old = q.stat().st_mtime_ns - 10**9                                     # backwards (a copy that keeps times, a restore)
    os.utime(src, ns=(old, old))
    np.testing.assert_allclose(run_mm(quantize_int8(src), x), x @ w2, atol=0.2)
    built = q.stat().st_ino
    q.with_name(q.name + ".source-sha256").write_text("0" * 64)            # a stamp that does not match: rebuilt
    np.testing.assert_allclose(run_mm(quantize_int8(src), x), x @ w2, atol=0.2)
    assert q.stat().st_ino != built
    dst = tmp_path / "explicit.onnx"
    dst.write_bytes(b"stale")
    np.testing.assert_allclose(run_mm(quantize_int8(src, dst), x), x @ w2, atol=0.2)


def test_quantize_int8_restores_root_logger(tmp_path):
    src = matmul_model(tmp_path / "m.onnx", np.eye(16))
    root, saved = logging.getLogger(), logging.getLogger().level
    try:
        root.setLevel(logging.INFO)
        quantize_int8(src)
        assert root.level == logging.INFO
    finally:
        root.setLevel(saved)


def test_quantize_int8_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"): quantize_int8(tmp_path / "nope.onnx")
    with pytest.raises(TypeError, match="src"): quantize_int8(3)
    src = matmul_model(tmp_path / "m.onnx", np.eye(16))
    with pytest.raises(ValueError, match="differ"): quantize_int8(src, src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# 4. OrtDecoder.generate

class CountingSession:
    "An ORT session that counts `run` calls."
    def __init__(self, session): self.session, self.calls = session, 0
    def get_outputs(self): return self.session.get_outputs()
    def run(self, *args):
        self.calls += 1
        return self.session.run(*args)


def test_generate_matches_torch_without_a_wasted_step(cached_decoder):
    model, path = cached_decoder
    sess = CountingSession(ort_session(path))
    dec = OrtDecoder(sess, 1, 1, 16)
    x = torch.randint(0, 64, (2, 5))
    assert dec.generate(x.numpy(), 6, max_seq_len=64) == generate(model, x, 6)[:, 5:].tolist()
    assert sess.calls == 6                 # prefill + 5 decode steps: the 6th token needs no step
    assert dec.generate([[1, 2, 3]], 1) == generate(model, torch.tensor([[1, 2, 3]]), 1)[:, 3:].tolist()


def test_generate_rejects_bad_input(cached_decoder):
    dec = OrtDecoder(ort_session(cached_decoder[1]), 1, 1, 16)
    assert dec.vocab_size == 64
    ids = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"): dec.generate(ids, 0)
    with pytest.raises(TypeError, match="max_new_tokens"): dec.generate(ids, 2.0)
    with pytest.raises(ValueError, match=r"\[0, 64\)"): dec.generate(np.array([[70, 1]]), 2)
    with pytest.raises(ValueError, match=r"\[0, 64\)"): dec.generate(np.array([[-1, 1]]), 2)
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"): dec.generate(ids, 62, max_seq_len=64)
    with pytest.raises(ValueError, match="non-empty"): dec.generate(np.zeros((1, 0), np.int64), 2)
    with pytest.raises(ValueError, match="non-empty"): dec.generate(np.array([1, 2]), 2)
    with pytest.raises(TypeError, match="integers"): dec.generate(np.array([[1.5, 2.0]]), 2)
    assert len(dec.generate(ids, 61, max_seq_len=64)[0]) == 61      # exactly fills the context


# 5. TrtRunner input checks (TensorRT is not installed here: a fake engine stands in)

def fake_trt_runner():
    runner = TrtRunner.__new__(TrtRunner)
    runner.trt = SimpleNamespace(float32="f32", int64="i64")
    dtypes = {"input_ids": "i64", "attention_mask": "i64", "class_logits": "f32"}
    runner.engine = SimpleNamespace(get_tensor_dtype=dtypes.__getitem__)
    runner.inputs, runner.outputs, runner.context = ["input_ids", "attention_mask"], ["class_logits"], None
    return runner


def test_trt_runner_checks_feeds_without_touching_them():
    runner, ids = fake_trt_runner(), torch.ones(2, 3, dtype=torch.int64)
    with pytest.raises(KeyError, match="attention_mask"): runner({"input_ids": ids})
    with pytest.raises(ValueError, match="token_type_ids"): runner({"input_ids": ids, "attention_mask": ids, "token_type_ids": ids})
    with pytest.raises(TypeError, match="expects torch.int64"): runner({"input_ids": ids.float(), "attention_mask": ids})
    with pytest.raises(TypeError, match="torch.Tensor"): runner({"input_ids": [[1, 1, 1]], "attention_mask": ids})
    feeds = {"input_ids": ids.t(), "attention_mask": ids}          # non-contiguous on purpose
    with pytest.raises(ValueError, match="CUDA"): runner(feeds)
    assert feeds["input_ids"] is not None and not feeds["input_ids"].is_contiguous()   # the caller's dict is untouched
    with pytest.raises(TypeError, match="dict"): runner([ids, ids])
