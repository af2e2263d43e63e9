"""Speculative decoding by prompt lookup (guide.serve.engine, `Engine(speculate=k)`) vs plain decoding, same requests.

Each request continues a piece of held-out code (`--prompt-tokens` tokens of the test split) for `--max-tokens`
greedy tokens. For batch sizes `--batches` and draft lengths `--drafts` (0 = no speculation), measured: tokens/s,
forward passes, tokens per pass and the fraction of drafted tokens kept. One more setting per batch size drafts the
most tokens under the load policy `speculate_max_batch=--speculate-max-batch` (no drafts while more requests decode).
All settings must give the same tokens (checked). Same model, same machine, one process; each setting runs `--repeats` times, the best is reported.

    python benchmarks/serve_speculative.py                   # tiny tier, CPU
    python benchmarks/serve_speculative.py --smoke           # seconds
"""
from __future__ import annotations

import argparse, json, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(model, tok, prompts, batch, k, max_tokens, max_batch=None):
    from guide.serve.engine import Engine, SamplingParams
    eng = Engine(model, tok, max_batch_size=batch, speculate=k, speculate_max_batch=max_batch, prefix_caching=False,
                 num_blocks=batch * ((max(map(len, prompts)) + max_tokens) // 16 + 2))
    t0 = time.perf_counter()
    outs = eng.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    seconds = time.perf_counter() - t0
    produced = sum(len(o["token_ids"]) for o in outs)
    return dict(batch=batch, draft=k, speculate_max_batch=max_batch, seconds=seconds, tokens_per_s=produced / seconds, passes=eng.stats["steps"],
                tokens_per_pass=produced / eng.stats["steps"], drafted=eng.stats["draft_tokens"],
                kept_fraction=eng.stats["draft_accepted"] / max(eng.stats["draft_tokens"], 1)), [o["token_ids"] for o in outs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="tiny"); ap.add_argument("--device", default="cpu"); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=8); ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=128); ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--drafts", type=int, nargs="+", default=[0, 2, 4, 8]); ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speculate-max-batch", type=int, default=2, help="the load policy's bound, for the extra setting")
    ap.add_argument("--smoke", action="store_true"); ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    if min(a.requests, a.prompt_tokens, a.max_tokens, a.repeats, a.speculate_max_batch, *a.batches) < 1 or min(a.drafts) < 0: ap.error("counts must be >= 1 (drafts >= 0)")
    if 0 not in a.drafts: a.drafts = [0] + a.drafts                          # the baseline
    from guide.core import atomic_write, environment_info, setup_torch
    from guide.data import code_corpus
    from guide.pretrained import tiny_base
    setup_torch()
    model, tok = tiny_base(a.tier, a.seed, device=a.device)
    if a.smoke: a.requests, a.max_tokens, a.batches, a.drafts, a.repeats = 2, 24, [1], [0, 4], 1
    if a.prompt_tokens + a.max_tokens > model.config.max_seq_len: ap.error(f"prompt + answer must fit the context of {model.config.max_seq_len}")
    text = "".join(code_corpus("test"))
    step = len(text) // (a.requests + 1)
    prompts = [tok.encode(text[i * step:i * step + 8 * a.prompt_tokens])[-a.prompt_tokens:] for i in range(a.requests)]
    run(model, tok, prompts[:1], 1, max(a.drafts), 8)                        # warm up
    results, reference = [], None
    for batch in a.batches:
        for k, policy in [(k, None) for k in a.drafts] + [(max(a.drafts), a.speculate_max_batch)]:
            best, tokens = None, None
            for _ in range(a.repeats):
                res, tokens = run(model, tok, prompts, batch, k, a.max_tokens, policy)
                best = res if best is None or res["seconds"] < best["seconds"] else best
            if reference is None: reference = tokens
            if tokens != reference: raise SystemExit(f"batch {batch}, draft {k}: speculation changed the tokens")
            if policy is not None: best["label"] = f"draft {k} while <= {policy} decode"
            results.append(best); print(json.dumps(best))
    base = {r["batch"]: r for r in results if r["draft"] == 0}
    plain = [r for r in results if r["speculate_max_batch"] is None]
    for r in results: r["speedup"] = r["tokens_per_s"] / base[r["batch"]]["tokens_per_s"]
    res = dict(benchmark="serve_speculative", env=environment_info(), tier=a.tier, device=a.device, requests=a.requests,
               prompt_tokens=a.prompt_tokens, max_tokens=a.max_tokens, same_tokens=True, results=results,
               best_speedup={b: max(r["speedup"] for r in plain if r["batch"] == b) for b in a.batches},
               policy_speedup={r["batch"]: r["speedup"] for r in results if r["speculate_max_batch"] is not None})
    name = "serve_speculative_smoke" if a.smoke else "serve_speculative"
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
    for b in a.batches:
        rs = [r for r in plain if r["batch"] == b]
        line, = ax[0].plot([r["draft"] for r in rs], [r["speedup"] for r in rs], "o-", label=f"batch {b}")
        pol = next(r for r in results if r["batch"] == b and r["speculate_max_batch"] is not None)
        ax[0].plot([pol["draft"]], [pol["speedup"]], "*", ms=12, color=line.get_color(), label=f"batch {b}, {pol['label']}")
        ax[1].plot([r["draft"] for r in rs], [r["tokens_per_pass"] for r in rs], "o-", label=f"batch {b}")
    ax[0].axhline(1, color="k", lw=0.5); ax[0].set_xlabel("drafted tokens per step"); ax[0].set_ylabel("tokens/s vs no speculation")
    ax[1].set_xlabel("drafted tokens per step"); ax[1].set_ylabel("tokens per forward pass")
    ax[0].legend(); ax[1].legend()
    fig.suptitle(f"prompt-lookup speculation, {a.requests} code continuations of {a.max_tokens} tokens, {a.device}: same tokens")
    fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
