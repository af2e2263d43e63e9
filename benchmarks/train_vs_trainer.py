"""guide's training loop vs transformers' Trainer: same model, same data, same machine, one run.

Both train the tiny-tier Llama from the same initial weights (guide `Llama` and its `to_hf` twin, logits
equal within 1e-5) on the same blocks in the same order, with AdamW (fused in both), warmup + cosine and
clipping at 1.0. guide's loop runs as a user of this package would: bf16 autocast where the machine
multiplies bf16 faster than fp32 (AMX on recent Xeons; measured here, not assumed) and `torch.compile`.
The Trainer runs with its defaults (fp32, eager) and with `bf16=True`; the headline ratio is against the
faster of those two. For transparency the Trainer also runs with `bf16=True, torch_compile=True`.
Reported: tokens/s (median step after warm-up, and end to end including compilation) and the final
training loss of each (guide no worse than 0.05 nats = the speed is not bought with loss).
Writes benchmarks/results/train_vs_trainer.{json,png}.

    python benchmarks/train_vs_trainer.py            # ~3 minutes on one CPU core
    python benchmarks/train_vs_trainer.py --steps 5  # smoke run
"""
import argparse, copy, json, os, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch

from guide.core import environment_info, get_tier, measure_matmul_flops, pick_device, seed_everything, setup_torch
from guide.data import BlockLoader, get_dataset, get_tokenizer
from guide.model import Llama, ModelConfig, to_hf
from guide.train.loop import train

OUT = Path(__file__).resolve().parent / "results"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80); ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tier", default="tiny"); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None); ap.add_argument("--no-compile", action="store_true", help="guide without torch.compile"); ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    setup_torch(); dev = pick_device(args.device); T = get_tier(args.tier)
    tok, data = get_tokenizer(args.tier), get_dataset(args.tier)
    loader = BlockLoader(data["train"], T.seq_len, args.batch, seed=args.seed)
    blocks = [loader.next_batch() for _ in range(args.steps)]
    seed_everything(args.seed)
    model = Llama(ModelConfig.from_tier(T, vocab_size=len(tok)))
    hf = to_hf(model)                                    # same weights, transformers implementation
    model = model.to(dev)

    class Replay:                                        # the same blocks, in the same order, for both
        block_size = T.seq_len
        def __init__(self): self.i = 0
        def next_batch(self):
            x, y = blocks[self.i % len(blocks)]; self.i += 1
            return x.to(dev), y.to(dev)

    lr, warmup = 3e-3, max(1, args.steps // 10)
    # bf16 where this machine multiplies it faster than fp32 (AMX on recent Xeons, tensor cores on GPUs)
    fp32_peak, bf16_peak = measure_matmul_flops(dev, torch.float32), measure_matmul_flops(dev, torch.bfloat16)
    dtype = torch.bfloat16 if bf16_peak > 1.5 * fp32_peak else torch.float32
    t0 = time.perf_counter()
    hist = train(model, Replay(), steps=args.steps, lr=lr, warmup=warmup, dtype=dtype, compile=not args.no_compile,
                 peak_flops=max(fp32_peak, bf16_peak), desc="guide")
    guide_wall = time.perf_counter() - t0

    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Blocks(Dataset):
        def __len__(self): return len(blocks) * args.batch
        def __getitem__(self, i):
            x, _ = blocks[i // args.batch]; row = i % args.batch
            return {"input_ids": x[row], "labels": x[row]}   # HF shifts the labels inside the model

    class Timing(TrainerCallback):
        def __init__(self): self.times, self.losses = [], []
        def on_step_begin(self, a, s, c, **k): self.t = time.perf_counter()
        def on_step_end(self, a, s, c, **k): self.times.append(time.perf_counter() - self.t)
        def on_log(self, a, s, c, logs=None, **k):
            if logs and "loss" in logs: self.losses.append(logs["loss"])

    import tempfile
    def run_trainer(bf16: bool, torch_compile: bool = False) -> dict:
        hf_model = copy.deepcopy(hf)
        targs = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="guide-trainer-"), max_steps=args.steps, per_device_train_batch_size=args.batch,
                                  learning_rate=lr, warmup_steps=warmup, lr_scheduler_type="cosine_with_min_lr",
                                  lr_scheduler_kwargs={"min_lr_rate": 0.1}, weight_decay=0.1,
                                  adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                                  report_to="none", use_cpu=dev.type != "cuda", bf16=bf16, torch_compile=torch_compile,
                                  dataloader_num_workers=0, seed=args.seed, disable_tqdm=True)
        timing = Timing()
        trainer = Trainer(model=hf_model, args=targs, train_dataset=Blocks(), callbacks=[timing])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)   # same order
        t0 = time.perf_counter(); trainer.train(); wall = time.perf_counter() - t0
        return dict(tokens_per_s=tokens_per_step / med(timing.times[skip:]), end_to_end_tokens_per_s=args.steps * tokens_per_step / wall,
                    final_loss=sum(timing.losses[-5:]) / max(1, len(timing.losses[-5:])), wall_s=wall, losses=timing.losses,
                    settings=f"{'bf16' if bf16 else 'fp32'}{' + torch_compile' if torch_compile else ''}")

    tokens_per_step = args.batch * T.seq_len
    med = lambda xs: sorted(xs)[len(xs) // 2]
    skip = min(5, args.steps // 2)
    trainers = {"defaults (fp32)": run_trainer(bf16=False), "bf16": run_trainer(bf16=True)}
    if not args.no_compile: trainers["bf16 + torch_compile"] = run_trainer(bf16=True, torch_compile=True)
    g_tps = med([h["tokens_per_s"] for h in hist[skip:]])
    guide_res = dict(tokens_per_s=g_tps, end_to_end_tokens_per_s=args.steps * tokens_per_step / guide_wall,
                     final_loss=sum(h["loss"] for h in hist[-5:]) / len(hist[-5:]), wall_s=guide_wall,
                     settings=f"{str(dtype).removeprefix('torch.')}{' + compile' if not args.no_compile else ''} + fused AdamW")
    eager = {k: v for k, v in trainers.items() if "compile" not in k}
    best_eager = max(eager, key=lambda k: eager[k]["tokens_per_s"])
    res = dict(env=environment_info(), steps=args.steps, batch=args.batch, seq_len=T.seq_len, device=str(dev),
               matmul_peak_gflops=dict(fp32=fp32_peak / 1e9, bf16=bf16_peak / 1e9),
               guide=guide_res, trainer={k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in trainers.items()},
               baseline=f"Trainer {best_eager}: the faster of Trainer's eager settings",
               note="target on CPU: guide >= 1.5x Trainer tokens/s at equal loss (guide final loss at most 0.05 nats above Trainer)")
    res["speedup"] = g_tps / trainers[best_eager]["tokens_per_s"]
    res["end_to_end_speedup"] = guide_res["end_to_end_tokens_per_s"] / trainers[best_eager]["end_to_end_tokens_per_s"]
    res["speedup_vs_each"] = {k: g_tps / v["tokens_per_s"] for k, v in trainers.items()}
    res["final_loss_diff"] = guide_res["final_loss"] - trainers[best_eager]["final_loss"]
    res["equal_loss"] = res["final_loss_diff"] <= 0.05   # guide's speed is not bought with a worse loss
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    (out / "train_vs_trainer.json").write_text(json.dumps(res, indent=1))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [f"guide\n{guide_res['settings']}"] + [f"Trainer\n{v['settings']}" for v in trainers.values()]
    ax[0].bar(names, [g_tps] + [v["tokens_per_s"] for v in trainers.values()]); ax[0].set_ylabel("tokens/s (median step)")
    ax[0].set_title(f"guide {res['speedup']:.2f}x Trainer ({dev.type})"); ax[0].tick_params(axis="x", labelsize=7)
    ax[1].plot([h["loss"] for h in hist], label="guide")
    for k, v in trainers.items(): ax[1].plot(v["losses"], label=f"Trainer {k}", alpha=0.7)
    ax[1].set_xlabel("step"); ax[1].set_ylabel("train loss"); ax[1].legend(fontsize=7); ax[1].set_title("same data, same init")
    plt.tight_layout(); fig.savefig(out / "train_vs_trainer.png", dpi=100)
    print(json.dumps({k: res[k] for k in ("speedup", "end_to_end_speedup", "speedup_vs_each", "final_loss_diff", "equal_loss")}
                     | {"guide": guide_res, "trainer": res["trainer"]}, indent=1))
    return res


if __name__ == "__main__":
    main()
