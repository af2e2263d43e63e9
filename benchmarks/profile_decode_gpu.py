"""gpu tier: where the time of one batch-1 decode step of a ~1.1B Llama shape goes (NOT runnable without CUDA).

Times the step replayed from a graph (`DecodeGraphs`: the captured graph of `decode_one`, Triton GEMVs) with the
keys and values gathered for SDPA, the same with the paged KV path (`qkv_to_cache` + `paged_attention`), that path
launched with programmatic dependent launch (Hopper and later: what the engine runs by default at batch 1) and run 8
greedy steps per graph, and eagerly (`decode_static`, cuBLAS), then lists the CUDA kernels of a few steps of each by total time
(torch.profiler; the graphed step's kernels are traced inside the graph). Then the engine around the graph
(`Engine(model)`, its default kernels): the wall time of a batch-1 decode step against the graph replayed alone, and
the host's CUDA runtime calls and ops over 50 steps (torch.profiler, CPU side). Its output on one H200 is
benchmarks/results/decode_profile_h200.txt.

    python benchmarks/profile_decode_gpu.py
"""
import sys, time
import torch
if not torch.cuda.is_available(): print("profile_decode_gpu.py needs a CUDA GPU; nothing measured."); sys.exit(0)
from torch.profiler import profile, ProfilerActivity
from guide.model import Llama, ModelConfig
from guide.serve.decode import DecodeGraphs, decode_static
from guide.serve.kvcache import PagedKVCache, _fused_weights, prefill_batch_forward
cfg = ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048, tie_embeddings=False)
with torch.device("cuda"): m = Llama(cfg).to(torch.bfloat16).eval()
BYTES = 2069024768                                                 # weights read per token (all but the embedding table)
c = PagedKVCache(22, 4, 64, num_blocks=64, block_size=16, device="cuda", dtype=torch.bfloat16)
table = c.allocator.allocate(16); prefill_batch_forward(m, c, [[1] * 16], [table])
w = _fused_weights(m)
args = (torch.tensor([5], device="cuda"), torch.tensor([16], device="cuda"), torch.tensor([table], device="cuda"))
graphs = DecodeGraphs(m, c, 1, block_buckets=[16], paged_attention=False, pdl=False)
paged = DecodeGraphs(m, c, 1, block_buckets=[16], paged_attention=True, pdl=False)
steps = {"graphed decode_one, gather + SDPA": (lambda: graphs([5], [16], [table]), 1),   # name: (one call, tokens it decodes)
         "graphed decode_one, paged KV path (qkv_to_cache + paged_attention)": (lambda: paged([5], [16], [table]), 1),
         "eager decode_static": (lambda: decode_static(m, c, *args, w), 1)}
hopper = torch.cuda.get_device_capability() >= (9, 0)                # + programmatic dependent launch: kernels overlap their neighbours' edges
chained = DecodeGraphs(m, c, 1, block_buckets=[16], paged_attention=True, pdl=hopper)
if hopper: steps["graphed decode_one, paged KV path + PDL (the engine's default)"] = (lambda: chained([5], [16], [table]), 1)
steps["8 greedy steps in one graph, paged KV path" + (" + PDL" if hopper else "")] = (lambda: chained.multi_step([5], [16], [table], 8), 8)
for name, (step, n) in steps.items():
    step(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(50): step()
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 50 / n
    print(f"{name}: {dt * 1e6:.0f} us per token, {BYTES / dt / 1e12:.2f} TB/s of weights")
for name, (step, n) in steps.items():
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(max(1, 3 // n)): step()
        torch.cuda.synchronize()
    print(f"\n{name}: CUDA kernels of {max(1, 3 // n) * n} steps")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))


def engine_steps(model, n=50):
    """Wall time per batch-1 decode step of `Engine(model)` (each step waits for its token), and the host side of
    `n` such steps profiled (CPU activity: Python ops and CUDA runtime calls)."""
    from guide.serve.engine import Engine, SamplingParams
    eng = Engine(model, None, max_batch_size=1, num_blocks=64, prefix_caching=False)
    params = SamplingParams(max_tokens=4 * n, ignore_eos=True)
    eng.generate([[1] * 16], params)                                   # captures the graphs this length needs
    eng.add_request([1] * 16, params); eng.step()                      # prefill
    for _ in range(10): eng.step()
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync(); t = time.perf_counter()
    for _ in range(n): eng.step()
    sync(); per_step = (time.perf_counter() - t) / n
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=activities) as p:
        for _ in range(n): eng.step()
        sync()
    while eng.has_unfinished(): eng.step()
    return per_step, p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)


per_step, table = engine_steps(m)
print(f"\nEngine(model) at batch 1, its default kernels: {per_step * 1e6:.0f} us per decode step (step() to step(), each waiting for its token)")
print(f"host ops and CUDA runtime calls of 50 engine decode steps, by self CPU time:\n{table}")
