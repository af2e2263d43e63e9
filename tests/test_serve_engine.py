"""Chapter 20 (serving): the paged KV cache, the decode steps and the continuous-batching engine (notebooks 21-23), the dynamic batcher, ONNX parity (no notebook needed)."""
import importlib.util
import os
import random
import subprocess
import sys
import time
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from guide.core import setup_torch
from guide.model import Llama, ModelConfig, generate
from guide.serve.engine import AsyncEngine, Engine, SamplingParams
from guide.serve.kvcache import BlockAllocator, NoFreeBlocks

setup_torch()


@pytest.fixture(scope="module")
def base():
    from guide.pretrained import tiny_base
    return tiny_base()


def test_allocator_free_list():
    a = BlockAllocator(3)
    got = a.allocate(3)
    assert sorted(got) == [0, 1, 2] and a.num_free == 0
    with pytest.raises(NoFreeBlocks): a.allocate(1)
    a.release(got[:2])
    with pytest.raises(ValueError): a.release(got[:1])
    assert a.num_free == 2
    for bad in (0, -1, "3", 2.0, True): pytest.raises(ValueError, BlockAllocator, bad)
    for bad in (-1, 1.5, "1"): pytest.raises(ValueError, a.allocate, bad)
    assert a.num_free == 2


def test_bad_engine_arguments_are_clear_errors():
    from guide.serve.engine import IncrementalDetokenizer, make_trace
    model = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64))
    for kw in (dict(block_size=0), dict(block_size=2.5), dict(max_batch_size=0), dict(max_prefill_tokens=0),
               dict(decode_steps=0), dict(num_blocks=0), dict(num_blocks="8"), dict(speculate=-1), dict(speculate=1.5),
               dict(speculate_max_batch=0), dict(speculate_max_batch=2.0)):
        with pytest.raises(ValueError, match=next(iter(kw))): Engine(model, **kw)
    for kw in (dict(paged_attention=True), dict(pdl=True)):
        with pytest.raises(ValueError, match="CUDA"): Engine(model, **kw)           # options of the CUDA-graph decode
    with pytest.raises(TypeError, match="decode"): IncrementalDetokenizer(None)
    with pytest.raises(ValueError, match="vocab_size"): make_trace(3, 2)


def test_greedy_equals_generate_under_continuous_batching(base):
    model, tok = base
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 2048) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    lens = [rng.randint(1, 50) for _ in prompts]
    eng = Engine(model, tok, block_size=8, num_blocks=200, max_batch_size=4)
    res = eng.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens])
    for p, n, r in zip(prompts, lens, res):
        want = generate(model, torch.tensor([p]), n)[0, len(p):].tolist()
        assert r["token_ids"] == want
    assert eng.num_free_blocks == 200 and not eng.running and not eng.waiting


def test_preemption_keeps_output(base):
    model, tok = base
    eng = Engine(model, tok, block_size=4, num_blocks=10, max_batch_size=4)
    prompts = [tok.encode(p) for p in ["def f(", "import", "class A:", "x = "]]
    res = eng.generate(prompts, [SamplingParams(max_tokens=28, ignore_eos=True)] * 4)
    assert eng.stats["preemptions"] > 0
    for p, r in zip(prompts, res):
        assert r["token_ids"] == generate(model, torch.tensor([p]), 28)[0, len(p):].tolist()
    assert eng.num_free_blocks == 10


def test_decode_steps_give_the_same_tokens_and_fall_back_when_they_must(base):
    """`decode_steps=4`: decode-only iterations run four steps in one go. Same tokens as one step at a time
    (greedy, with a stop token inside a burst, seeded sampled requests, under preemption); blocks all come back."""
    model, tok = base
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 2048) for _ in range(rng.randint(1, 30))] for _ in range(7)]
    params = [SamplingParams(max_tokens=rng.randint(1, 40), ignore_eos=True) for _ in prompts]
    one = Engine(model, tok, block_size=4, num_blocks=200, max_batch_size=3).generate(prompts, params)
    burst = Engine(model, tok, block_size=4, num_blocks=200, max_batch_size=3, decode_steps=4)
    assert burst.generate(prompts, params) == one and burst.num_free_blocks == 200
    stop = SamplingParams(max_tokens=40, stop_token_ids=[one[0]["token_ids"][min(5, len(one[0]["token_ids"]) - 1)]])
    assert burst.generate(prompts[:1], stop) == Engine(model, tok, block_size=4, num_blocks=200).generate(prompts[:1], stop)
    sampled = SamplingParams(max_tokens=25, temperature=1.0, top_k=40, seed=7, ignore_eos=True)   # sampled on the device: the same tokens
    mixed = [SamplingParams(max_tokens=25, ignore_eos=True), sampled, SamplingParams(max_tokens=25, temperature=1.0, ignore_eos=True)]
    def run(eng):
        reqs, iterations = [eng.add_request(p, sp) for p, sp in zip(prompts[:3], mixed)], 0
        while eng.has_unfinished(): eng.step(); iterations += 1
        return [r.output_ids for r in reqs], iterations
    (in_bursts, n_burst), (one_by_one, n_one) = run(burst), run(Engine(model, tok, block_size=4, num_blocks=200, max_batch_size=3))
    assert in_bursts[:2] == one_by_one[:2] and (n_burst, n_one) == (1 + 6, 25)   # the prefill gives a token, then 6 bursts of 4
    assert in_bursts[2] != one_by_one[2]                       # no seed: a random one per request
    tight = Engine(model, tok, block_size=4, num_blocks=10, max_batch_size=4, decode_steps=4)   # too few blocks to look ahead, preempts
    short = [p[:8] for p in prompts[:4]]
    res = tight.generate(short, [SamplingParams(max_tokens=28, ignore_eos=True)] * 4)
    assert tight.stats["preemptions"] > 0
    for p, r in zip(short, res):
        assert r["token_ids"] == generate(model, torch.tensor([p]), 28)[0, len(p):].tolist()
    assert tight.num_free_blocks == 10
    with AsyncEngine(Engine(model, tok, block_size=4, num_blocks=200, decode_steps=4)) as ae:   # streamed in bursts: the same tokens
        streamed = [t for out in ae.stream(prompts[0], params[0], timeout=60) for t in out.token_ids]
    assert streamed == one[0]["token_ids"]
    with pytest.raises(ValueError, match="decode_steps"): Engine(model, tok, decode_steps=0)


def test_engine_serves_replaced_and_changed_weights(base):
    "The fused serving weights follow the model: parameters loaded with assign=True (new objects) or changed in place."
    import copy
    model, tok = base
    served, changed = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad(): changed.layers[-1].mlp.down_proj.weight.mul_(-4.0)
    eng, p = Engine(served, tok, num_blocks=64), SamplingParams(max_tokens=8, ignore_eos=True)
    before = eng.generate(["def"], p)
    served.load_state_dict(changed.state_dict(), assign=True)
    after = eng.generate(["def"], p)
    assert after != before and after == Engine(changed, tok, num_blocks=64).generate(["def"], p)
    with torch.no_grad(): served.layers[-1].mlp.down_proj.weight.copy_(model.layers[-1].mlp.down_proj.weight)
    assert eng.generate(["def"], p) == before


def test_no_reservation_blocks_grow_one_at_a_time(base):
    model, tok = base
    eng = Engine(model, tok, block_size=4, num_blocks=64)
    req = eng.add_request(tok.encode("def f("), SamplingParams(max_tokens=40, ignore_eos=True))
    eng.step()
    assert len(req.table) == eng.cache.blocks_for(len(req.all_ids))       # prompt + 1, not prompt + max_tokens
    for _ in range(9): eng.step()
    assert len(req.table) <= eng.cache.blocks_for(len(req.all_ids)) + 1


def test_abort_frees_blocks_immediately(base):
    model, tok = base
    eng = Engine(model, tok, block_size=4, num_blocks=64)
    req = eng.add_request("import os", SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(5): eng.step()
    assert eng.num_free_blocks < 64
    assert eng.abort(req.id) and eng.num_free_blocks == 64 and not eng.has_unfinished()
    assert not eng.abort(req.id)


def test_seed_and_stop_and_validation(base):
    model, tok = base
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    a = Engine(model, tok).generate(["def"], sp)[0]
    b = Engine(model, tok).generate(["x", "def"], [SamplingParams(max_tokens=5, temperature=1.0), sp])[1]
    assert a["token_ids"] == b["token_ids"]
    text = Engine(model, tok).generate(["def"], SamplingParams(max_tokens=30, ignore_eos=True))[0]["text"]
    stop = text[5:7]
    s = Engine(model, tok).generate(["def"], SamplingParams(max_tokens=30, stop=stop, ignore_eos=True))[0]
    assert s["finish_reason"] == "stop" and s["text"] == text[:text.find(stop)]
    eng = Engine(model, tok)
    with pytest.raises(ValueError, match="context length"): eng.add_request([1] * 500, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"): eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="token ids"): eng.add_request([5000], SamplingParams())
    with pytest.raises(ValueError): SamplingParams(temperature=float("nan"))
    with pytest.raises(TypeError): Engine(torch.nn.Linear(2, 2))


def _sentencepiece_style_tokenizer():
    "A Metaspace BPE (SentencePiece's `▁` for spaces, the leading one dropped when decoding), trained here."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from guide.data import prose_corpus
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer, t.decoder = pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace(prepend_scheme="first")
    t.train_from_iterator(prose_corpus("train")[:200], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_incremental_detokenizer_joins_to_the_whole_decode(base):
    """Byte-level BPE (characters split across tokens) and a SentencePiece-style tokenizer (a leading space that
    depends on where decoding starts): for random ids and for real text, the pieces join to `decode(ids)`, and no
    piece before the last ends in an incomplete character."""
    from hypothesis import given, settings, strategies as st
    from guide.serve.engine import IncrementalDetokenizer
    tokenizers = [base[1], _sentencepiece_style_tokenizer()]
    text = "def f(x):\n    return x  # héllo wörld — 日本語 ✓\n\nThe for statement is used to iterate."
    sp = tokenizers[1].encode("the for statement")
    assert tokenizers[1].decode(sp[1:]) == "for statement"        # where decoding starts decides the leading space

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(which=st.sampled_from([0, 1]), plain=st.booleans(), data=st.data())
    def joins(which, plain, data):
        tok = tokenizers[which]
        ids = data.draw(st.one_of(st.lists(st.integers(0, len(tok) - 1), min_size=1, max_size=60),
                                  st.just(tok.encode(text)).flatmap(lambda t: st.integers(1, len(t)).map(lambda n: t[:n]))))
        d = IncrementalDetokenizer(SimpleNamespace(decode=tok.decode) if plain else tok)     # plain: through `decode` only
        pieces = [d.add(t) for t in ids]
        assert not any(p.endswith("\ufffd") for p in pieces)
        assert "".join(pieces) + d.flush() == tok.decode(ids, skip_special_tokens=True)
    joins()


def test_stream_holds_back_what_may_start_a_stop_string(base):
    model, tok = base
    text = Engine(model, tok).generate(["def"], SamplingParams(max_tokens=40, ignore_eos=True))[0]["text"]
    first, later = text[12:15], text[25:29]
    assert first not in text[:12]
    for stops in ([later, first], [first + "\x00", text[12:14] + "\x01", later]):    # the earliest ends it / prefixes held back, then released
        eng = Engine(model, tok)
        eng.add_request("def", SamplingParams(max_tokens=40, stop=stops, ignore_eos=True))
        pieces = []
        while eng.has_unfinished(): pieces += [o.text for o in eng.step()]
        end = min(i for s in stops if (i := text.find(s)) >= 0)
        assert "".join(pieces) == text[:end]


def test_engine_takes_a_transformers_llama(base):
    from guide.model import to_hf
    model, tok = base
    out = Engine(to_hf(model), tok).generate(["def"], SamplingParams(max_tokens=10, ignore_eos=True))[0]["token_ids"]
    assert out == generate(model, torch.tensor([tok.encode("def")]), 10)[0, -10:].tolist()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_engine_greedy_equals_transformers_generate(arch):
    """A transformers Llama or Mistral (random weights, no download) served by the engine: the same greedy tokens as
    the model's own `generate`, for a batch of prompts of different lengths."""
    import transformers
    Config, Model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                     "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    torch.manual_seed(0)
    hf = Model(Config(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()
    prompts = [[5, 17, 33], [40, 2, 9, 71, 12, 8, 30], [88]]
    got = Engine(hf, max_batch_size=4).generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for p, r in zip(prompts, got):
        want = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p):]
        assert r["token_ids"] == want.tolist()
    with pytest.raises(TypeError, match="Llama or Mistral"): Engine(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)))


def test_stream_close_aborts(base):
    model, tok = base
    with AsyncEngine(Engine(model, tok, num_blocks=32)) as ae:
        it = ae.stream("def", SamplingParams(max_tokens=300, ignore_eos=True))
        next(it); it.close()
        t0 = time.monotonic()
        while ae.engine.has_unfinished() and time.monotonic() - t0 < 5: time.sleep(0.01)
        assert ae.engine.num_free_blocks == 32


def test_dynamic_batcher_batches_and_bounds():
    from guide.serve.batcher import DeadlineExceeded, DynamicBatcher, QueueFull, should_flush
    calls = []
    def fn(seqs, length):
        calls.append((len(seqs), length)); time.sleep(0.01)
        return [sum(s) for s in seqs]
    with DynamicBatcher(fn, max_batch_size=8, max_queue_delay=0.05, buckets=(4, 16)) as b:
        futs = [b.submit([i] * (1 + i % 10)) for i in range(24)]
        assert [f.result(5) for f in futs] == [i * (1 + i % 10) for i in range(24)]
        assert len(calls) < 24 and max(n for n, _ in calls) <= 8 and all(L <= 16 for _, L in calls)
        late = b.submit([1], timeout=0)
        time.sleep(0.1)
        with pytest.raises(DeadlineExceeded): late.result(5)
    q = DynamicBatcher(fn, max_queue_size=1); q.submit([1])
    with pytest.raises(QueueFull): q.submit([2])
    assert should_flush(1, 0.05, 8, 0.05) and not should_flush(7, 0.01, 8, 0.05) and not should_flush(0, 9, 8, 0.05)


def test_batched_prefill_and_length_split_decode_match_the_model(base, monkeypatch):
    "Prefill of prompts of different lengths in one call, and a decode batch split by length, give the model's own logits."
    from guide.serve import kvcache as K
    from guide.serve.kvcache import PagedKVCache, decode_forward, prefill_batch_forward
    split = K._split_by_length
    assert split([1, 1, 1, 12]) == 0 and split([1] * 30 + [12, 12]) == 30
    monkeypatch.setattr(K, "_split_by_length", lambda lens, overhead=0: split(lens, 0))   # split even this small batch
    model, _ = base
    cfg = model.config
    rng = random.Random(0)
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (3, 40, 17, 90, 5)]
    nxt = [rng.randrange(3, cfg.vocab_size) for _ in prompts]
    pc = PagedKVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks=64, block_size=8)
    tabs = [pc.allocator.allocate(pc.blocks_for(len(p) + 1)) for p in prompts]
    got = prefill_batch_forward(model, pc, prompts, tabs)
    dec = decode_forward(model, pc, nxt, [len(p) for p in prompts], tabs)      # 90 tokens vs 3..40: two groups
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = model(torch.tensor([p + [nxt[i]]]))[0][0]
            torch.testing.assert_close(got[i], ref[len(p) - 1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(dec[i], ref[len(p)], atol=1e-4, rtol=1e-4)


def test_packed_encoder_and_async_batcher():
    "The packed encoder forward equals the padded one; asyncio callers get their own answers, one wake-up per batch."
    import asyncio
    from guide.serve.batcher import DynamicBatcher, TextEncoder, encoder_fn, length_groups, pad_batch
    torch.manual_seed(0)
    enc = TextEncoder(64, dim=32, n_layers=2, n_heads=2, max_len=32).eval()
    rng = random.Random(0)
    seqs = [[rng.randrange(64) for _ in range(n)] for n in (1, 7, 32, 5, 5, 20)]
    with torch.no_grad():
        for a, b in zip(enc.forward_packed(seqs), enc(*pad_batch(seqs))): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert length_groups([4, 4, 4]) == [(0, 3)] and length_groups([2, 3, 100, 120]) == [(0, 2), (2, 4)]
    fn = encoder_fn(enc)
    assert fn.packed
    async def many(b): return await asyncio.gather(*[b.asubmit(s, timeout=10) for s in seqs * 4])
    with DynamicBatcher(fn, max_batch_size=8, max_queue_delay=0.02) as b:
        got = asyncio.run(many(b))
        assert b.stats["batches"] < len(got)
    want = fn(seqs, 32) * 4
    for g, w in zip(got, want): torch.testing.assert_close(torch.tensor(g["probs"]), torch.tensor(w["probs"]), atol=1e-5, rtol=1e-5)


def test_onnx_decoder_and_encoder_parity(tmp_path):
    "A small random decoder and encoder: ORT logits match PyTorch, greedy decode is identical, int8 stays close."
    pytest.importorskip("onnxruntime")
    import numpy as np
    from guide.serve.batcher import TextEncoder, pad_batch
    from guide.serve.optimize import OrtDecoder, OrtEncoder, export_decoder, export_encoder, ort_session, quantize_int8
    torch.manual_seed(0)
    m = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64)).eval()
    sess = ort_session(export_decoder(m, tmp_path / "dec.onnx"))
    assert sess.get_providers()[-1] == "CPUExecutionProvider"
    x = torch.randint(0, 64, (2, 5))
    got = OrtDecoder(sess, 1, 1, 16).generate(x.numpy(), 12)
    assert got == generate(m, x, 12)[:, 5:].tolist()
    enc = TextEncoder(64, dim=32, n_layers=1, n_heads=2, max_len=32).eval()
    p = export_encoder(enc, tmp_path / "enc.onnx")
    xb, mb = pad_batch([[1, 2, 3], [4, 5, 6, 7, 8], [9]])
    with torch.no_grad(): ref = enc(xb, mb)[0].numpy()
    np.testing.assert_allclose(OrtEncoder(ort_session(p))(xb, mb)[0], ref, atol=1e-4)
    q = OrtEncoder(ort_session(quantize_int8(p)))(xb, mb)[0]
    assert np.abs(q - ref).max() < 0.1


def test_tensorrt_engine_matches_onnx(tmp_path):
    from guide.serve.optimize import trt_available
    if not trt_available():
        pytest.skip("TensorRT needs the tensorrt package and a CUDA GPU; it cannot be installed on the CPU test machines")
    from guide.serve.batcher import TextEncoder, pad_batch
    from guide.serve.optimize import TrtRunner, build_trt_engine, export_encoder
    enc = TextEncoder(64, dim=32, n_layers=1, n_heads=2, max_len=32).eval()
    p = export_encoder(enc, tmp_path / "enc.onnx")
    shapes = {n: ((1, 2), (4, 16), (16, 32)) for n in ("input_ids", "attention_mask")}
    plan = build_trt_engine(p, fp16=False, shapes=shapes)
    xb, mb = pad_batch([[1, 2, 3], [4, 5, 6, 7, 8]])
    out = TrtRunner(plan)({"input_ids": xb.cuda(), "attention_mask": mb.cuda()})
    with torch.no_grad(): ref = enc(xb, mb)[0]
    torch.testing.assert_close(out["class_logits"].cpu(), ref, atol=1e-3, rtol=1e-3)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (the gpu tier runs this)")


def _peaky_model(device):
    "A random-weight Llama whose logits have wide gaps (scaled head), so greedy argmax is stable across kernel choices."
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(ModelConfig(vocab_size=512, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=256)).eval()
    with torch.no_grad(): model.lm_head.weight.mul_(20)
    return model


@needs_cuda
def test_cuda_graph_decode_equals_eager_engine():
    model = _peaky_model("cuda")
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 60))] for _ in range(12)]
    lens = [rng.randint(1, 120) for _ in prompts]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens]
    graphed = Engine(model, None, block_size=8, num_blocks=300, max_batch_size=5)   # the default kernels (paged + PDL at batch 1)
    assert graphed.graphs is not None
    eager = Engine(model, None, block_size=8, num_blocks=300, max_batch_size=5, cuda_graphs=False)
    got, want = graphed.generate(prompts, params), eager.generate(prompts, params)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
    gathered = Engine(model, None, block_size=8, num_blocks=300, max_batch_size=5, paged_attention=False, pdl=False)
    assert [r["token_ids"] for r in gathered.generate(prompts, params)] == [r["token_ids"] for r in want]
    piped = Engine(model, None, block_size=8, num_blocks=300, max_batch_size=5, overlap=True)   # a step launched before the last is read
    assert [r["token_ids"] for r in piped.generate(prompts, params)] == [r["token_ids"] for r in want] and piped.num_free_blocks == 300
    stopping = [SamplingParams(max_tokens=n, stop_token_ids=[r["token_ids"][n // 2]]) for n, r in zip(lens, want)]   # stops in flight
    assert ([r["token_ids"] for r in piped.generate(prompts, stopping)] == [r["token_ids"] for r in eager.generate(prompts, stopping)]
            and piped.stats["overlapped_bursts"] > 0 and piped.num_free_blocks == 300)
    assert len(graphed.graphs.graphs) >= 3                     # several (batch, blocks) buckets were captured and replayed
    assert graphed.num_free_blocks == 300                      # padding rows used the null block, not the free list
    ahead = Engine(model, None, block_size=8, num_blocks=300, max_batch_size=5, decode_steps=4)   # 4 greedy steps per graph
    assert [r["token_ids"] for r in ahead.generate(prompts, params)] == [r["token_ids"] for r in want]
    assert any(key[2] == 4 for key in ahead.graphs.graphs) and ahead.num_free_blocks == 300
    sampled = [SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True) for i, n in enumerate(lens)]
    want = eager.generate(prompts, sampled)                    # sampled on the device, inside the graphs: the same tokens
    assert [r["token_ids"] for r in ahead.generate(prompts, sampled)] == [r["token_ids"] for r in want]
    piped = Engine(model, None, block_size=8, num_blocks=300, max_batch_size=5, decode_steps=4, overlap=True)
    assert [r["token_ids"] for r in piped.generate(prompts, sampled)] == [r["token_ids"] for r in want] and piped.num_free_blocks == 300
    assert any(key[2] == 4 and key[3] for key in ahead.graphs.graphs) and ahead.num_free_blocks == 300
    top_k = [SamplingParams(max_tokens=n, temperature=0.8, top_k=40, seed=i, ignore_eos=True) for i, n in enumerate(lens)]
    want = eager.generate(prompts, top_k)                      # every row with a top-k: the top k_max (64 in the graphs), no sort
    assert [r["token_ids"] for r in ahead.generate(prompts, top_k)] == [r["token_ids"] for r in want]
    assert any(key[2] == 4 and key[4] == 64 for key in ahead.graphs.graphs) and ahead.num_free_blocks == 300
    if importlib.util.find_spec("triton") is not None:         # the paged kernel in every bucket (the server's --paged-attention)
        hopper = torch.cuda.get_device_capability() >= (9, 0)
        fast = Engine(model, None, block_size=8, num_blocks=300, max_batch_size=5, decode_steps=4, paged_attention=True, pdl=hopper)
        assert [r["token_ids"] for r in fast.generate(prompts, params)] == [r["token_ids"] for r in eager.generate(prompts, params)]
    loop = [rng.randrange(3, 512) for _ in range(6)]            # speculation: the checked drafts replay the decode graphs
    spec = Engine(model, None, block_size=8, num_blocks=300, max_batch_size=5, speculate=3)
    spec_prompts, spec_params = prompts[:4] + [loop * 6], params[:4] + [SamplingParams(max_tokens=60, ignore_eos=True)]
    assert [r["token_ids"] for r in spec.generate(spec_prompts, spec_params)] == [r["token_ids"] for r in eager.generate(spec_prompts, spec_params)]
    assert spec.stats["draft_tokens"] > 0 and spec.num_free_blocks == 300
    with torch.no_grad(): model.lm_head.weight.mul_(1.01)      # changed weights: the graphs are recaptured, not stale
    again = graphed.generate(prompts[:2], params[:2])
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in eager.generate(prompts[:2], params[:2])]


def test_cuda_graphs_refuse_a_cpu_model():
    from guide.serve.decode import DecodeGraphs
    from guide.serve.kvcache import PagedKVCache
    model = _peaky_model("cpu")
    cache = PagedKVCache(3, 2, 32, num_blocks=4, block_size=8)
    with pytest.raises(ValueError, match="CUDA device"): DecodeGraphs(model, cache, 4)
    assert Engine(model, None, num_blocks=8).graphs is None    # CPU: the engine runs every step eagerly


class _ReplayedGraph:
    "A CPU stand-in for a captured CUDA graph: `replay()` runs the step again into the captured output."
    def __init__(self, run): self.run, self.out = run, run()
    def replay(self): self.out.copy_(self.run())
    def pool(self): return None


def test_decode_graphs_default_to_the_paged_path_and_pdl_at_batch_one(base, monkeypatch):
    """What measured fastest on an H200 is the default: the batch-1 buckets (`decode_one`) attend with `paged_attention`
    and launch with PDL where the GPU has it (compute capability 9.0+); the batched buckets keep gather + SDPA. Explicit
    settings override it, and impossible ones are refused (CPU, with the model looking like a CUDA one)."""
    import guide.serve.decode as D
    from guide.serve.kvcache import PagedKVCache
    if D.triton is None: pytest.skip("needs Triton (decode_one)")
    model, _ = base
    cache = PagedKVCache(model.config.n_layers, model.config.n_kv_heads, model.config.head_dim, num_blocks=8, block_size=8)
    def choice(capability, **kw):
        with monkeypatch.context() as m:
            m.setattr(Llama, "device", property(lambda self: torch.device("cuda")))
            m.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
            g = D.DecodeGraphs(model, cache, 4, **kw)
        return g.paged_one, g.paged_batched, g.pdl, getattr(g.one, "keywords", {}), getattr(g.step, "keywords", {})
    assert choice((9, 0)) == (True, False, True, dict(paged=True, pdl=True), {})
    assert choice((8, 0)) == (True, False, False, dict(paged=True), {})
    assert choice((9, 0), paged_attention=True, pdl=False) == (True, True, False, dict(paged=True), dict(paged=True))
    assert choice((9, 0), paged_attention=False) == (False, False, True, dict(pdl=True), {})
    assert choice((9, 0), gemv=False) == (False, False, False, {}, {})           # no decode_one: nothing of it to change
    assert choice((9, 0), gemv=False, paged_attention=True)[:3] == (True, True, False)
    for kw, capability in ((dict(pdl=True), (8, 0)), (dict(pdl=True, gemv=False), (9, 0)), (dict(pdl=True, compile=True), (9, 0))):
        with pytest.raises(ValueError, match="pdl needs decode_one"): choice(capability, **kw)
    with pytest.raises(ValueError, match="paged_attention needs Triton"): choice((9, 0), compile=True, paged_attention=True)
    assert choice((9, 0), compile=True)[:3] == (False, False, False)
    cfg = dict(vars(model.config), dim=6 * model.config.head_dim, n_heads=6, n_kv_heads=2)   # 3 query heads per KV head: no paged kernel
    odd = Llama(ModelConfig(**cfg)).eval()
    with monkeypatch.context() as m:
        m.setattr(Llama, "device", property(lambda self: torch.device("cuda")))
        m.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        g = D.DecodeGraphs(odd, PagedKVCache(cfg["n_layers"], 2, odd.config.head_dim, num_blocks=8, block_size=8), 4)
        assert (g.paged_one, g.paged_batched, g.pdl) == (False, False, True)
        with pytest.raises(ValueError, match="powers of two"): D.DecodeGraphs(odd, g.cache, 4, paged_attention=True)
        with pytest.raises(ValueError, match="powers of two"): D.DecodeGraphs(model, PagedKVCache(
            model.config.n_layers, model.config.n_kv_heads, model.config.head_dim, num_blocks=8, block_size=12), 4, paged_attention=True)


def _cpu_decode_graphs(monkeypatch, model, cache, rows, gemv=False):
    """The real `DecodeGraphs` (buckets, padding, one input copy per replay, recapture) on the CPU: the capture is
    the stand-in above, and the model looks like a CUDA one (without PDL) only while the graphs are built. `gemv=None`:
    the GPU's default kernels at batch 1 (Triton: only under Triton's interpreter on the CPU)."""
    import guide.serve.decode as D
    replays = []
    def capture(run, pool=None, device=None):
        graph = _ReplayedGraph(run); replays.append(graph)
        return graph, graph.out
    monkeypatch.setattr(D, "capture_cuda_graph", capture)
    with monkeypatch.context() as m:
        m.setattr(Llama, "device", property(lambda self: torch.device("cuda")))
        m.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        graphs = D.DecodeGraphs(model, cache, rows, gemv=gemv)
    return graphs, replays


@pytest.mark.parametrize("k", [2, 4])
def test_checked_drafts_replay_the_decode_graphs(base, monkeypatch, k):
    """With CUDA graphs, a step without prefill replays a decode graph, and speculation's checked drafts go through it
    too (each drafted token a row attending up to its own position): the same tokens as without speculation, and no
    eager forward pass for a step that only decodes and checks (CPU, with the capture stood in for)."""
    import guide.serve.engine as E
    model, tok = base
    rng = random.Random(5)
    loop = [rng.randrange(3, 2048) for _ in range(5)]
    prompts = [loop * 4, tok.encode("def f(x):\n    return x\n\ndef g(x):\n"), loop * 2 + [7], [rng.randrange(3, 2048) for _ in range(20)]]
    params = [SamplingParams(max_tokens=24, ignore_eos=True), SamplingParams(max_tokens=20, temperature=0.8, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=1.0, top_k=20, seed=2, ignore_eos=True), SamplingParams(max_tokens=12, logprobs=1)]
    outputs, eager = {}, []
    real_step_forward = E.step_forward
    monkeypatch.setattr(E, "step_forward", lambda *a, **kw: eager.append(len(a[2])) or real_step_forward(*a, **kw))
    for spec in (0, k):
        eng = Engine(model, tok, max_batch_size=4, speculate=spec)
        eng.graphs, replays = _cpu_decode_graphs(monkeypatch, model, eng.cache, 4 * (spec + 1))
        eager.clear()
        outputs[spec] = [(r["token_ids"], r["text"]) for r in eng.generate(prompts, params)]
        assert replays and all(n > 0 for n in eager)            # every eager pass had prefill rows: decode and drafts were replayed
    assert outputs[k] == outputs[0]
    assert eng.stats["draft_accepted"] > 0 and eng.num_free_blocks == eng.cache.num_blocks
    assert max(key[0] for key in eng.graphs.graphs) > 4          # a bucket wider than the batch: the rows of the drafts



@pytest.mark.parametrize("graphed", [False, True])
def test_overlap_launches_the_next_burst_before_reading_and_keeps_the_tokens(base, monkeypatch, graphed):
    """`Engine(overlap=True)`: a decode-only burst is launched from the last tokens of the one before, on the device,
    before those are read (two bursts outstanding). The tokens and texts are those of the plain engine, greedy, seeded
    and top-k, with stop strings, a row that needs its logits, a request that arrives and one aborted while its burst
    runs; every block comes back (eagerly, and through the real DecodeGraphs with the CPU stand-in capture)."""
    model, tok = base
    rng = random.Random(3)
    prompts = [tok.encode("def f(x):\n    return x\n\n"), [rng.randrange(3, 2048) for _ in range(9)], tok.encode("The "), [5, 6, 7]]
    params = [SamplingParams(max_tokens=40, ignore_eos=True), SamplingParams(max_tokens=33, temperature=0.9, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=50, temperature=1.0, top_k=20, seed=5, stop=["\n\n"]), SamplingParams(max_tokens=12, logprobs=2)]
    late, late_params = tok.encode("x = 1\n"), SamplingParams(max_tokens=20, temperature=0.7, seed=9, ignore_eos=True)
    reference = Engine(model, tok, max_batch_size=5).generate(prompts[:1], params[:1])[0]["token_ids"]
    last_new = max(i for i, t in enumerate(reference) if t not in reference[:i])  # its last token not seen before (29 of 40)
    params[0] = SamplingParams(max_tokens=40, stop_token_ids=[reference[last_new]])   # stops inside a burst, the next one launched
    want = {tuple(p): (r["token_ids"], r["text"]) for p, r in zip(prompts + [late], Engine(model, tok, max_batch_size=5).generate(
        prompts + [late], params + [late_params]))}
    assert want[tuple(prompts[0])][0] == reference[:last_new + 1] and last_new > 20
    for steps in (1, 4):
        eng = Engine(model, tok, block_size=8, num_blocks=120, max_batch_size=5, decode_steps=steps, overlap=True)
        if graphed: eng.graphs, _ = _cpu_decode_graphs(monkeypatch, model, eng.cache, 5)
        outstanding, peak, real_burst, real_land = [0], [0], eng._burst, eng._land
        def burst(*a):
            outstanding[0] += 1; peak[0] = max(peak[0], outstanding[0])
            return real_burst(*a)
        def land():
            done = real_land(); outstanding[0] -= 1
            return done
        stopped_in_flight, real_append = [], eng._append
        def append(req, token, *a):
            out = real_append(req, token, *a)
            if out.finish_reason == "stop" and eng._ahead is not None and req in eng._ahead[0]: stopped_in_flight.append(req.id)
            return out
        monkeypatch.setattr(eng, "_burst", burst); monkeypatch.setattr(eng, "_land", land); monkeypatch.setattr(eng, "_append", append)
        got = {}
        ids = [eng.add_request(p, sp, callback=lambda o, k=tuple(p): got.setdefault(k, []).append(o)).id
               for p, sp in zip(prompts[:3], params[:3])]
        aborted = eng.add_request(prompts[1], SamplingParams(max_tokens=60, ignore_eos=True), callback=lambda o: got.setdefault("aborted", []).append(o))
        for i in range(200):
            if not eng.has_unfinished(): break
            if i == 6: eng.add_request(late, late_params, callback=lambda o, k=tuple(late): got.setdefault(k, []).append(o))
            if i == 9: eng.add_request(prompts[3], params[3], callback=lambda o, k=tuple(prompts[3]): got.setdefault(k, []).append(o))
            if i >= 3 and eng._ahead is not None and not aborted.finished:
                assert aborted in eng._ahead[0] and eng.abort(aborted.id)        # while its burst is in flight
            eng.step()
        assert not eng.has_unfinished() and peak[0] == 2 and ids and aborted.finished and eng.stats["overlapped_bursts"] > 0
        assert ids[0] in stopped_in_flight                      # its blocks were freed while the next burst ran
        for key, (tokens, text) in want.items():
            assert [t for o in got[key] for t in o.token_ids] == tokens and "".join(o.text for o in got[key]) == text
        assert got["aborted"][-1].finish_reason == "abort" and eng.num_free_blocks == 120 and eng._ahead is None
        eng.add_request(prompts[0], SamplingParams(max_tokens=30, ignore_eos=True)); eng.step(); eng.step()
        assert eng._ahead is not None
        for req in list(eng.running): eng.abort(req.id)                # every row of the burst in flight aborted
        assert eng.step() == [] and eng._ahead is None and eng.num_free_blocks == 120

def test_top_k_batches_take_the_top_k_max_in_graphs_and_out(base, monkeypatch):
    """A batch whose every sampled row has a top-k draws from the top `k_max` logits (`top_k_bound`), not a sort of the
    vocabulary: the same tokens as one step at a time, eagerly and in multi-step bursts replayed from decode graphs (the
    CPU stand-in), whose key holds k_max rounded up to a power of two."""
    model, tok = base
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 2048) for _ in range(rng.randint(1, 20))] for _ in range(4)]
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_k=20, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=1.2, top_k=50, top_p=0.9, seed=2, ignore_eos=True),
              SamplingParams(max_tokens=20, ignore_eos=True), SamplingParams(max_tokens=20, temperature=0.7, top_k=3, seed=3, ignore_eos=True)]
    want = [o["token_ids"] for o in Engine(model, tok, max_batch_size=4).generate(prompts, params)]
    eager = Engine(model, tok, max_batch_size=4, decode_steps=4)
    assert [o["token_ids"] for o in eager.generate(prompts, params)] == want
    graphed = Engine(model, tok, max_batch_size=4, decode_steps=4)
    graphed.graphs, replays = _cpu_decode_graphs(monkeypatch, model, graphed.cache, 4)
    assert [o["token_ids"] for o in graphed.generate(prompts, params)] == want
    assert replays and {key[3:] for key in graphed.graphs.graphs if key[2] > 1} == {(2, 64)}    # bursts: filtered, k_max 64


def _small_encoder(device):
    from guide.serve.batcher import TextEncoder
    torch.manual_seed(0)
    return TextEncoder(64, dim=32, n_layers=2, n_heads=2, max_len=40).to(device).eval()


def test_bucketed_encoder_equals_packed_and_refuses_bad_input():
    "The bucketed padded forward (run from CUDA graphs on a GPU, eagerly here) gives the packed forward's answers."
    from guide.serve.batcher import GraphedEncoder
    enc = _small_encoder("cpu")
    rng = random.Random(0)
    seqs = [[rng.randrange(1, 64) for _ in range(rng.randint(1, 40))] for _ in range(11)]
    bucketed = GraphedEncoder(enc, max_batch_size=4, lengths=(8, 16), cuda_graphs=False)
    assert bucketed.batch_sizes == (1, 2, 4) and bucketed.lengths == (8, 16, 40)
    probs, emb = bucketed(seqs)                                # 11 texts > 4: run in parts, answers in order
    with torch.no_grad(): logits, want = enc.forward_packed(seqs)
    torch.testing.assert_close(torch.tensor(probs), logits.softmax(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(emb), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most 40"): bucketed([[1] * 41])
    with pytest.raises(ValueError, match="non-empty"): bucketed([[1], []])
    with pytest.raises(ValueError, match="CUDA device"): GraphedEncoder(enc, cuda_graphs=True)


@needs_cuda
def test_cuda_graph_encoder_equals_packed():
    """On CUDA `encoder_fn` replays captured graphs (in bfloat16); every bucket answers like the packed eager forward
    (float32): within 1e-4 when the graphs run in float32 too, within bfloat16's precision by default."""
    from guide.serve.batcher import GraphedEncoder, encoder_fn
    enc = _small_encoder("cuda")
    fn = encoder_fn(enc)
    assert fn.graphed is not None and fn.graphed.cuda_graphs and fn.graphed.model.tok.weight.dtype == torch.bfloat16
    fp32 = GraphedEncoder(enc, dtype=torch.float32)
    rng = random.Random(1)
    for n in (1, 3, 32, 45):
        seqs = [[rng.randrange(1, 64) for _ in range(rng.randint(1, 40))] for _ in range(n)]
        with torch.no_grad(): logits, emb = enc.forward_packed(seqs)
        probs, embs = fp32(seqs)
        torch.testing.assert_close(torch.tensor(probs), logits.softmax(-1).cpu(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(embs), emb.cpu(), atol=1e-4, rtol=1e-4)
        got = fn(seqs, 40)
        torch.testing.assert_close(torch.tensor([g["probs"] for g in got]), logits.softmax(-1).cpu(), atol=2e-2, rtol=0)
        torch.testing.assert_close(torch.tensor([g["embedding"] for g in got]), emb.cpu(), atol=2e-2, rtol=0)


# The Triton kernels run on a CUDA GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set before the
# engine is imported): test_triton_kernels_under_the_interpreter runs these tests so, in a fresh process, with small shapes.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS_ON = "cpu" if INTERPRETED else "cuda"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not (torch.cuda.is_available() or INTERPRETED),
                                  reason="the Triton kernels need Triton and a CUDA GPU (the gpu tier runs this), or Triton's "
                                         "interpreter (test_triton_kernels_under_the_interpreter runs this on the CPU)")


def test_kernels_say_why_they_cannot_run():
    """The Triton kernels refuse with the reason, not with a NameError or Triton's "0 active drivers": without Triton
    (CPU wheels of PyTorch), or with Triton but a tensor off the GPU outside the interpreter."""
    from guide.serve import decode as D
    if D.INTERPRETED or torch.cuda.is_available(): pytest.skip("the kernels can run here")
    x = torch.zeros(1, 4)
    why = "needs Triton" if D.triton is None else "runs on a CUDA GPU"
    for call in (lambda: D.gemv(x, torch.zeros(3, 4)), lambda: D.paged_attention(x.view(1, 1, 4), torch.zeros(2, 4, 2, 4), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)),
                 lambda: D.qkv_to_cache(_peaky_model("cpu"), x, torch.zeros(3, 4), torch.ones(4), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(2, 4, 2, 4))):
        with pytest.raises(RuntimeError, match=why): call()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available() or INTERPRETED,
                    reason="needs Triton and no GPU (with a GPU the kernel tests run on it)")
def test_triton_kernels_under_the_interpreter():
    """The kernel tests above, on the CPU: Triton's interpreter runs each program with numpy (TRITON_INTERPRET=1 must
    be set before the kernels are defined, hence a fresh process). Every one of them runs and passes."""
    kernel_tests = ["test_triton_gemv_matches_torch_and_decode_one_matches_decode_static",
                    "test_triton_qkv_to_cache_equals_matmul_rotary_and_cache_write", "test_triton_paged_attention_matches_gather_sdpa",
                    "test_engine_through_the_default_triton_graphs_decodes_like_the_eager_one"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", __file__, "-k", " or ".join(kernel_tests)],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and f"{len(kernel_tests)} passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed (not a GPU: it compiles with its own ptxas)")
def test_triton_kernels_compile_for_hopper():
    """Every Triton kernel of the engine compiles for sm_90 (H100/H200), with the 1.1B shape's constants and with and
    without programmatic dependent launch: no GPU needed. With it, the GEMV's first weight loads come before its wait."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from guide.serve import decode as D
    def compile_(fn, constexprs, pdl=True, **types):
        sig = {name: types.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if sig[name][0] == "*" or name in ("N", "K")}   # as a launch specializes them
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs, PDL=pdl), attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, launch_pdl=pdl))
    bf16, i64, f32 = "*bf16", "*i64", "*fp32"
    gemv_types = dict(X=bf16, W=bf16, Out=bf16, Res=bf16, LnW=bf16, eps="fp32")
    for n, k, _ in D.GEMV_TILES:
        for norm, glu, res in ((True, False, False), (True, True, False), (False, False, True)):   # qkv/head, gate_up, o/down
            compile_(D._gemv_kernel, dict(NORM=norm, GLU=glu, RES=res, BLOCK_N=n, BLOCK_K=k), **gemv_types)
        compile_(D._qkv_to_cache_kernel, dict(H=32, KVH=4, HD=64, BLOCK_P=n, BLOCK_K=k), X=bf16, W=bf16, LnW=bf16, Cos=bf16, Sin=bf16,
                 Pos=i64, Slot=i64, Q=bf16, KV=bf16, eps="fp32")
    attention = dict(Q=bf16, KV=bf16, Tables=i64, Pos=i64, Acc=f32, Max=f32, Sum=f32, Out=bf16, scale="fp32")
    compile_(D._paged_attention_kernel, dict(KVH=4, REP=8, HD=64, BS=16, SPLITS=16, MERGE=False), Count=i64, **attention)
    compile_(D._paged_attention_merge, dict(HD=64, SPLITS=16), Acc=f32, Max=f32, Sum=f32, Out=bf16)
    merged = compile_(D._paged_attention_kernel, dict(KVH=4, REP=8, HD=64, BS=16, SPLITS=16, MERGE=True), Count="*i32", **attention).asm["ptx"]
    # the last program of a (row, KV head) merges: all threads' partial results stored, a CTA barrier, then one thread's
    # acquire-release arrival; the merge reads the other programs' partials from L2, past this SM's L1
    arrive = merged.index("atom.global.gpu.acq_rel.add.u32")
    assert merged.count("atom.global") == 1 and "bar.sync" in merged[merged.rindex("st.global", 0, arrive):arrive]
    assert "ld.global.cg" in merged[arrive:] and "ld.global.cg" not in merged[:arrive]
    plain = compile_(D._gemv_kernel, dict(NORM=True, GLU=False, RES=True, BLOCK_N=1, BLOCK_K=1024), pdl=False, **gemv_types).asm["ptx"]
    ptx = compile_(D._gemv_kernel, dict(NORM=True, GLU=False, RES=True, BLOCK_N=1, BLOCK_K=1024), **gemv_types).asm["ptx"]
    assert "griddepcontrol" not in plain and ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait")
    assert ptx[:ptx.index("griddepcontrol.wait")].count("ld.global.v4") == 1      # the first tile, in flight across the wait (1024 bf16 on 4 warps: 16 B a thread)


@needs_triton
def test_triton_gemv_matches_torch_and_decode_one_matches_decode_static():
    import torch.nn.functional as F
    from guide.serve.decode import decode_one, decode_static, gemv
    from guide.serve.kvcache import PagedKVCache, prefill_batch_forward
    torch.manual_seed(0)
    dev = KERNELS_ON
    for N, K in ((37, 70), (96, 160)) if INTERPRETED else ((37, 70), (2048, 2048), (4864, 2048), (300, 5632)):
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        x, r = torch.randn(1, K, device=dev, dtype=torch.bfloat16), torch.randn(1, N, device=dev, dtype=torch.bfloat16)
        ln, w2 = torch.rand(K, device=dev, dtype=torch.bfloat16) + 0.5, torch.randn(2 * N, K, device=dev, dtype=torch.bfloat16)
        W, xn = w.float(), F.rms_norm(x.float(), (K,), ln.float(), 1e-5)
        g, u = (xn @ w2.float().T).chunk(2, -1)                 # gate rows then up rows
        for got, want in ((gemv(x, w), x.float() @ W.T),
                          (gemv(x, w, residual=r, norm_weight=ln, eps=1e-5, blocks=(2, 64, 2)), xn @ W.T + r.float()),
                          (gemv(x, w2, norm_weight=ln, eps=1e-5, glu=True), F.silu(g) * u)):
            assert (got.float() - want).norm() / want.norm() < 1e-2
    with pytest.raises(ValueError, match="does not fit"): gemv(x, w.t())
    with pytest.raises(ValueError, match="gate rows then up rows"): gemv(x, w2[1:], glu=True)
    model = _peaky_model(dev)
    cache = PagedKVCache(3, 2, 32, num_blocks=8, block_size=8, device=dev)
    tab = cache.allocator.allocate(2)
    prefill_batch_forward(model, cache, [[5, 6, 7, 8, 9]], [tab])
    args = (torch.tensor([11], device=dev), torch.tensor([5], device=dev), torch.tensor([tab + [cache.null_block]], device=dev))
    want = decode_static(model, cache, *args)
    torch.testing.assert_close(decode_one(model, cache, *args), want, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(decode_one(model, cache, *args, paged=True), want, atol=1e-3, rtol=1e-3)   # qkv_to_cache + paged_attention
    counts = torch.zeros(2, dtype=torch.int32, device=dev)                      # + the attention's splits merged in the same kernel
    torch.testing.assert_close(decode_one(model, cache, *args, paged=True, counts=counts), want, atol=1e-3, rtol=1e-3)
    assert not counts.any()


@needs_triton
def test_triton_qkv_to_cache_equals_matmul_rotary_and_cache_write():
    "The qkv GEMV with rotary and the KV write in its epilogue gives the matmul path's q and cache, for every tile."
    from guide.serve.decode import GEMV_TILES, _static_inputs, qkv_to_cache
    from guide.serve.kvcache import PagedKVCache, _fused_weights, _layer_qkv, _rope_at
    from guide.model import Llama, ModelConfig
    torch.manual_seed(0)
    dev = KERNELS_ON
    for H, KVH, dim in ((4, 2, 128), (6, 2, 192)) if INTERPRETED else ((32, 4, 2048), (6, 2, 192)):
        cfg = ModelConfig(vocab_size=64, dim=dim, n_layers=1, n_heads=H, n_kv_heads=KVH, hidden_dim=64, max_seq_len=256)
        model = Llama(cfg).to(dev, torch.bfloat16).eval()
        w = _fused_weights(model)[0]
        want = PagedKVCache(1, KVH, cfg.head_dim, num_blocks=20, block_size=16, device=dev, dtype=torch.bfloat16)
        got = PagedKVCache(1, KVH, cfg.head_dim, num_blocks=20, block_size=16, device=dev, dtype=torch.bfloat16)
        tables = torch.randperm(20, device=dev)[None]
        for pos in (0, 17, 255):
            x, positions = torch.randn(1, dim, device=dev, dtype=torch.bfloat16), torch.tensor([pos], device=dev)
            _, slots = _static_inputs(model, want, torch.tensor([1], device=dev), positions, tables)
            q_want, kv = _layer_qkv(model, w, x, *_rope_at(model, positions, x.dtype))
            want.write(0, slots, kv)
            for blocks in (GEMV_TILES[-2:] if INTERPRETED else GEMV_TILES[:3]) + (None,):
                q = qkv_to_cache(model, x, w[0], w[4], positions, slots, got.kv[0], blocks=blocks)
                torch.testing.assert_close(q.float(), q_want.float(), atol=3e-2, rtol=3e-2)
                torch.testing.assert_close(got.kv[0].float(), want.kv[0].float(), atol=3e-2, rtol=3e-2)
    with pytest.raises(ValueError, match="do not fit"): qkv_to_cache(model, x[:, :-1], w[0], w[4], positions, slots, got.kv[0])


@needs_triton
def test_triton_paged_attention_matches_gather_sdpa():
    "The Triton paged-attention kernel reads keys and values in place: the same as gather + SDPA for strided inputs (as the graphs pass them)."
    from guide.serve.decode import paged_attention
    from guide.serve.kvcache import PagedKVCache, _past_mask
    rng = random.Random(0)
    dev = KERNELS_ON
    for KVH, REP, hd, bs, B, NB in ((4, 8, 64, 16, 1, 16), (2, 2, 32, 8, 3, 5), (2, 1, 64, 16, 2, 128)):
        cache = PagedKVCache(1, KVH, hd, num_blocks=200, block_size=bs, device=dev, dtype=torch.bfloat16)
        cache.kv[0].normal_()
        inp = torch.tensor([[0, rng.randrange(NB * bs)] + rng.sample(range(200), NB) for _ in range(B)], device=dev)
        q = torch.randn(B, KVH * REP * hd + 8, device=dev, dtype=torch.bfloat16)[:, :KVH * REP * hd].view(B, KVH * REP, hd)
        got = paged_attention(q, cache.kv[0], inp[:, 2:], inp[:, 1])
        K, V = cache.gather(0, inp[:, 2:])
        want = torch.nn.functional.scaled_dot_product_attention(q.reshape(B, KVH, REP, hd), K, V,
                                                                attn_mask=_past_mask(inp[:, 1], NB * bs, q.dtype)).reshape(B, -1)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        counts = torch.zeros(B * KVH + 1, dtype=torch.int32, device=dev)     # the splits merged in the same kernel: the same result
        for _ in range(2): torch.testing.assert_close(paged_attention(q, cache.kv[0], inp[:, 2:], inp[:, 1], counts=counts), got, atol=0, rtol=0)
        assert not counts.any()                                              # left at zero for the next call
    for bad in (torch.zeros(B * KVH - 1, dtype=torch.int32, device=dev), torch.zeros(B * KVH, dtype=torch.int64, device=dev)):
        with pytest.raises(ValueError, match="counts must be"): paged_attention(q, cache.kv[0], inp[:, 2:], inp[:, 1], counts=bad)


@pytest.mark.skipif(not INTERPRETED, reason="the CPU half of the CUDA engine tests: runs under Triton's interpreter "
                                            "(test_triton_kernels_under_the_interpreter runs it); on a GPU the CUDA tests run the real graphs")
def test_engine_through_the_default_triton_graphs_decodes_like_the_eager_one(monkeypatch):
    """What an engine on a GPU runs by default at batch 1 (decode_one: Triton GEMVs, qkv_to_cache, paged attention),
    through the real DecodeGraphs with the stand-in capture, one step and four per graph, with overlap, and with the
    attention's splits merged in the same kernel: the eager engine's tokens, greedy and seeded, alone and batched."""
    from guide.serve.decode import decode_one
    torch.manual_seed(0)                     # small: the interpreter takes about a second a step at _peaky_model's size
    model = Llama(ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)).eval()
    with torch.no_grad(): model.lm_head.weight.mul_(20)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    params = [SamplingParams(max_tokens=9, ignore_eos=True), SamplingParams(max_tokens=7, temperature=0.8, seed=3, ignore_eos=True)]
    want = [r["token_ids"] for r in Engine(model, None, max_batch_size=2).generate(prompts, params)]
    for steps, overlap, one_kernel in ((1, False, False), (4, True, True)):
        eng = Engine(model, None, block_size=8, num_blocks=32, max_batch_size=2, decode_steps=steps, overlap=overlap)
        eng.graphs, replays = _cpu_decode_graphs(monkeypatch, model, eng.cache, 2, gemv=None)
        assert eng.graphs.one.func is decode_one and eng.graphs.one.keywords == dict(paged=True)
        counts = torch.zeros(2 * model.config.n_kv_heads, dtype=torch.int32)
        if one_kernel: eng.graphs.one = partial(eng.graphs.one, counts=counts)      # paged_attention's one-kernel form
        assert [eng.generate([p], sp)[0]["token_ids"] for p, sp in zip(prompts, params)] == want       # batch 1: decode_one
        assert [r["token_ids"] for r in eng.generate(prompts, params)] == want                        # and batched
        assert any(key[0] == 1 for key in eng.graphs.graphs) and any(key[0] == 2 for key in eng.graphs.graphs)
        assert replays and eng.num_free_blocks == 32 and not counts.any()


@needs_triton
@needs_cuda
def test_triton_paged_attention_engine_decodes_like_the_eager_one():
    "An engine whose graphs attend with the paged-attention kernel decodes greedily like the eager engine."
    from guide.serve.decode import DecodeGraphs
    rng = random.Random(0)
    model = _peaky_model("cuda")
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    params = [SamplingParams(max_tokens=rng.randint(1, 60), ignore_eos=True) for _ in prompts]
    paged = Engine(model, None, block_size=8, num_blocks=200, max_batch_size=4, cuda_graphs=False)
    paged.graphs = DecodeGraphs(model, paged.cache, 4, paged_attention=True)
    eager = Engine(model, None, block_size=8, num_blocks=200, max_batch_size=4, cuda_graphs=False)
    assert [r["token_ids"] for r in paged.generate(prompts, params)] == [r["token_ids"] for r in eager.generate(prompts, params)]
    assert paged.generate(prompts[:1], params[:1])[0]["token_ids"] == eager.generate(prompts[:1], params[:1])[0]["token_ids"]   # batch 1: decode_one


@needs_triton
@needs_cuda
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs compute capability 9.0 (Hopper) or later")
def test_triton_pdl_decode_equals_plain_decode():
    """With programmatic dependent launch each kernel starts during the previous one's tail and waits only before it
    reads activations: the graphed batch-1 step gives the same logits as without it (a read before the wait would
    see a stale vector), and an engine decodes the same tokens as the eager one."""
    from guide.serve.decode import DecodeGraphs
    model = _peaky_model("cuda")
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 40))] for _ in range(3)]
    params = [SamplingParams(max_tokens=rng.randint(20, 60), ignore_eos=True) for _ in prompts]
    want = [r["token_ids"] for r in Engine(model, None, block_size=8, num_blocks=100, max_batch_size=1, cuda_graphs=False).generate(prompts, params)]
    for paged in (False, True):
        eng = Engine(model, None, block_size=8, num_blocks=100, max_batch_size=1, cuda_graphs=False)
        eng.graphs = DecodeGraphs(model, eng.cache, 1, paged_attention=paged, pdl=True)
        assert [r["token_ids"] for r in eng.generate(prompts, params)] == want
        plain = DecodeGraphs(model, eng.cache, 1, paged_attention=paged, pdl=False)
        table = eng.cache.allocator.allocate(3)
        for pos in (0, 9, 23):
            torch.testing.assert_close(eng.graphs([7], [pos], [table]).clone(), plain([7], [pos], [table]).clone(), atol=1e-3, rtol=1e-3)
        eng.cache.allocator.release(table)
    with pytest.raises(ValueError, match="pdl needs decode_one"): DecodeGraphs(model, eng.cache, 1, compile=True, pdl=True)


def test_bad_params_and_callbacks_lose_only_their_own_request(base):
    """Bad SamplingParams are refused at the door (a None stop_token_ids used to pass and then fail inside a step,
    aborting every request in flight); a callback that raises loses its own request, not the others, and the
    engine thread keeps serving; generate is all or nothing and leaves nothing queued."""
    model, tok = base
    for bad in [dict(stop_token_ids=[None]), dict(stop=5), dict(top_k=True), dict(seed=True), dict(ignore_eos="no")]:
        with pytest.raises(ValueError): SamplingParams(**bad)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    eng = Engine(model, tok)
    with pytest.raises(TypeError, match="SamplingParams"): eng.add_request([1, 2], dict(max_tokens=3))
    with pytest.raises(TypeError, match="prompt"): eng.add_request(5)
    with pytest.raises(ValueError, match="token ids"): eng.add_request([True, 1])
    eng.add_request([1], request_id="req-1")
    assert eng.add_request([1]).id == "req-0" and eng.add_request([1]).id == "req-2"     # automatic ids skip a caller's
    with pytest.raises(ValueError, match="2 prompts but 1"): eng.generate([[1], [2]], [SamplingParams()])
    queued = len(eng.waiting)
    with pytest.raises(ValueError): eng.generate([[1, 2], []])
    assert len(eng.waiting) == queued                               # the good prompt was not left queued
    eng = Engine(model, tok, num_blocks=64)
    cut = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=50, ignore_eos=True), max_steps=3)[0]
    assert cut["finish_reason"] == "abort" and not eng.has_unfinished() and eng.num_free_blocks == 64

    def explode(out): raise RuntimeError("client bug")
    got = []
    good = eng.add_request([1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True), callback=got.append)
    eng.add_request([4, 5], SamplingParams(max_tokens=8, ignore_eos=True), callback=explode)
    while eng.has_unfinished(): eng.step()
    assert len(good.output_ids) == 8 and got[-1].finish_reason == "length" and eng.stats["callback_errors"] == 1
    assert eng.num_free_blocks == 64
    with AsyncEngine(Engine(model, tok)) as ae:
        ae.submit([4, 5], SamplingParams(max_tokens=8, ignore_eos=True), callback=explode)
        tokens = [t for out in ae.stream([1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True), timeout=30) for t in out.token_ids]
        assert len(tokens) == 8 and ae._thread.is_alive() and ae.error is None


def test_prefix_cache_shares_blocks_and_gives_the_same_tokens(base):
    model, tok = base
    rng = random.Random(1)
    system = [rng.randrange(3, 2048) for _ in range(40)]
    prompts = [system + [rng.randrange(3, 2048) for _ in range(rng.randint(1, 12))] for _ in range(6)] + [system[:17], system[:16]]
    params = [SamplingParams(max_tokens=rng.randint(1, 20), ignore_eos=True) for _ in prompts]
    want = [generate(model, torch.tensor([p]), sp.max_tokens)[0, len(p):].tolist() for p, sp in zip(prompts, params)]
    eng = Engine(model, tok, block_size=8, num_blocks=64, max_batch_size=2)
    assert [r["token_ids"] for r in eng.generate(prompts, params)] == want
    # the first computes the system prompt (40 tokens: five full blocks) and the second waits a step for them
    assert eng.stats["cached_tokens"] == 5 * 40 + 16 + 8 and eng.num_free_blocks == 64
    # a prompt of exactly two full cached blocks still computes its last token (its logits give the first new one)
    outs = []
    eng.add_request(system[:16], SamplingParams(max_tokens=3, ignore_eos=True), callback=outs.append)
    while eng.has_unfinished(): eng.step()
    assert outs[-1].cached_tokens == 8 and [t for o in outs for t in o.token_ids] == want[-1][:3]
    # two running requests share blocks: aborting one leaves the other's blocks (and tokens) intact
    a = eng.add_request(prompts[0], SamplingParams(max_tokens=20, ignore_eos=True))
    eng.step()
    b = eng.add_request(prompts[0], SamplingParams(max_tokens=20, ignore_eos=True))
    eng.step()
    assert b.table[:5] == a.table[:5] and eng.cache.allocator.users[a.table[0]] == 2
    eng.abort(a.id)
    while eng.has_unfinished(): eng.step()
    assert b.output_ids == generate(model, torch.tensor([prompts[0]]), 20)[0, len(prompts[0]):].tolist()
    assert eng.num_free_blocks == 64 and all(u == 0 for u in eng.cache.allocator.users)


def test_prefix_cache_under_eviction_and_preemption_keeps_tokens(base):
    model, tok = base
    rng = random.Random(2)
    heads = [[rng.randrange(3, 2048) for _ in range(24)] for _ in range(3)]
    prompts = [heads[i % 3] + [rng.randrange(3, 2048) for _ in range(rng.randint(1, 9))] for i in range(12)]
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = Engine(model, tok, block_size=4, num_blocks=40, max_batch_size=4, prefix_caching=False)
    cached = Engine(model, tok, block_size=4, num_blocks=40, max_batch_size=4)     # too small to keep everything: evicts, preempts
    assert [r["token_ids"] for r in cached.generate(prompts, sp)] == [r["token_ids"] for r in plain.generate(prompts, sp)]
    assert cached.stats["preemptions"] > 0 and cached.stats["cached_tokens"] > 0
    assert cached.stats["prefill_tokens"] < plain.stats["prefill_tokens"]
    assert cached.num_free_blocks == 40


def test_a_failed_step_caches_no_blocks_it_did_not_compute(base, monkeypatch):
    import guide.serve.engine as engine_module
    model, tok = base
    prompt = list(range(3, 40))
    want = generate(model, torch.tensor([prompt]), 5)[0, len(prompt):].tolist()
    eng = Engine(model, tok, block_size=8, num_blocks=32)
    req = eng.add_request(prompt, SamplingParams(max_tokens=5, ignore_eos=True))
    def broken(*args, **kw): raise RuntimeError("out of memory")
    monkeypatch.setattr(engine_module, "step_forward", broken)
    with pytest.raises(RuntimeError): eng.step()                     # blocks were taken, nothing was written to them
    eng.abort(req.id)
    monkeypatch.undo()
    assert not eng.cache.allocator.block_of                           # nothing findable: it would serve garbage
    assert eng.generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True))[0]["token_ids"] == want


def test_prefix_caching_allocator_refuses_misuse():
    from guide.serve.kvcache import PrefixCachingAllocator, block_hash
    a = PrefixCachingAllocator(3)
    key = block_hash(b"", [1, 2, 3])
    with pytest.raises(ValueError, match="not allocated"): a.register(0, key)
    with pytest.raises(ValueError, match="no cached"): a.take([1])
    with pytest.raises(ValueError, match="not allocated"): a.release([0])
    b = a.allocate(1)[0]; a.register(b, key); a.release([b])
    assert a.lookup([key]) == [b] and a.num_free == 3
    assert a.allocate(3)[-1] == b and a.lookup([key]) == []           # handed out last, and then no longer findable
    with pytest.raises(NoFreeBlocks): a.allocate(1)
    for bad in (-1, 1.5): pytest.raises(ValueError, a.allocate, bad)


@pytest.mark.parametrize("budget", [1, 5, 16])
def test_chunked_prefill_gives_the_same_tokens(base, budget):
    "Prompts computed a few tokens a step (`max_prefill_tokens`), greedy and seeded sampling, with and without a cache small enough to preempt."
    model, tok = base
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 2048) for _ in range(rng.randint(1, 60))] for _ in range(6)]
    params = [SamplingParams(max_tokens=12, ignore_eos=True, **({} if i % 2 else dict(temperature=0.9, top_k=50, seed=i))) for i in range(6)]
    whole = Engine(model, tok, block_size=4, num_blocks=200, max_batch_size=4, prefix_caching=False)
    want = [r["token_ids"] for r in whole.generate(prompts, params)]
    for i in (1, 3, 5): assert want[i] == generate(model, torch.tensor([prompts[i]]), 12)[0, len(prompts[i]):].tolist()
    for num_blocks in (200, 19):                                             # 19 blocks of 4: two or three requests fit, then they preempt
        eng = Engine(model, tok, block_size=4, num_blocks=num_blocks, max_batch_size=4, max_prefill_tokens=budget)
        reqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        steps_prefill = []
        while eng.has_unfinished():
            before = eng.stats["prefill_tokens"]
            eng.step()
            steps_prefill.append(eng.stats["prefill_tokens"] - before)
        assert [r.output_ids for r in reqs] == want and max(steps_prefill) <= budget
        assert eng.num_free_blocks == num_blocks
    assert eng.stats["preemptions"] > 0


def test_abort_during_chunked_prefill_frees_its_blocks(base):
    model, tok = base
    eng = Engine(model, tok, block_size=8, num_blocks=40, max_prefill_tokens=16)
    long = eng.add_request(list(range(3, 203)), SamplingParams(max_tokens=4, ignore_eos=True))
    short = eng.add_request([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
    eng.step(); eng.step()
    assert 0 < long.computed < long.num_tokens and not long.output_ids     # half computed, no token yet
    eng.abort(long.id)
    while eng.has_unfinished(): eng.step()
    assert short.output_ids == generate(model, torch.tensor([[5, 6, 7]]), 6)[0, 3:].tolist()
    assert eng.num_free_blocks == 40


@pytest.mark.parametrize("k", [1, 3, 8])
def test_speculative_decoding_gives_the_same_tokens(base, k):
    """Prompt-lookup speculation beside chunked prefill, the prefix cache, preemption, stop strings and seeded sampling:
    the same tokens and texts as without; rows with logprobs or penalties never speculate."""
    model, tok = base
    rng = random.Random(4)
    loop = [rng.randrange(3, 2048) for _ in range(6)]
    prompts = [loop * 5, loop * 3 + [9, 9], [rng.randrange(3, 2048) for _ in range(30)], tok.encode("def f(x):\n    return x\n\ndef g(x):\n")] * 2
    params = [SamplingParams(max_tokens=rng.randint(1, 40), ignore_eos=True, **kw) for kw in
              (dict(), dict(temperature=0.8, seed=1), dict(temperature=1.0, top_k=20, seed=2), dict(stop=["\n\n"]),
               dict(logprobs=2), dict(frequency_penalty=1.0), dict(temperature=0.5, top_p=0.8, seed=3), dict())]
    for num_blocks in (200, 30):
        plain = Engine(model, tok, block_size=4, num_blocks=num_blocks, max_batch_size=4, max_prefill_tokens=16)
        spec = Engine(model, tok, block_size=4, num_blocks=num_blocks, max_batch_size=4, max_prefill_tokens=16, speculate=k)
        want, got = plain.generate(prompts, params), spec.generate(prompts, params)
        assert [(r["token_ids"], r["text"], r["finish_reason"]) for r in got] == [(r["token_ids"], r["text"], r["finish_reason"]) for r in want]
        (lp_got, lp_want) = (r[4]["logprobs"] for r in (got, want))
        assert [lp for lp, _ in lp_got] == pytest.approx([lp for lp, _ in lp_want], abs=1e-4)
        assert [[t for t, _ in top] for _, top in lp_got] == [[t for t, _ in top] for _, top in lp_want]
        assert spec.stats["draft_accepted"] > 0 and spec.num_free_blocks == num_blocks
    assert spec.stats["preemptions"] > 0
    alone = Engine(model, tok, speculate=k)
    alone.generate([loop * 5] * 2, [SamplingParams(max_tokens=20, logprobs=1), SamplingParams(max_tokens=20, presence_penalty=0.5)])
    assert alone.stats["draft_tokens"] == 0


def test_json_constraint_is_built_once(base):
    "Engine.json_constraint builds the JSON masks' tokenizer side once (a server calls it at start-up); a request reuses it."
    model, tok = base
    eng = Engine(model, tok, num_blocks=16)
    assert eng.json is None
    jc = eng.json_constraint()
    assert eng.json_constraint() is jc
    eng.add_request("x = ", SamplingParams(max_tokens=2, json_mode=True))
    assert eng.json is jc
    with pytest.raises(ValueError, match="tokenizer"): Engine(model, None, num_blocks=16).json_constraint()


def test_a_tokenizer_that_cannot_write_json_is_refused_once_found(base, monkeypatch):
    "Every JSON request to such an engine gets the reason as a ValueError (a 400 from the server); the vocabulary is read once."
    import guide.serve.engine as E
    model, tok = base
    builds = []
    def refuse(tokenizer, vocab_size):
        builds.append(vocab_size)
        raise ValueError("JSON mode needs a token for each of the characters ['{']")
    monkeypatch.setattr(E, "JsonConstraint", refuse)
    eng = Engine(model, tok, num_blocks=16)
    for _ in range(3):
        with pytest.raises(ValueError, match=r"characters \['\{'\]"): eng.add_request("x = ", SamplingParams(max_tokens=2, json_mode=True))
    assert builds == [model.config.vocab_size] and not eng.has_unfinished()
    assert eng.generate(["x = "], SamplingParams(max_tokens=2))[0]["token_ids"]        # plain requests are served


def test_json_mode_beside_everything_else(base):
    """JSON mode rows in a batch with speculation, chunked prefill, a small cache (preemption) and plain rows: every
    token keeps the text a prefix of one JSON object, an answer that ends is one, and the plain rows' tokens are the
    ones they get alone. Without a tokenizer, JSON mode is refused at the door."""
    import json
    from guide.serve.structured import JSON_START, json_feed
    model, tok = base
    prompts = ["def f(x):\n    return x\n\ndef g(x):\n", '{"a": 1, "b": ', "A record: ", "x = [1, 2, 3]\ny = [1, 2,"] * 2
    params = [SamplingParams(max_tokens=40, temperature=0.9, seed=i, json_mode=i % 2 == 1) for i in range(len(prompts))]
    eng = Engine(model, tok, block_size=4, num_blocks=40, max_batch_size=4, max_prefill_tokens=8, speculate=3)
    outs = eng.generate(prompts, params)
    assert eng.stats["preemptions"] > 0 and eng.num_free_blocks == 40
    for o, p in zip(outs, params):
        if not p.json_mode: continue
        assert json_feed(JSON_START, o["text"]) is not None, o["text"]
        if o["finish_reason"] == "stop": assert isinstance(json.loads(o["text"]), dict)
    alone = Engine(model, tok).generate([p for p, sp in zip(prompts, params) if not sp.json_mode], [sp for sp in params if not sp.json_mode])
    assert [o["token_ids"] for o in alone] == [o["token_ids"] for o, sp in zip(outs, params) if not sp.json_mode]
    with pytest.raises(ValueError, match="tokenizer"): Engine(model, None).add_request([1, 2], SamplingParams(json_mode=True))


def test_jump_forward_gives_the_same_tokens(base, monkeypatch):
    """Jump-forward decoding (a grammar's forced tokens fed at once, as a draft sure to be kept) gives the tokens that
    one pass per token gives, greedy and sampled, beside JSON mode, prompt-lookup speculation, chunked prefill and
    preemption; eagerly and through the decode graphs (the CPU stand-in)."""
    model, tok = base
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"},
                                               "kind": {"enum": ["alpha", "beta"]}, "flags": {"type": "array", "items": {"type": "boolean"}}}}
    prompts = ["A record as JSON: ", "def f(x):\n    return x\n\ndef g(x):\n", '{"name": ', "config = "] * 2
    params = [SamplingParams(max_tokens=48, temperature=t, seed=i, **kw) for i, (t, kw) in enumerate(
        [(0.0, dict(json_schema=schema)), (0.0, {}), (0.8, dict(json_schema=schema)), (0.7, dict(json_mode=True)),
         (1.0, dict(json_schema=schema)), (0.0, dict(json_schema=schema, stop=["beta"])), (0.0, dict(json_schema=schema)), (0.9, {})])]
    want = [o["token_ids"] for o in Engine(model, tok, jump_forward=False).generate(prompts, params)]
    for graphs in (False, True):
        eng = Engine(model, tok, block_size=4, num_blocks=24, max_batch_size=4, max_prefill_tokens=8, speculate=2)
        if graphs: eng.graphs, _ = _cpu_decode_graphs(monkeypatch, model, eng.cache, 16)
        assert [o["token_ids"] for o in eng.generate(prompts, params)] == want
        assert eng.stats["draft_accepted"] > 0 and eng.stats["preemptions"] > 0 and eng.num_free_blocks == 24


def test_schema_grammar_takes_a_pydantic_model(base):
    """`Model.model_json_schema()` of a Pydantic model, recursive, with Optional fields, length bounds, ranges, a pattern,
    formats (date, date-time, duration, password, binary), a multipleOf, a set of literals and one of strings and a
    tagged union: the grammar
    reads the model's own dumps, refuses values out of bounds, and every sampled answer that closed is a valid model."""
    import datetime
    import json
    from typing import Annotated, Literal
    from pydantic import BaseModel, Field, SecretStr
    from guide.serve.structured import SchemaGrammar
    class Cat(BaseModel):
        kind: Literal["cat"]
        lives: int = Field(ge=0, le=9)
    class Dog(BaseModel):
        kind: Literal["dog", "puppy"]
        good: bool
        tricks: set[Literal["sit", "roll", "beg"]] = Field(max_length=2)
    class Address(BaseModel):
        city: str = Field(max_length=8)
        zip: str = Field(pattern=r"^[0-9]{4} ?[A-Z]{2}$", max_length=6)
    class Person(BaseModel):
        name: str = Field(min_length=1, max_length=6)
        age: int | None = Field(ge=0, le=120)
        tags: list[str] = Field(max_length=2)
        nicks: frozenset[Annotated[str, Field(max_length=8)]] = Field(max_length=3)     # uniqueItems over strings
        home: Address | None
        friends: list["Person"] = Field(max_length=2)
        scores: dict[str, int]
        born: datetime.date
        seen: datetime.datetime
        since: datetime.timedelta
        pair: tuple[int, bool]
        height: float = Field(gt=0, le=2.5)
        pet: Cat | Dog | None = Field(discriminator="kind")
        dozen: int = Field(multiple_of=12, ge=0, le=144)
        key: SecretStr                                       # format password, writeOnly: any string
        raw: bytes                                           # format binary: any string (its UTF-8 bytes)
    g = SchemaGrammar(Person.model_json_schema())
    def reads(person: dict) -> bool:
        state = g.feed(g.start, json.dumps(person, separators=(",", ":"), ensure_ascii=False))
        return state is not None and g.done(state)
    ada = Person(name="Ada", age=None, tags=["x"], nicks=["A", "Countess", "a"], home=Address(city="Oslo", zip="0150AB"),
                 friends=[Person(name="Bo", age=3, tags=[], nicks=[], home=None, friends=[], scores={}, born="2020-01-31", seen="2024-05-01T12:30:00Z", since=0, pair=(0, True), height=0.9, pet=None, dozen=0, key="", raw=b"")],
                 scores={"go": 3, "": -1}, born="1815-12-10", seen="1843-10-01T09:15:30.25+01:00",
                 since=datetime.timedelta(days=400, seconds=3.5), pair=(1, False), height=1.65, pet=Cat(kind="cat", lives=9), dozen=144, key="pw",
                 raw="é\n".encode()).model_dump(mode="json")
    assert reads(ada) and reads(dict(ada, pet={"kind": "puppy", "good": False, "tricks": ["roll", "sit"]}))
    for bad in (dict(ada, name=""), dict(ada, name="Adalbert"), dict(ada, tags=["a", "b", "c"]), dict(ada, age=1.5), dict(ada, age=121), dict(ada, age=-1),
                dict(ada, home={"city": "Amsterdam", "zip": "1011 AB"}), dict(ada, home={"city": "Oslo", "zip": "150 AB"}), dict(ada, home={"city": "Oslo", "zip": "0150 AB"}), dict(ada, friends=[dict(ada, friends=[ada, ada, ada])]), dict(ada, scores={"go": 1.5}), dict(ada, born="1815-02-30"), dict(ada, pair=[1]),
                dict(ada, seen="1843-10-01T09:15:30"), dict(ada, seen="1843-10-01 09:15:30Z"), dict(ada, since="P1M"), dict(ada, since="PT"),
                dict(ada, dozen=13), dict(ada, dozen=-12), dict(ada, height=0), dict(ada, height=-0.5), dict(ada, height=2.51), dict(ada, height=1e-05),
                dict(ada, pet={"kind": "cat", "good": True}), dict(ada, pet={"kind": "cat", "lives": 10}),
                dict(ada, pet={"kind": "dog", "good": True, "tricks": ["sit", "sit"]}), dict(ada, pet={"kind": "dog", "good": True, "tricks": ["sit", "roll", "beg"]}),
                dict(ada, nicks=["A", "B", "A"]), dict(ada, nicks=["A", "B", "C", "D"]), dict(ada, nicks=["Countess!"])):
        assert not reads(bad), bad
    model, tok = base
    outs = Engine(model, tok).generate(["A person as JSON: "] * 8, [SamplingParams(max_tokens=384, temperature=0.9, seed=i,
                                                                          json_schema=Person.model_json_schema()) for i in range(8)])
    closed = [o for o in outs if o["finish_reason"] == "stop"]
    assert closed, [o["text"] for o in outs]
    for o in closed: Person.model_validate_json(o["text"])


def test_a_grammar_with_no_way_on_ends_only_its_request(base):
    """A schema whose own text holds a character no token writes is refused at admission (ValueError); one whose value
    needs such a character (a pattern) is found out when no token is allowed: that request ends ('abort', the text so
    far), the others run on, and every block is freed."""
    model, tok = base
    eng = Engine(model, tok, num_blocks=64)
    with pytest.raises(ValueError, match="no token"):
        eng.add_request("x = ", SamplingParams(max_tokens=8, json_schema={"type": "object", "properties": {"a": {"enum": ["\u4e2d"]}}}))
    stuck = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a\u4e2d$"}}}
    outs = eng.generate(["x = ", "y = ", "z = "], [SamplingParams(max_tokens=16, json_schema=stuck), SamplingParams(max_tokens=8, ignore_eos=True),
                                                   SamplingParams(max_tokens=16, json_mode=True)])
    assert outs[0]["finish_reason"] == "abort" and outs[0]["text"] == '{"a":"a' and eng.stats["grammar_dead_ends"] == 1
    assert len(outs[1]["token_ids"]) == 8 and outs[2]["finish_reason"] in ("stop", "length")
    assert eng.num_free_blocks == 64 and not eng.running


def test_step_forward_returns_the_logits_asked_for(base):
    from guide.serve.kvcache import PagedKVCache, step_forward
    model, _ = base
    cfg = model.config
    cache = PagedKVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks=16, block_size=4)
    ids = list(range(3, 15))
    tables = [cache.allocator.allocate(3), cache.allocator.allocate(3)]
    out = step_forward(model, cache, [ids, ids[:5]], tables, [], [], [], n_logits=[4, 1])
    with torch.no_grad(): ref = model(torch.tensor([ids]))[0][0]
    torch.testing.assert_close(out[:4], ref[-4:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[4], ref[4], atol=1e-4, rtol=1e-4)
    for bad in ([0, 1], [13, 1], [1]):
        with pytest.raises(ValueError, match="n_logits"): step_forward(model, cache, [ids, ids[:5]], tables, [], [], [], n_logits=bad)
