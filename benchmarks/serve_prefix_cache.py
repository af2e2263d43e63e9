"""The prefix cache (guide.serve.engine, `Engine(prefix_caching=True)`, the default) vs the same engine without it,
on chat-like traffic whose prompts share their beginnings.

The trace: `--requests` conversations that share one system prompt of `--system-tokens` tokens, each with its own
question (8..40 tokens), answered with `--max-tokens` tokens (greedy); then a second turn of every conversation (the
first turn's prompt and answer, and a new question). All requests of a turn arrive at once (an offline burst), the
second turn after the first has finished. Both engines serve the same trace, same model, same machine, one process,
fresh engines each repeat; they alternate `--repeats` times and the best run of each is reported (all runs are in
the JSON). Reported: prompt tokens computed, wall time, tokens/s, and time to first token p50/p95 per turn. Both
must produce the same tokens (checked).

    python benchmarks/serve_prefix_cache.py                  # tiny tier, CPU
    python benchmarks/serve_prefix_cache.py --smoke          # seconds
    python benchmarks/serve_prefix_cache.py --tier gpu --device cuda --requests 256 --system-tokens 1024
"""
from __future__ import annotations

import argparse, json, random, sys, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def pct(a, q): return float(np.percentile(a, q)) if len(a) else float("nan")


def make_conversations(n, system_tokens, vocab_size, seed):
    "A shared system prompt, and per conversation a question and a follow-up (random token ids: the speed does not depend on them)."
    rng = random.Random(seed)
    words = lambda k: [rng.randrange(3, vocab_size) for _ in range(k)]
    system = words(system_tokens)
    return system, [(words(rng.randint(8, 40)), words(rng.randint(8, 40))) for _ in range(n)]


def serve_turn(eng, prompts, max_tokens):
    "All prompts at once; per request the time to its first token, and every token."
    from guide.serve.engine import SamplingParams
    t0 = time.perf_counter()
    reqs = [eng.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in prompts]
    first, tokens = {}, {r.id: [] for r in reqs}
    while eng.has_unfinished():
        outs = eng.step(); now = time.perf_counter()
        for o in outs:
            if o.token_ids and o.request_id not in first: first[o.request_id] = now - t0
            tokens[o.request_id] += o.token_ids
    return time.perf_counter() - t0, [first[r.id] for r in reqs], [tokens[r.id] for r in reqs]


def run(model, system, convos, max_tokens, batch, caching):
    from guide.serve.engine import Engine
    longest = len(system) + 2 * max(len(q) + len(f) for q, f in convos) + 2 * max_tokens
    eng = Engine(model, None, block_size=16, max_batch_size=batch, prefix_caching=caching,
                 num_blocks=max(batch * (longest // 16 + 1), len(convos) * (longest // 16 + 1)))   # room to keep every conversation
    turn1 = [system + q for q, _ in convos]
    s1, ttft1, out1 = serve_turn(eng, turn1, max_tokens)
    turn2 = [p + o + f for p, o, (_, f) in zip(turn1, out1, convos)]
    s2, ttft2, out2 = serve_turn(eng, turn2, max_tokens)
    n_prompt = sum(map(len, turn1 + turn2))
    return dict(prefix_caching=caching, seconds=s1 + s2, prompt_tokens=n_prompt, prompt_tokens_computed=eng.stats["prefill_tokens"],
                prompt_tokens_cached=eng.stats["cached_tokens"], tokens_per_s=2 * len(convos) * max_tokens / (s1 + s2),
                turn1=dict(seconds=s1, ttft_p50=pct(ttft1, 50), ttft_p95=pct(ttft1, 95)),
                turn2=dict(seconds=s2, ttft_p50=pct(ttft2, 50), ttft_p95=pct(ttft2, 95))), out1 + out2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="tiny"); ap.add_argument("--device", default="cpu"); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=64, help="conversations (each has two turns)")
    ap.add_argument("--system-tokens", type=int, default=320, help="length of the shared system prompt")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    ap.add_argument("--batch", type=int, default=16, help="the engine's max_batch_size")
    ap.add_argument("--repeats", type=int, default=3, help="alternate the two engines this many times; report the best of each")
    ap.add_argument("--smoke", action="store_true"); ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    if min(a.requests, a.system_tokens, a.max_tokens, a.batch, a.repeats) < 1: ap.error("all counts must be >= 1")
    from guide.core import atomic_write, environment_info, setup_torch
    from guide.pretrained import tiny_base
    setup_torch()
    model, _ = tiny_base(a.tier, a.seed, device=a.device)
    n, system_tokens = (8, 64) if a.smoke else (a.requests, a.system_tokens)
    if system_tokens + 2 * (80 + a.max_tokens) > model.config.max_seq_len:
        ap.error(f"--system-tokens {system_tokens}: two turns would not fit the context of {model.config.max_seq_len}")
    system, convos = make_conversations(n, system_tokens, model.config.vocab_size, a.seed)
    run(model, system, convos[:2], a.max_tokens, a.batch, True)                                   # warm up
    runs = {True: [], False: []}
    for _ in range(1 if a.smoke else a.repeats):
        for caching in (False, True):
            res, tokens = run(model, system, convos, a.max_tokens, a.batch, caching)
            runs[caching].append(res); runs[caching][-1]["_tokens"] = tokens
    if runs[True][0]["_tokens"] != runs[False][0]["_tokens"]: raise SystemExit("the engines disagree: the prefix cache changed the tokens")
    for r in runs[True] + runs[False]: r.pop("_tokens")
    on, off = (min(runs[c], key=lambda r: r["seconds"]) for c in (True, False))
    res = dict(benchmark="serve_prefix_cache", env=environment_info(), tier=a.tier, device=a.device, conversations=n,
               system_tokens=system_tokens, max_tokens=a.max_tokens, batch=a.batch, same_tokens=True,
               runs=dict(prefix_cache=runs[True], no_prefix_cache=runs[False]), prefix_cache=on, no_prefix_cache=off,
               prompt_tokens_computed_fraction=on["prompt_tokens_computed"] / off["prompt_tokens_computed"],
               speedup=off["seconds"] / on["seconds"], ttft_p50_ratio=off["turn2"]["ttft_p50"] / on["turn2"]["ttft_p50"])
    name = "serve_prefix_cache_smoke" if a.smoke else "serve_prefix_cache"
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    labels = ["no prefix cache", "prefix cache"]
    ax[0].bar(labels, [off["prompt_tokens_computed"], on["prompt_tokens_computed"]]); ax[0].set_ylabel("prompt tokens computed")
    ax[1].bar(labels, [off["seconds"], on["seconds"]]); ax[1].set_ylabel("seconds, both turns")
    x = np.arange(2)
    for i, turn in enumerate(("turn1", "turn2")):
        ax[2].bar(x + 0.4 * i, [off[turn]["ttft_p50"] * 1e3, on[turn]["ttft_p50"] * 1e3], 0.4, label=f"{turn} p50")
    ax[2].set_xticks(x + 0.2, labels); ax[2].set_ylabel("time to first token (ms)"); ax[2].legend(fontsize=7)
    fig.suptitle(f"{n} conversations x 2 turns, {system_tokens}-token system prompt, {a.device}: "
                 f"{res['prompt_tokens_computed_fraction']:.0%} of the prompt tokens computed, {res['speedup']:.2f}x faster")
    fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=100)
    print(json.dumps({k: res[k] for k in ("prompt_tokens_computed_fraction", "speedup", "ttft_p50_ratio", "prefix_cache", "no_prefix_cache")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
