"""GPU-tier MFU of guide's model and loop on one H100/H200 (NOT runnable on the CPU test machines).

Measures model FLOPs utilisation (achieved model FLOP/s / a measured bf16 matmul peak) of
  1. a GPT-2-124M shape (dim 768, 12 layers, 12 heads, vocab 50304, T=1024, B=16): target >= 60% of the
     measured peak (a plain nanoGPT-style compiled model reaches ~57% on an H200, transformers GPT-2 eager ~21%);
  2. a ~1.1B Llama shape (dim 2048, 22 layers, 32 heads, 4 KV heads, SwiGLU 5632, vocab 32000, T=2048): target >= 50%;
with bf16 autocast, torch.compile and fused AdamW, and projects the time to train 1B parameters on 14B
tokens on 8×A100 (312 TFLOP/s bf16 dense each) at the measured MFU. Writes
benchmarks/results/train_mfu_gpu.{json,png}. Budget: under 8 minutes including compilation.

    python benchmarks/train_mfu_gpu.py                # needs CUDA; exits 0 with a message otherwise
    python benchmarks/train_mfu_gpu.py --only gpt2    # one shape
"""
import argparse, json, sys, time
from pathlib import Path

import torch

from guide.core import atomic_write, environment_info, measure_matmul_flops, seed_everything, setup_torch
from guide.model import Llama, ModelConfig
from guide.train.loop import accumulate, mfu

OUT = Path(__file__).resolve().parent / "results"
SHAPES = {
    # GPT-2 small's shape in guide's Llama blocks (RMSNorm, RoPE, SwiGLU with hidden 3072 ≈ GPT-2's 4·768 MLP)
    "gpt2-124m": dict(cfg=dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048,
                               max_seq_len=1024, tie_embeddings=True), batch=16, seq=1024, target=0.60),
    "llama-1.1b": dict(cfg=dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                                max_seq_len=2048, tie_embeddings=False), batch=4, seq=2048, target=0.50),
}
A100_BF16 = 312e12


def bench(name: str, spec: dict, peak: float, steps: int = 30, warmup: int = 8) -> dict:
    seed_everything(0)
    with torch.device("cuda"): model = Llama(ModelConfig(**spec["cfg"]))     # initialised on the GPU: seconds, not a minute
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    cmodel = torch.compile(model)
    B, T = spec["batch"], spec["seq"]
    x = torch.randint(0, spec["cfg"]["vocab_size"], (B, T + 1), device="cuda")
    batch = [(x[:, :-1], x[:, 1:])]
    times = []
    t_compile = time.perf_counter()
    for i in range(warmup + steps):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        accumulate(cmodel, batch, torch.bfloat16)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); dt = time.perf_counter() - t0
        if i == warmup - 1: t_compile = time.perf_counter() - t_compile
        if i >= warmup: times.append(dt)
    step = sorted(times)[len(times) // 2]
    tps = B * T / step
    fpt = model.flops_per_token(T)
    m = mfu(tps, fpt, peak)
    n = model.num_params()
    projected_h = 6 * 1e9 * 14e9 / (8 * A100_BF16 * m) / 3600       # 1B params, 14B tokens, 8×A100 at this MFU
    del model, cmodel, opt; torch.cuda.empty_cache()
    return dict(shape=name, params=n, batch=B, seq=T, step_s=step, tokens_per_s=tps, flops_per_token=fpt, mfu=m,
                target=spec["target"], meets_target=m >= spec["target"], compile_and_warmup_s=t_compile,
                projected_hours_1b_14b_8xa100=projected_h)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["gpt2", "llama"], default=None); ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("train_mfu_gpu.py needs a CUDA GPU (H100/H200); nothing measured on this machine."); return 0
    setup_torch(8)
    torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
    peak = measure_matmul_flops("cuda", torch.bfloat16)
    results = []
    for name, spec in SHAPES.items():
        if args.only and not name.startswith(args.only): continue
        r = bench(name, spec, peak, args.steps); results.append(r)
        print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%} of measured {peak / 1e12:.0f} TFLOP/s "
              f"(target {r['target']:.0%}); 1B×14B tokens on 8×A100 ≈ {r['projected_hours_1b_14b_8xa100']:.0f} h", flush=True)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    res = dict(env=environment_info(), peak_bf16_flops=peak, results=results)
    atomic_write(out / "train_mfu_gpu.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["shape"] for r in results], [r["mfu"] for r in results], label="guide (compiled, bf16)")
    ax.scatter([r["shape"] for r in results], [r["target"] for r in results], color="red", zorder=3, label="target")
    ax.set_ylabel("MFU vs measured bf16 matmul peak"); ax.set_ylim(0, 1); ax.legend()
    plt.tight_layout(); fig.savefig(out / "train_mfu_gpu.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
