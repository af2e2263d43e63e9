"""guide's training loop vs transformers' Trainer: same model, same data, same machine, one run.

Both train the tiny-tier Llama from the same initial weights (guide `Llama` and its `to_hf` twin, logits
equal within 1e-5) on the same blocks, with AdamW, warmup + cosine, clipping at 1.0, fp32 on CPU (bf16 on
GPU). Reported: tokens/s of each (median over steps after warm-up, and end to end) and the final training
loss of each (equal loss = the comparison is fair). Writes benchmarks/results/train_vs_trainer.{json,png}.

    python benchmarks/train_vs_trainer.py            # ~2 minutes on one CPU core
    python benchmarks/train_vs_trainer.py --steps 5  # smoke run
"""
import argparse, json, os, sys, time
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
    ap.add_argument("--device", default=None); ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    setup_torch(); dev = pick_device(args.device); T = get_tier(args.tier)
    tok, data = get_tokenizer(args.tier), get_dataset(args.tier)
    loader = BlockLoader(data["train"], T.seq_len, args.batch, seed=args.seed)
    blocks = [loader.next_batch() for _ in range(args.steps)]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
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
    peak = measure_matmul_flops(dev, dtype if dev.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    hist = train(model, Replay(), steps=args.steps, lr=lr, warmup=warmup, dtype=dtype, peak_flops=peak, desc="guide")
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
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="guide-trainer-"), max_steps=args.steps, per_device_train_batch_size=args.batch,
                              learning_rate=lr, warmup_steps=warmup, lr_scheduler_type="cosine", weight_decay=0.1,
                              adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                              report_to="none", use_cpu=dev.type != "cuda", bf16=dev.type == "cuda", dataloader_num_workers=0,
                              seed=args.seed, disable_tqdm=True)
    timing = Timing()
    trainer = Trainer(model=hf, args=targs, train_dataset=Blocks(), callbacks=[timing])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)   # same order
    t0 = time.perf_counter(); trainer.train(); trainer_wall = time.perf_counter() - t0

    tokens_per_step = args.batch * T.seq_len
    med = lambda xs: sorted(xs)[len(xs) // 2]
    skip = min(5, args.steps // 2)
    g_tps = med([h["tokens_per_s"] for h in hist[skip:]])
    t_tps = tokens_per_step / med(timing.times[skip:])
    res = dict(env=environment_info(), steps=args.steps, batch=args.batch, seq_len=T.seq_len, device=str(dev),
               guide=dict(tokens_per_s=g_tps, end_to_end_tokens_per_s=args.steps * tokens_per_step / guide_wall,
                          final_loss=sum(h["loss"] for h in hist[-5:]) / len(hist[-5:]), wall_s=guide_wall),
               trainer=dict(tokens_per_s=t_tps, end_to_end_tokens_per_s=args.steps * tokens_per_step / trainer_wall,
                            final_loss=sum(timing.losses[-5:]) / max(1, len(timing.losses[-5:])), wall_s=trainer_wall),
               note="target on CPU: guide >= 1.5x Trainer tokens/s at equal loss")
    res["speedup"] = g_tps / t_tps
    res["end_to_end_speedup"] = res["guide"]["end_to_end_tokens_per_s"] / res["trainer"]["end_to_end_tokens_per_s"]
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    (out / "train_vs_trainer.json").write_text(json.dumps(res, indent=1))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].bar(["guide loop", "transformers Trainer"], [g_tps, t_tps]); ax[0].set_ylabel("tokens/s (median step)")
    ax[0].set_title(f"speed-up {res['speedup']:.2f}x ({dev.type})")
    ax[1].plot([h["loss"] for h in hist], label="guide"); ax[1].plot(timing.losses, label="Trainer")
    ax[1].set_xlabel("step"); ax[1].set_ylabel("train loss"); ax[1].legend(); ax[1].set_title("same data, same init")
    plt.tight_layout(); fig.savefig(out / "train_vs_trainer.png", dpi=100)
    print(json.dumps({k: res[k] for k in ("speedup", "end_to_end_speedup")} | {"guide": res["guide"], "trainer": res["trainer"]}, indent=1))
    return res


if __name__ == "__main__":
    main()
