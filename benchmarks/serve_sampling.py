"""Sampling on the device with top-k: `sample_rows` taking the top `k_max` logits (`top_k_bound`, what the engine
does when every sampled row has a top-k) vs sorting the whole vocabulary (the baseline, what it did before), one run.

For each (rows, vocabulary) shape: random logits, every row with temperature 0.8, top-k `--top-k` and top-p 0.95,
its own seed. Timed per call (best of `--repeats`): the sort, the top-k_max path, and for scale the draw with no
filter at all (noise over the whole vocabulary, no sort). Both filtered ways must give the same tokens.

    python benchmarks/serve_sampling.py [--device cuda] [--smoke]
"""
from __future__ import annotations

import argparse, json, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = [(1, 32_000), (8, 32_000), (32, 32_000), (1, 128_256), (8, 128_256), (32, 128_256)]


def best_ms(call, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync(); t0 = time.perf_counter(); call(); sync(); times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu"); ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5); ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true"); ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="serve_sampling", help="file name of the results (.json, .png)")
    a = ap.parse_args(argv)
    if a.top_k < 1 or a.repeats < 1 or a.threads < 1: ap.error("--top-k, --repeats and --threads must be >= 1")
    import torch
    from guide.core import atomic_write, environment_info
    from guide.serve.decode import sample_rows, sampling_tensors, top_k_bound
    torch.set_num_threads(a.threads)
    shapes, dev = ([(2, 1000), (4, 4000)] if a.smoke else SHAPES), torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen, rows_out = torch.Generator().manual_seed(0), []
    for B, V in shapes:
        logits = (torch.randn(B, V, generator=gen) * 3).to(dev)
        settings = [(0.8, a.top_k, 0.95, i) for i in range(B)]
        filtered, plain = sampling_tensors(settings, dev), sampling_tensors([(0.8, 0, 1.0, i) for i in range(B)], dev)
        k_max, where = top_k_bound(settings), torch.arange(B, device=dev) + 100
        if not torch.equal(sample_rows(logits, *filtered, where), sample_rows(logits, *filtered, where, k_max)):
            raise SystemExit(f"{B} x {V}: the top-k path drew other tokens than the sort")
        row = dict(rows=B, vocab=V, sort_ms=best_ms(lambda: sample_rows(logits, *filtered, where), a.repeats, sync),
                   top_k_ms=best_ms(lambda: sample_rows(logits, *filtered, where, k_max), a.repeats, sync),
                   no_filter_ms=best_ms(lambda: sample_rows(logits, *plain, where), a.repeats, sync))
        row["speedup"] = row["sort_ms"] / row["top_k_ms"]
        rows_out.append(row)
        print(f"{B:3d} rows x {V:7,d}: sort {row['sort_ms']:8.2f} ms, top {a.top_k} {row['top_k_ms']:7.2f} ms ({row['speedup']:.1f}x); "
              f"no filter {row['no_filter_ms']:7.2f} ms")
    res = dict(benchmark="serve_sampling", env=environment_info(), device=a.device, threads=a.threads, top_k=a.top_k, rows=rows_out)
    name = a.name + "_smoke" if a.smoke else a.name
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.6))
    labels, x = [f"{r['rows']} x {r['vocab']:,}" for r in rows_out], range(len(rows_out))
    for i, (key, label) in enumerate((("sort_ms", "sort the vocabulary"), ("top_k_ms", f"top k_max (k={a.top_k})"), ("no_filter_ms", "no filter"))):
        ax.bar([j + (i - 1) * 0.27 for j in x], [r[key] for r in rows_out], 0.27, label=label)
    ax.set_xticks(list(x), labels); ax.set_yscale("log"); ax.set_ylabel("ms per sample_rows call"); ax.set_xlabel("rows x vocabulary")
    ax.legend(); ax.set_title(f"Top-k sampling on {a.device} ({a.threads} threads): top-k_max vs a full sort, same tokens")
    fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
