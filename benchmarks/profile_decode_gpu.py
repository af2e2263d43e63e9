"""gpu tier: where the time of one batch-1 decode step of a ~1.1B Llama shape goes (NOT runnable without CUDA).

Times each GEMV of one layer alone (achieved GB/s) and the whole eager step, then prints the CUDA kernels of
three eager steps by total time (torch.profiler). benchmarks/results/decode_profile_h200.txt is its output on one H200.

    python benchmarks/profile_decode_gpu.py
"""
import sys, time
import torch
if not torch.cuda.is_available(): print("profile_decode_gpu.py needs a CUDA GPU; nothing measured."); sys.exit(0)
import torch.nn.functional as F
from guide.model import Llama, ModelConfig
from guide.serve.engine import PagedKVCache, decode_static, prefill_batch_forward, _fused_weights
cfg = ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048, tie_embeddings=False)
with torch.device("cuda"): m = Llama(cfg).to(torch.bfloat16).eval()
c = PagedKVCache(22, 4, 64, num_blocks=64, block_size=16, device="cuda", dtype=torch.bfloat16)
ta = c.allocator.allocate(16); prefill_batch_forward(m, c, [[1] * 16], [ta])
args = (torch.tensor([5], device="cuda"), torch.tensor([16], device="cuda"), torch.tensor([ta], device="cuda"))
w = _fused_weights(m)
def bw(fn, nbytes, n=200):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n; return f"{dt*1e6:8.1f} us {nbytes/dt/1e9:7.0f} GB/s"
x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16); h = torch.randn(1, 5632, device="cuda", dtype=torch.bfloat16)
W = w[0][0]; Wgu = w[0][2]; Wd = w[0][3]; Wo = w[0][1]
print("qkv F.linear", W.shape, bw(lambda: F.linear(x, W), W.numel() * 2))
print("gate_up F.linear", Wgu.shape, bw(lambda: F.linear(x, Wgu), Wgu.numel() * 2))
print("down addmm(t)", Wd.shape, Wd.stride(), bw(lambda: torch.addmm(x, h, Wd), Wd.numel() * 2))
Wdc = m.layers[0].mlp.down_proj.weight.detach()
print("down F.linear", Wdc.shape, bw(lambda: F.linear(h, Wdc), Wdc.numel() * 2))
print("o addmm(t)", Wo.shape, bw(lambda: torch.addmm(x, x, Wo), Wo.numel() * 2))
print("o F.linear", bw(lambda: F.linear(x, m.layers[0].self_attn.o_proj.weight), Wo.numel() * 2))
print("lm_head", bw(lambda: m.lm_head(x), m.lm_head.weight.numel() * 2))
print("whole step eager", bw(lambda: decode_static(m, c, *args, w), 2069024768, n=20))
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as p:
    for _ in range(3): decode_static(m, c, *args, w)
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))
