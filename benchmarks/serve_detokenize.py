"""Detokenizing a stream: the engine's `IncrementalDetokenizer` vs decoding every id so far at each token, one run.

Streaming turns each new token into text. Decoding the whole output again costs time that grows with the
output's length, per request, every step; `IncrementalDetokenizer` decodes a window of a few ids. Measured:

- per token, at positions 0 to `--length` of a real reply (code from the test split, tiny tokenizer): the median
  microseconds of each way, and the ids each decodes;
- the engine end to end: `--batch` requests of `--max-tokens` greedy tokens with the tokenizer, tokens/s with each
  detokenizer plugged in (the naive one is what the engine did before), and without a tokenizer (ids only: no
  text at all, the bound).

    python benchmarks/serve_detokenize.py [--smoke]
"""
from __future__ import annotations

import argparse, json, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def median_us(setup, call, repeats=5):
    times = []
    for _ in range(repeats):
        x = setup(); t0 = time.perf_counter(); call(x); times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2] * 1e6


def us_at(make, reply, at):
    "Microseconds for `make(tokenizer)`'s detokenizer to take token `at`, the ids before it already taken."
    def ready():
        d = make()
        for t in reply[:at]: d.add(t)
        return d
    return median_us(ready, lambda d: d.add(reply[at]))


def engine_tokens_per_s(model, tok, detokenizer, prompts, max_tokens):
    "Greedy generation of all prompts at once; `detokenizer`: a class to plug into each request, or None for no text."
    from guide.serve.engine import Engine, SamplingParams
    eng = Engine(model, tok if detokenizer else None, max_batch_size=len(prompts), num_blocks=len(prompts) * 40)
    for p in prompts:
        req = eng.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        if detokenizer: req.detokenizer = detokenizer(tok)
    t0, texts = time.perf_counter(), {}
    while eng.has_unfinished():
        for o in eng.step(): texts[o.request_id] = texts.get(o.request_id, "") + o.text
    return eng.stats["decode_tokens"] / (time.perf_counter() - t0), texts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="tiny"); ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32); ap.add_argument("--max-tokens", type=int, default=480)
    ap.add_argument("--smoke", action="store_true"); ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    from guide.core import atomic_write, environment_info, setup_torch
    from guide.data import code_corpus
    from guide.pretrained import tiny_base
    from guide.serve.engine import IncrementalDetokenizer, NaiveDetokenizer
    setup_torch()
    model, tok = tiny_base(a.tier)
    length, batch, max_tokens = (300, 4, 60) if a.smoke else (a.length, a.batch, a.max_tokens)
    reply = tok.encode("".join(code_corpus("test"))[:length * 8])[:length]
    if len(reply) < length: raise SystemExit(f"the test split gives only {len(reply)} tokens, fewer than --length {length}")
    positions = sorted({0, *range(0, length, max(1, length // 10)), length - 1})
    per_token = {name: [us_at(lambda: make(tok), reply, p) for p in positions]
                 for name, make in (("decode_everything", NaiveDetokenizer), ("incremental", IncrementalDetokenizer))}
    prompts = [reply[i * 7:i * 7 + 8] for i in range(batch)]
    engine, texts = {}, {}
    for name, detok in (("decode_everything", NaiveDetokenizer), ("incremental", IncrementalDetokenizer), ("ids_only", None)):
        engine[name], texts[name] = engine_tokens_per_s(model, tok, detok, prompts, max_tokens)
    same_text = texts["incremental"] == texts["decode_everything"]
    res = dict(benchmark="serve_detokenize", env=environment_info(), tier=a.tier, reply_tokens=length, positions=positions,
               us_per_token=per_token, batch=batch, max_tokens=max_tokens, engine_tokens_per_s=engine, same_text=same_text,
               us_per_token_at_end_ratio=per_token["decode_everything"][-1] / per_token["incremental"][-1],
               engine_speedup=engine["incremental"] / engine["decode_everything"],
               engine_fraction_of_ids_only=engine["incremental"] / engine["ids_only"])
    if not same_text: print("WARNING: the two detokenizers streamed different texts", file=sys.stderr)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    name = "serve_detokenize_smoke" if a.smoke else "serve_detokenize"
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    for k, v in per_token.items(): ax[0].plot(positions, v, "o-", label=k)
    ax[0].set_xlabel("token position in the reply"); ax[0].set_ylabel("µs to detokenize one token"); ax[0].legend()
    ax[1].bar(list(engine), list(engine.values())); ax[1].set_ylabel("tokens / s")
    ax[1].set_title(f"engine, {batch} requests x {max_tokens} tokens, with the tokenizer")
    fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=100)
    print(json.dumps({k: v for k, v in res.items() if k not in ("env", "positions")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
