"""Dynamic batching (guide.serve.batcher) vs one-at-a-time for the encoder of notebook 24, same requests, one run.

A closed-loop load: `--concurrency` asyncio clients each send a request and wait for the answer, `--requests` in
all (bounded in count and time). Both sides run the same model function (`encoder_fn`: the packed forward, so a
single text pays for no padding and no mask) on one model thread with one torch thread: one-at-a-time sends each
request to that thread alone (`run_in_executor`), dynamic batching goes through `DynamicBatcher`. The two
alternate `--repeats` times and the best run of each is reported (the machine may be shared; all runs are in
the JSON). Reported: requests/s, CPU-ms per request, p50/p95 latency, the throughput ratio (target >= 3x) and
whether p95 is equal or lower, and the model alone (no serving): CPU-ms per text one at a time vs in a batch,
the part of the gain that batching the model itself can give on this machine.

    python benchmarks/serve_batcher.py
    python benchmarks/serve_batcher.py --smoke
    python benchmarks/serve_batcher.py --tier gpu --device cuda --requests 20000 --name serve_batcher_gpu   # MiniLM-sized, CUDA graphs
"""
from __future__ import annotations

import argparse, json, os, sys, time
from pathlib import Path


HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="tiny"); ap.add_argument("--device", default="cpu"); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=2000); ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=32); ap.add_argument("--max-queue-delay", type=float, default=0.004)
    ap.add_argument("--time-limit", type=float, default=120); ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="alternate the two sides this many times; report the best of each")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="serve_batcher", help="results file name: OUT/NAME.json and OUT/NAME.png")
    a = ap.parse_args(argv)
    from guide.core import atomic_write, environment_info, setup_torch
    from guide.serve.batcher import DynamicBatcher, closed_loop, closed_loop_async, encode_texts, encoder_fn, snippets, tiny_encoder
    setup_torch()
    enc, tok, summary = tiny_encoder(a.tier, a.seed, device=a.device)
    fn = encoder_fn(enc, tok.pad_token_id, max_batch_size=a.max_batch_size)
    n = 200 if a.smoke else a.requests
    texts = snippets("test", 400, seed=a.seed + 1)
    ids = encode_texts(tok, [t for t, _ in texts])
    load = [ids[i % len(ids)] for i in range(n)]
    import asyncio, concurrent.futures
    one_worker = concurrent.futures.ThreadPoolExecutor(1)          # one-at-a-time: a single model thread, no batching
    async def single(x): return await asyncio.get_running_loop().run_in_executor(one_worker, lambda: fn([x], len(x))[0])
    fn([load[0]], len(load[0])); fn(load[:a.max_batch_size], 128)        # warm up both shapes
    # the model alone, no serving: CPU-ms per text run one at a time vs in batches of max_batch_size. When the model
    # is compute-bound per token (this CPU, this encoder) this ratio, plus the per-request overhead that batching
    # also removes, bounds what dynamic batching can gain.
    def cpu_ms(calls):
        c0 = time.process_time()
        for f in calls: f()
        return (time.process_time() - c0) * 1000
    k = 64 if a.smoke else 512
    alone_ms = cpu_ms([lambda x=x: fn([x], len(x)) for x in load[:k]]) / k
    batched_ms = cpu_ms([lambda i=i: fn(load[i:i + a.max_batch_size], 128) for i in range(0, k, a.max_batch_size)]) / k
    gpu_texts_per_s = {}
    if a.device.startswith("cuda"):     # the GPU's side alone: texts/s of the graphed encoder in batches of 128, per dtype
        import numpy as np, torch
        from guide.serve.batcher import GraphedEncoder
        lens = np.array([len(x) for x in load]); flat = np.concatenate([np.array(x) for x in load])
        for dt in (torch.float32, torch.bfloat16):
            g = GraphedEncoder(enc, tok.pad_token_id, max_batch_size=128, dtype=dt)
            g.run(lens[:128], flat[:lens[:128].sum()]); t = time.perf_counter()
            g.run(lens, flat)                                          # runs them 128 at a time
            gpu_texts_per_s[str(dt).split(".")[1]] = n / (time.perf_counter() - t)
            del g
        print("graphed encoder alone, texts/s:", gpu_texts_per_s, flush=True)
    rows, singles, dyns = {}, [], []
    load_avg = os.getloadavg()[0]
    for _ in range(1 if a.smoke else a.repeats):
        singles.append(closed_loop_async(single, load, a.concurrency, a.time_limit))
        with DynamicBatcher(fn, a.max_batch_size, a.max_queue_delay) as b:
            dyns.append(closed_loop_async(lambda x: b.asubmit(x, timeout=60), load, a.concurrency, a.time_limit))
            dyns[-1]["batcher_stats"] = dict(b.stats)
    r_single, r_dyn = max(singles, key=lambda r: r["rps"]), max(dyns, key=lambda r: r["rps"])
    rows["batcher_stats"] = r_dyn["batcher_stats"]
    # the same with one OS thread per client (what notebook 24 does): the GIL convoy shows
    with DynamicBatcher(fn, a.max_batch_size, a.max_queue_delay) as b:
        r_dyn_threads = closed_loop(lambda x: b.submit(x).result(60), load, a.concurrency, a.time_limit)
    res = dict(benchmark="serve_batcher", env=environment_info(), tier=a.tier, device=a.device, requests=n, concurrency=a.concurrency,
               load_avg_1min=load_avg, runs=dict(single=singles, dynamic=dyns),
               max_batch_size=a.max_batch_size, max_queue_delay=a.max_queue_delay, single=r_single, dynamic=r_dyn,
               dynamic_thread_clients=r_dyn_threads, clients="asyncio (one event loop)",
               throughput_ratio=r_dyn["rps"] / r_single["rps"],
               cpu_per_request_ratio=r_single["cpu_ms_per_request"] / r_dyn["cpu_ms_per_request"], p95_ratio=r_dyn["p95_ms"] / r_single["p95_ms"],
               model_only=dict(cpu_ms_per_text_alone=alone_ms, cpu_ms_per_text_batched=batched_ms, ratio=alone_ms / batched_ms,
                               gpu_texts_per_s_batch128=gpu_texts_per_s),
               target_ratio=3.0, mean_batch=rows["batcher_stats"]["items"] / max(1, rows["batcher_stats"]["batches"]))
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    name = a.name + "_smoke" if a.smoke else a.name
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].bar(["one at a time", "dynamic"], [r_single["rps"], r_dyn["rps"]]); ax[0].set_ylabel("requests / s")
    ax[1].bar(["one at a time", "dynamic"], [r_single["p50_ms"], r_dyn["p50_ms"]], label="p50")
    ax[1].bar(["one at a time", "dynamic"], [r_single["p95_ms"] - r_single["p50_ms"], r_dyn["p95_ms"] - r_dyn["p50_ms"]],
              bottom=[r_single["p50_ms"], r_dyn["p50_ms"]], alpha=.5, label="p95"); ax[1].set_ylabel("latency (ms)"); ax[1].legend()
    fig.suptitle(f"encoder, {a.concurrency} clients: {res['throughput_ratio']:.1f}x throughput"); fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    print(json.dumps({k: res[k] for k in ("load_avg_1min", "model_only", "throughput_ratio", "cpu_per_request_ratio", "p95_ratio", "mean_batch", "single", "dynamic")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
