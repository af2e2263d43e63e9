"""Chunked prefill (guide.serve.engine, `Engine(max_prefill_tokens=...)`) vs computing each prompt in one step.

`--decoders` requests decode long answers while `--long-prompts` long prompts (`--prompt-tokens` each) arrive one
every `--every` engine steps. Without chunks, the step that takes a long prompt makes every decoding request wait
for the whole prompt; with a budget of `--chunk` tokens a step, the prompt is computed over several steps and the
decoding requests get a token every step meanwhile. Reported for each: the decoding requests' inter-token latency
(p50, p99, max), the long prompts' time to first token, and the wall time; both must give the same tokens (checked).
Same model, same machine, one process; the two alternate `--repeats` times, the best run of each is reported.

    python benchmarks/serve_chunked_prefill.py               # tiny tier, CPU
    python benchmarks/serve_chunked_prefill.py --smoke       # seconds
    python benchmarks/serve_chunked_prefill.py --tier gpu --device cuda --prompt-tokens 1800 --chunk 256
"""
from __future__ import annotations

import argparse, json, random, sys, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def pct(a, q): return float(np.percentile(a, q)) if len(a) else float("nan")


def run(model, decoders, longs, every, max_tokens, budget):
    "Serve the trace with `max_prefill_tokens=budget`: per-token timestamps of the decoding requests, TTFT of the long prompts."
    from guide.serve.engine import Engine, SamplingParams
    eng = Engine(model, None, block_size=16, max_batch_size=len(decoders) + len(longs), max_prefill_tokens=budget, prefix_caching=False,
                 num_blocks=(len(decoders) + len(longs)) * (model.config.max_seq_len // 16 + 1))
    dec = [eng.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in decoders]
    stamps, arrivals, pending, step = {r.id: [] for r in dec}, {}, list(longs), 0
    t0 = time.perf_counter()
    lng = []
    while eng.has_unfinished() or pending:
        if pending and step % every == 0:
            lng.append(eng.add_request(pending.pop(0), SamplingParams(max_tokens=4, ignore_eos=True))); arrivals[lng[-1].id] = time.perf_counter()
        outs = eng.step(); now = time.perf_counter(); step += 1
        for o in outs:
            if o.request_id in stamps: stamps[o.request_id].append(now)
    itl = [d for v in stamps.values() for d in np.diff(v)]
    ttft = [r.first_token_time - arrivals[r.id] for r in lng]
    return dict(max_prefill_tokens=budget, seconds=time.perf_counter() - t0, itl_p50=pct(itl, 50), itl_p99=pct(itl, 99), itl_max=max(itl),
                long_ttft_p50=pct(ttft, 50), long_ttft_max=max(ttft)), [r.output_ids for r in dec + lng]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="tiny"); ap.add_argument("--device", default="cpu"); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoders", type=int, default=8, help="requests decoding throughout")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens each decoding request produces")
    ap.add_argument("--long-prompts", type=int, default=6); ap.add_argument("--prompt-tokens", type=int, default=448)
    ap.add_argument("--every", type=int, default=12, help="engine steps between two long prompts")
    ap.add_argument("--chunk", type=int, default=64, help="max_prefill_tokens of the chunked engine")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true"); ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    if min(a.decoders, a.max_tokens, a.long_prompts, a.prompt_tokens, a.every, a.chunk, a.repeats) < 1: ap.error("all counts must be >= 1")
    from guide.core import atomic_write, environment_info, setup_torch
    from guide.pretrained import tiny_base
    setup_torch()
    model, _ = tiny_base(a.tier, a.seed, device=a.device)
    if a.smoke: a.decoders, a.max_tokens, a.long_prompts, a.prompt_tokens, a.repeats = 2, 24, 2, 128, 1
    if a.prompt_tokens + 4 > model.config.max_seq_len or a.max_tokens + 24 > model.config.max_seq_len:
        ap.error(f"prompts and answers must fit the context of {model.config.max_seq_len}")
    rng = random.Random(a.seed)
    words = lambda k: [rng.randrange(3, model.config.vocab_size) for _ in range(k)]
    decoders, longs = [words(rng.randint(4, 24)) for _ in range(a.decoders)], [words(a.prompt_tokens) for _ in range(a.long_prompts)]
    whole = model.config.max_seq_len                                       # a budget no prompt exceeds: one step each
    run(model, decoders[:1], longs[:1], a.every, 8, a.chunk)              # warm up
    runs = {whole: [], a.chunk: []}
    tokens = {}
    for _ in range(a.repeats):
        for budget in runs:
            res, tokens[budget] = run(model, decoders, longs, a.every, a.max_tokens, budget)
            runs[budget].append(res)
    if tokens[whole] != tokens[a.chunk]: raise SystemExit("chunked prefill changed the tokens")
    one, chunked = (min(runs[b], key=lambda r: r["itl_max"]) for b in (whole, a.chunk))
    res = dict(benchmark="serve_chunked_prefill", env=environment_info(), tier=a.tier, device=a.device, decoders=a.decoders,
               long_prompts=a.long_prompts, prompt_tokens=a.prompt_tokens, every=a.every, chunk=a.chunk, same_tokens=True,
               runs=dict(one_step=runs[whole], chunked=runs[a.chunk]), one_step=one, chunked=chunked,
               itl_max_ratio=one["itl_max"] / chunked["itl_max"], itl_p99_ratio=one["itl_p99"] / chunked["itl_p99"])
    name = "serve_chunked_prefill_smoke" if a.smoke else "serve_chunked_prefill"
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
    labels = ["whole prompt\nin one step", f"chunks of {a.chunk}"]
    x = np.arange(2)
    for i, k in enumerate(("itl_p50", "itl_p99", "itl_max")):
        ax[0].bar(x + 0.27 * i, [one[k] * 1e3, chunked[k] * 1e3], 0.27, label=k.replace("itl_", ""))
    ax[0].set_xticks(x + 0.27, labels); ax[0].set_ylabel("decoding requests' inter-token latency (ms)"); ax[0].legend(fontsize=7)
    ax[1].bar(labels, [one["long_ttft_p50"] * 1e3, chunked["long_ttft_p50"] * 1e3]); ax[1].set_ylabel("long prompts' TTFT p50 (ms)")
    fig.suptitle(f"{a.decoders} decoding while {a.long_prompts} prompts of {a.prompt_tokens} tokens arrive, {a.device}: "
                 f"worst inter-token gap {res['itl_max_ratio']:.1f}x shorter in chunks")
    fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=100)
    print(json.dumps({k: res[k] for k in ("itl_max_ratio", "itl_p99_ratio", "one_step", "chunked")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
