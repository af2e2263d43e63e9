"""Continuous batching (guide.serve.engine) vs transformers `generate` at static batch 32, same request trace.

Both serve the same trace of requests (greedy; each request stops at its own output length), same model,
same machine, one process: prompt lengths uniform in 4..48 tokens, output lengths log-normal (median 24, sigma 1,
clipped to 2..192: long-tailed like chat traffic). Reported: useful tokens/s (only the tokens a request asked
for), TTFT and inter-token latency p50/p95 for an offline burst (all requests arrive at t=0), and the CPU
seconds each side used (the fair comparison on a shared machine).
The baseline is run the way a practitioner would: batches of 32 in arrival order, prompts left-padded with an
attention mask, `max_new_tokens` = the longest request in the batch (static batching cannot stop rows
independently), default dynamic KV cache; only each request's own tokens count. The engine refills its batch
every step; it is created once and reused, as in a server. Both sides are warmed up on one full batch, then they
alternate `--repeats` times and the best run of each is reported (all runs are in the JSON).

    python benchmarks/serve_engine.py                       # tiny tier, CPU
    python benchmarks/serve_engine.py --smoke               # seconds, for tests
    python benchmarks/serve_engine.py --tier gpu --device cuda --requests 512
    python benchmarks/serve_engine.py --gpu-decode --device cuda  # gpu tier: batch-1 decode vs the HBM ceiling (~1.1B shape)
"""
from __future__ import annotations

import argparse, json, os, sys, time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def pct(a, q): return float(np.percentile(a, q)) if len(a) else float("nan")


def make_engine(model, trace, batch):
    """One long-lived engine, as in a server: KV cache sized for `batch` requests of the trace's longest prompt + output.
    No prefix cache: the trace is served several times, and the repeats would find their prompts cached (in a real
    server these prompts share nothing; benchmarks/serve_prefix_cache.py measures the cache on traffic that does)."""
    from guide.serve.engine import Engine
    return Engine(model, None, block_size=16, max_batch_size=batch, prefix_caching=False,
                  num_blocks=batch * (max(len(p) for p, _ in trace) + max(m for _, m in trace)) // 16 + batch)


def run_engine(eng, trace):
    from guide.serve.engine import SamplingParams
    c0, t0 = time.process_time(), time.perf_counter()
    reqs = [eng.add_request(p, SamplingParams(max_tokens=m, ignore_eos=True)) for p, m in trace]
    stamps = {r.id: [] for r in reqs}
    steps = 0
    while eng.has_unfinished():
        outs = eng.step(); now = time.perf_counter(); steps += 1
        for o in outs: stamps[o.request_id].append(now)
    el, cpu = time.perf_counter() - t0, time.process_time() - c0
    toks = sum(len(v) for v in stamps.values())
    ttft = [v[0] - t0 for v in stamps.values()]
    itl = [d for v in stamps.values() for d in np.diff(v)]
    return dict(tokens=toks, seconds=el, cpu_seconds=cpu, tokens_per_s=toks / el, tokens_per_cpu_s=toks / cpu, steps=steps, ttft_p50=pct(ttft, 50), ttft_p95=pct(ttft, 95),
                itl_p50=pct(itl, 50), itl_p95=pct(itl, 95))


def run_hf_static(hf, trace, batch, device):
    "transformers generate, static batches of `batch` in arrival order; a LogitsProcessor timestamps every step."
    from transformers import LogitsProcessor, LogitsProcessorList
    class Clock(LogitsProcessor):
        def __init__(self): self.t = []
        def __call__(self, input_ids, scores): self.t.append(time.perf_counter()); return scores
    c0, t0 = time.process_time(), time.perf_counter()
    ttft, itl, toks, steps = [], [], 0, 0
    for i in range(0, len(trace), batch):
        chunk = trace[i:i + batch]
        T = max(len(p) for p, _ in chunk); n = max(m for _, m in chunk)
        ids = torch.tensor([[0] * (T - len(p)) + p for p, _ in chunk], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
        clock = Clock()
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                        logits_processor=LogitsProcessorList([clock]))
        steps += n
        # the token of step k is known when step k's logits are processed (sampling itself is negligible)
        for _, m in chunk:
            ts = clock.t[:m]; toks += m
            ttft.append(ts[0] - t0); itl += list(np.diff(ts))
    el, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(tokens=toks, seconds=el, cpu_seconds=cpu, tokens_per_s=toks / el, tokens_per_cpu_s=toks / cpu, steps=steps,
                rows_computed=steps * batch, ttft_p50=pct(ttft, 50), ttft_p95=pct(ttft, 95),
                itl_p50=pct(itl, 50), itl_p95=pct(itl, 95))


def hbm_bandwidth(nbytes, device, n=20):
    "Measured (copy, read) bandwidth in bytes/s on a bf16 tensor of `nbytes`: clone (bytes read + written) and a sum."
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    def timed(fn):
        fn(); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(n): fn()
        torch.cuda.synchronize(); return (time.perf_counter() - t) / n
    return 2 * x.numel() * 2 / timed(lambda: x.clone()), x.numel() * 2 / timed(lambda: x.sum(dtype=torch.float32))


def replay_tps(graph, n=200):
    "Steps per second of one captured decode graph replayed back to back: the GPU alone, no engine around it."
    graph.replay(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): graph.replay()
    torch.cuda.synchronize(); return n / (time.perf_counter() - t)


def gemv_bandwidth(model, reps=20):
    """HBM bytes/s of each batch-1 matmul of a layer and of the head, timed the way the decode step runs them: inside
    a CUDA graph, one call per layer's weight (22 different matrices, so the 50 MB L2 cache does not hold them
    between calls), for every tile of GEMV_TILES, and on Hopper the three best again with programmatic dependent
    launch (the calls of one matrix then overlap their neighbours' edges), against cuBLAS in the same graph.
    (Timed one call at a time from Python instead, these kernels measure their launch, not their work.)"""
    import torch.nn.functional as F
    from guide.core import capture_cuda_graph
    from guide.serve.decode import GEMV_TILES, gemv, qkv_to_cache
    from guide.serve.kvcache import PagedKVCache, _fused_weights
    cfg, layers, dev = model.config, _fused_weights(model), model.device
    x = torch.randn(1, cfg.dim, device=dev, dtype=torch.bfloat16)
    y, h = torch.randn(1, cfg.n_heads * cfg.head_dim, device=dev, dtype=x.dtype), torch.randn(1, cfg.hidden_dim, device=dev, dtype=x.dtype)
    cache = PagedKVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks=2, block_size=16, device=dev, dtype=x.dtype)
    pos = torch.tensor([3], device=dev)
    n_qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    head = [(model.lm_head.weight, model.norm.weight)]
    cases = dict(   # name: (weights, guide's call (i, w, tile, pdl), cuBLAS's call (w), bytes of one weight)
        qkv_to_cache=(layers, lambda i, w, t, p: qkv_to_cache(model, x, w[0], w[4], pos, pos, cache.kv[i], blocks=t, pdl=p),
                      lambda w: F.linear(x, w[0][:n_qkv]), n_qkv * cfg.dim * 2),
        o=(layers, lambda i, w, t, p: gemv(y, w[1].t(), residual=x, blocks=t, pdl=p), lambda w: torch.addmm(x, y, w[1]), w_bytes(layers[0][1])),
        gate_up=(layers, lambda i, w, t, p: gemv(x, w[2], norm_weight=w[5], eps=cfg.norm_eps, glu=True, blocks=t, pdl=p), lambda w: F.linear(x, w[2]),
                 w_bytes(layers[0][2])),
        down=(layers, lambda i, w, t, p: gemv(h, w[3].t(), residual=x, blocks=t, pdl=p), lambda w: torch.addmm(x, h, w[3]),
              w_bytes(layers[0][3])),
        lm_head=(head, lambda i, w, t, p: gemv(x, w[0], norm_weight=w[1], eps=cfg.norm_eps, blocks=t, pdl=p), lambda w: F.linear(x, w[0]), w_bytes(head[0][0])))
    def per_call(run, calls): return 1 / replay_tps(capture_cuda_graph(run)[0], reps) / calls
    hopper, out = torch.cuda.get_device_capability(dev) >= (9, 0), {}
    for name, (ws, ours, cublas, nbytes) in cases.items():
        run = lambda t, p: per_call(lambda: [ours(i, w, t, p) for i, w in enumerate(ws)], len(ws)) * 1e6
        plain = {t: run(t, False) for t in GEMV_TILES}
        tiles = {"%dx%d/%dw" % t: us for t, us in plain.items()}
        if hopper: tiles.update({"%dx%d/%dw+pdl" % t: run(t, True) for t in sorted(plain, key=plain.get)[:3]})   # the three best, chained
        t_c = per_call(lambda: [cublas(w) for w in ws], len(ws))
        best = min(tiles, key=tiles.get)
        out[name] = dict(MB=nbytes / 1e6, calls_per_graph=len(ws), best_tile=best, best_us=tiles[best], best_TBps=nbytes / tiles[best] / 1e6,
                         cublas_us=t_c * 1e6, cublas_TBps=nbytes / t_c / 1e12, tiles_us=tiles)
    return out


def attention_in_graph(model, context=256, reps=20):
    """Microseconds per layer of `paged_attention` at batch 1 over `context` positions, timed as the decode step runs it:
    one call per layer's cache in a CUDA graph, its splits merged by a second kernel or in the same kernel (`counts`),
    each with and (on Hopper) without programmatic dependent launch."""
    from guide.core import capture_cuda_graph
    from guide.serve.decode import paged_attention
    from guide.serve.kvcache import PagedKVCache
    cfg, dev = model.config, model.device
    cache = PagedKVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_blocks=context // 16, block_size=16, device=dev, dtype=torch.bfloat16)
    for kv in cache.kv: kv.normal_()
    q = torch.randn(1, cfg.n_heads, cfg.head_dim, device=dev, dtype=torch.bfloat16)
    tables, positions = torch.arange(context // 16, device=dev)[None], torch.tensor([context - 1], device=dev)
    counts = torch.zeros(cfg.n_kv_heads, dtype=torch.int32, device=dev)
    out = {}
    for pdl in (False, True) if torch.cuda.get_device_capability(dev) >= (9, 0) else (False,):
        for name, c in (("two_kernels", None), ("one_kernel", counts)):
            graph, _ = capture_cuda_graph(lambda: [paged_attention(q, kv, tables, positions, pdl=pdl, counts=c) for kv in cache.kv])
            out[name + ("_pdl" if pdl else "") + "_us"] = 1e6 / replay_tps(graph, reps) / cfg.n_layers
    out.update(context=context, counts_left_at_zero=not counts.any().item())
    return out


def w_bytes(w): return w.numel() * w.element_size()


def save_decode_results(res, out):
    "Write serve_gpu_decode.json and its plot (batch-1 bars against the ceiling, batched throughput)."
    from guide.core import atomic_write
    atomic_write(out / "serve_gpu_decode.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw=dict(width_ratios=[3, 2]))
    names = ["ceiling", "GPU only\n(graph replayed)", "8 steps/graph\n+overlap", "paged (+PDL),\n8 steps/graph", "Engine(model)\n+overlap",
             "Engine(model)\n(default)", "paged KV path\n+PDL", "graphs+GEMV\n+paged KV path", "Triton GEMV\n+PDL", "guide graphs\n+Triton GEMV",
             "guide graphs\n+compile", "guide graphs\n(cuBLAS)", "guide\neager", "HF generate\nstatic+compile", "HF\ngenerate"]
    nan = float("nan")
    replay = max(v for k, v in res.items() if k.startswith("batch1_") and k.endswith("replay_only_tokens_per_s"))   # the fastest graph alone
    vals = [res["ceiling_tokens_per_s"], replay, res.get("batch1_multistep_overlap_tokens_per_s", nan),
            res.get("batch1_multistep_tokens_per_s", nan), res.get("batch1_overlap_tokens_per_s", nan), res.get("batch1_default_tokens_per_s", nan),
            res.get("batch1_graphs_paged_pdl_tokens_per_s", nan),
            res["batch1_graphs_paged_tokens_per_s"], res.get("batch1_graphs_pdl_tokens_per_s", nan), res["batch1_graphs_tokens_per_s"],
            res.get("batch1_compiled_graphs_tokens_per_s", nan),
            res["batch1_graphs_cublas_tokens_per_s"], res["batch1_eager_tokens_per_s"],
            res.get("batch1_hf_static_compile_tokens_per_s", nan), res["batch1_hf_generate_tokens_per_s"]]
    names, vals = zip(*[(n.replace("\n", " "), v) for n, v in zip(names, vals) if v == v])   # what this run measured
    ax[0].barh(names[::-1], vals[::-1]); ax[0].set_xlabel("tokens / s (batch 1)"); ax[0].tick_params(axis="y", labelsize=8)
    ax[0].axvline(res["target_fraction"] * res["ceiling_tokens_per_s"], color="k", ls="--", lw=1, label=f"target: {res['target_fraction']:.0%} of the ceiling")
    ax[0].legend(fontsize=7, loc="lower right")
    ax[0].set_title(f"{res['params'] / 1e9:.2f}B bf16 batch 1: Engine(model) at {res.get('fraction_of_ceiling_default', res['fraction_of_ceiling']):.0%} of the bandwidth ceiling, best {res['best_batch1_fraction_of_ceiling']:.0%}", fontsize=10)
    for key, style, label in (("batched_tokens_per_s", "o-", "gather + SDPA"), ("batched_paged_tokens_per_s", "s--", "paged attention kernel")):
        ax[1].plot([int(b) for b in res[key]], list(res[key].values()), style, label=label)      # (JSON keys are strings)
    ax[1].legend(fontsize=7)
    ax[1].set_xscale("log", base=2); ax[1].set_xlabel("requests decoded together"); ax[1].set_ylabel("tokens / s")
    fig.suptitle(res["env"]["device"]); fig.tight_layout(); fig.savefig(out / "serve_gpu_decode.png", dpi=100)


def gpu_decode(device, steps=128, batches=(1, 8, 32, 64), out=HERE / "results", compile=True, hf_compile=True):
    """gpu tier: greedy decode of a ~1.1B Llama shape (bf16, random weights: speed does not depend on them).
    Batch 1 tokens/s vs the memory-bandwidth ceiling (bytes read per token / measured HBM bandwidth), with and
    without CUDA graphs, and transformers `generate` on the same shape (eager with its dynamic cache, and with a static
    cache, with which generate compiles its forward with torch.compile's CUDA graphs); then batched
    decode throughput of the engine. On Hopper and later, also the batch-1 step launched with programmatic dependent
    launch (`DecodeGraphs(pdl=True)`), and the paged path run 8 greedy steps per graph (`Engine(decode_steps=8)`).
    Writes serve_gpu_decode.{json,png}."""
    from transformers import LlamaForCausalLM
    from guide.core import environment_info
    from guide.model import Llama, ModelConfig, hf_config
    from guide.serve.decode import DecodeGraphs
    from guide.serve.engine import Engine, SamplingParams
    cfg = ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048,
                      tie_embeddings=False)                                    # TinyLlama-1.1B's shape
    with torch.device(device): model = Llama(cfg).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    read_bytes = weight_bytes - (0 if cfg.tie_embeddings else model.embed_tokens.weight.numel() * 2)   # one embedding row is read
    copy_bw, read_bw = hbm_bandwidth(weight_bytes, device)
    bw = max(copy_bw, read_bw)
    ceiling = bw / read_bytes
    def engine_tps(graphs, batch, n_steps, gemv=None, paged=False, pdl=False, decode_steps=1, overlap=False):
        eng = Engine(model, None, max_batch_size=max(batches), num_blocks=max(batches) * ((16 + steps) // 16 + 1),
                     cuda_graphs=graphs == "default", decode_steps=decode_steps, overlap=overlap)   # "default": the engine's own kernels
        if graphs is True: eng.graphs = DecodeGraphs(model, eng.cache, max(batches), gemv=gemv, paged_attention=paged, pdl=pdl)
        prompts = [[1 + b] * 16 for b in range(batch)]
        eng.generate(prompts, SamplingParams(max_tokens=n_steps, ignore_eos=True))            # warm up, capture graphs
        torch.cuda.synchronize(); t = time.perf_counter()
        out = eng.generate(prompts, SamplingParams(max_tokens=n_steps, ignore_eos=True)); torch.cuda.synchronize()
        return batch * n_steps / (time.perf_counter() - t), [r["token_ids"] for r in out]
    def batch1(name, **kw):
        "res[batch1_NAME_tokens_per_s]: the engine at batch 1; what it decoded goes to tokens[NAME]."
        res[f"batch1_{name}_tokens_per_s"], tokens[name] = engine_tps(kw.pop("graphs", True), 1, steps, **kw)
    def replay_only(decode_steps=1, **graph_kw):
        "Tokens/s of a batch-1 decode graph replayed back to back: the GPU alone, no engine around it."
        eng = Engine(model, None, max_batch_size=1, num_blocks=64, cuda_graphs=False, decode_steps=decode_steps)
        eng.graphs = DecodeGraphs(model, eng.cache, 1, block_buckets=[16], **{"paged_attention": False, "pdl": False, **graph_kw})
        eng.generate([[1] * 16], SamplingParams(max_tokens=8 + 2 * decode_steps, ignore_eos=True))     # captures the graph
        return decode_steps * replay_tps(eng.graphs.graphs[(1, 16, decode_steps if decode_steps > 1 else 0, 0, None)][0])
    tokens = {}          # what each variant decoded: a launch mode or a step loop must not change the tokens of the same kernels
    res = dict(benchmark="serve_gpu_decode", env=environment_info(), shape=dict(vars(cfg)), params=params, weight_bytes=weight_bytes,
               bytes_read_per_token=read_bytes, copy_bandwidth_GBps=copy_bw / 1e9, read_bandwidth_GBps=read_bw / 1e9,
               ceiling_tokens_per_s=ceiling, steps=steps, target_fraction=0.70)
    res["gemv_in_graph"] = gemv_bandwidth(model)               # each matrix of a layer, in a graph: every tile, with and without PDL, vs cuBLAS
    print(json.dumps(res["gemv_in_graph"], indent=1), flush=True)
    res["attention_in_graph"] = attention_in_graph(model)       # the paged kernel's splits merged by a second kernel, or in the same one
    print(json.dumps(res["attention_in_graph"], indent=1), flush=True)
    batch1("default", graphs="default")               # what Engine(model) and `guide serve` run
    batch1("overlap", graphs="default", overlap=True)  # + each step launched before the previous one's token is read
    batch1("graphs_cublas", gemv=False)
    batch1("graphs")                                  # batch-1 steps: decode_one (Triton GEMVs)
    batch1("graphs_paged", paged=True)                # + KV straight into and out of the blocks (qkv_to_cache, paged_attention)
    hopper = torch.cuda.get_device_capability(device) >= (9, 0)
    if hopper:        # each kernel launched during the previous one's tail (programmatic dependent launch)
        batch1("graphs_pdl", pdl=True)
        batch1("graphs_paged_pdl", paged=True, pdl=True)
    # the paged KV path (+ PDL on Hopper), 8 greedy steps per graph and host round trip (Engine(decode_steps=8))
    res["multistep"] = dict(decode_steps=8, paged_attention=True, pdl=hopper)
    batch1("multistep", paged=True, pdl=hopper, decode_steps=8)
    batch1("multistep_overlap", paged=True, pdl=hopper, decode_steps=8, overlap=True)
    res["batch1_graphs_replay_only_tokens_per_s"] = replay_only()
    res["batch1_graphs_paged_replay_only_tokens_per_s"] = replay_only(paged_attention=True)
    if hopper: res["batch1_graphs_paged_pdl_replay_only_tokens_per_s"] = replay_only(paged_attention=True, pdl=True)
    res["batch1_multistep_replay_only_tokens_per_s"] = replay_only(8, paged_attention=True, pdl=hopper)
    torch.cuda.empty_cache()
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1), flush=True)
    if compile:       # compiled + graphed; one block bucket (16 blocks = 256 positions) so that the run compiles once
        eng = Engine(model, None, max_batch_size=1, num_blocks=64, cuda_graphs=False)
        eng.graphs = DecodeGraphs(model, eng.cache, 1, compile=True, block_buckets=[16])
        t = time.perf_counter(); eng.generate([[1] * 16], SamplingParams(max_tokens=steps, ignore_eos=True))
        res["compile_seconds"] = time.perf_counter() - t
        torch.cuda.synchronize(); t = time.perf_counter()
        eng.generate([[1] * 16], SamplingParams(max_tokens=steps, ignore_eos=True)); torch.cuda.synchronize()
        res["batch1_compiled_graphs_tokens_per_s"] = steps / (time.perf_counter() - t)
        res["batch1_compiled_replay_only_tokens_per_s"] = replay_tps(eng.graphs.graphs[(1, 16, 0, 0, None)][0])
        del eng; torch.cuda.empty_cache()
        res["fraction_of_ceiling_compiled"] = res["batch1_compiled_graphs_tokens_per_s"] / ceiling
    res["fraction_of_ceiling_replay_only"] = res["batch1_graphs_replay_only_tokens_per_s"] / ceiling
    res["fraction_of_ceiling_cublas"] = res["batch1_graphs_cublas_tokens_per_s"] / ceiling
    res["batch1_eager_tokens_per_s"] = engine_tps(False, 1, min(steps, 64))[0]
    res["fraction_of_ceiling"] = res["batch1_graphs_tokens_per_s"] / ceiling
    res["fraction_of_ceiling_paged"] = res["batch1_graphs_paged_tokens_per_s"] / ceiling
    res["fraction_of_ceiling_multistep"] = res["batch1_multistep_tokens_per_s"] / ceiling
    res["fraction_of_ceiling_default"] = res["batch1_default_tokens_per_s"] / ceiling
    res["fraction_of_ceiling_overlap"] = res["batch1_overlap_tokens_per_s"] / ceiling
    res["fraction_of_ceiling_multistep_overlap"] = res["batch1_multistep_overlap_tokens_per_s"] / ceiling
    res["same_tokens"] = {a: tokens[a] == tokens[b] for a, b in (("graphs_pdl", "graphs"), ("graphs_paged_pdl", "graphs_paged"),
                                                                 ("multistep", "graphs_paged_pdl" if hopper else "graphs_paged"),
                                                                 ("default", "graphs_paged_pdl" if hopper else "graphs_paged"),
                                                                 ("overlap", "default"), ("multistep_overlap", "multistep")) if a in tokens}
    if not all(res["same_tokens"].values()): print("WARNING: a launch mode or the multi-step loop changed the tokens:", res["same_tokens"], flush=True)
    for variant in ("pdl", "paged_pdl"):
        if f"batch1_graphs_{variant}_tokens_per_s" in res: res[f"fraction_of_ceiling_{variant}"] = res[f"batch1_graphs_{variant}_tokens_per_s"] / ceiling
    res["best_batch1_fraction_of_ceiling"] = max(v for k, v in res.items() if k.startswith("fraction_of_ceiling") and "replay" not in k)
    res["fraction_of_ceiling_eager"] = res["batch1_eager_tokens_per_s"] / ceiling
    print(json.dumps(res, indent=1), flush=True)
    with torch.device(device): hf = LlamaForCausalLM(hf_config(cfg)).to(torch.bfloat16).eval()
    ids = torch.ones(1, 16, dtype=torch.long, device=device)
    def hf_tps(n=64, **kw):
        torch.cuda.synchronize(); t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw); torch.cuda.synchronize()
        return n / (time.perf_counter() - t)
    hf_tps(8)
    res["batch1_hf_generate_tokens_per_s"] = hf_tps()
    res["fraction_of_ceiling_hf"] = res["batch1_hf_generate_tokens_per_s"] / ceiling
    res["batched_tokens_per_s"] = {b: engine_tps(True, b, steps)[0] for b in batches}
    res["batched_paged_tokens_per_s"] = {b: engine_tps(True, b, steps, paged=True)[0] for b in batches}
    save_decode_results(res, out)              # saved now, in case the compilation below runs out of time
    if hf_compile:    # the reference point: a static KV cache, which makes generate compile its forward (CUDA graphs)
        t = time.perf_counter()
        for _ in range(3): hf_tps(cache_implementation="static")       # compile, then record the graphs at the same cache length
        res["hf_static_compile_seconds"] = time.perf_counter() - t
        res["batch1_hf_static_compile_tokens_per_s"] = hf_tps(cache_implementation="static")
        res["fraction_of_ceiling_hf_static_compile"] = res["batch1_hf_static_compile_tokens_per_s"] / ceiling
        save_decode_results(res, out)
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="tiny"); ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=128); ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0); ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="alternate the two sides this many times; report the best of each")
    ap.add_argument("--no-compile", action="store_true", help="--gpu-decode without guide's torch.compile variant (saves its ~minute of compilation)")
    ap.add_argument("--no-hf-compile", action="store_true", help="--gpu-decode without transformers generate's static cache + compile")
    ap.add_argument("--gpu-decode", action="store_true", help="gpu tier: batch-1 decode of a ~1.1B shape vs the memory-bandwidth ceiling, and batched")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    from guide.core import atomic_write, environment_info, setup_torch
    from guide.model import to_hf
    from guide.pretrained import tiny_base
    from guide.serve.engine import make_trace
    setup_torch()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    if a.gpu_decode:
        gpu_decode(a.device, out=out, compile=not a.no_compile, hf_compile=not a.no_hf_compile); return 0
    n = 16 if a.smoke else a.requests
    model, _ = tiny_base(a.tier, a.seed, device=a.device)
    trace = make_trace(n, model.config.vocab_size, seed=a.seed, output_median=6 if a.smoke else 24, output_range=(2, 40) if a.smoke else (2, 192))
    hf = to_hf(model)
    engine = make_engine(model, trace, a.batch)
    run_engine(engine, trace[:a.batch]); run_hf_static(hf, trace[:a.batch], a.batch, a.device)       # warm up: one full batch each
    load = os.getloadavg()[0]
    engs, stats = [], []
    for _ in range(1 if a.smoke else a.repeats):                 # alternate; the best run of each side is reported
        engs.append(run_engine(engine, trace)); stats.append(run_hf_static(hf, trace, a.batch, a.device))
    eng, stat = max(engs, key=lambda r: r["tokens_per_s"]), max(stats, key=lambda r: r["tokens_per_s"])
    outs = [m for _, m in trace]
    res = dict(benchmark="serve_engine", env=environment_info(), tier=a.tier, device=a.device, requests=n, batch=a.batch,
               load_avg_1min=load, runs=dict(continuous=engs, hf_static=stats),
               trace=dict(prompt_mean=float(np.mean([len(p) for p, _ in trace])), output_dist="log-normal, median 24, sigma 1, clipped 2..192",
                          output_mean=float(np.mean(outs)), output_p50=pct(outs, 50), output_p95=pct(outs, 95), output_max=max(outs)),
               continuous=eng, hf_static=stat, tokens_per_s_ratio=eng["tokens_per_s"] / stat["tokens_per_s"],
               tokens_per_cpu_s_ratio=eng["tokens_per_cpu_s"] / stat["tokens_per_cpu_s"], target_ratio=5.0)
    name = "serve_engine_smoke" if a.smoke else "serve_engine"
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    labels = ["continuous\n(guide engine)", f"static batch {a.batch}\n(HF generate)"]
    ax[0].bar(labels, [eng["tokens_per_s"], stat["tokens_per_s"]]); ax[0].set_ylabel("useful tokens / s")
    ax[1].bar(labels, [eng["ttft_p50"], stat["ttft_p50"]], label="p50"); ax[1].bar(labels, [eng["ttft_p95"] - eng["ttft_p50"], stat["ttft_p95"] - stat["ttft_p50"]],
                                                                              bottom=[eng["ttft_p50"], stat["ttft_p50"]], alpha=.5, label="p95")
    ax[1].set_ylabel("TTFT (s)"); ax[1].legend()
    ax[2].bar(labels, [eng["itl_p50"] * 1e3, stat["itl_p50"] * 1e3], label="p50")
    ax[2].bar(labels, [(eng["itl_p95"] - eng["itl_p50"]) * 1e3, (stat["itl_p95"] - stat["itl_p50"]) * 1e3],
              bottom=[eng["itl_p50"] * 1e3, stat["itl_p50"] * 1e3], alpha=.5, label="p95")
    ax[2].set_ylabel("inter-token latency (ms)"); ax[2].legend()
    fig.suptitle(f"{n} requests, {a.device}: {res['tokens_per_s_ratio']:.1f}x tokens/s (wall), "
                 f"{res['tokens_per_cpu_s_ratio']:.1f}x tokens per CPU-second"); fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    print(json.dumps({k: res[k] for k in ("load_avg_1min", "trace", "tokens_per_s_ratio", "tokens_per_cpu_s_ratio", "continuous", "hf_static")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
