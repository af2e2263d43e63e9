"""What JSON mode costs (guide.serve.engine, `SamplingParams(json_mode=True)`): the same sampled requests with and
without it, same model, same machine, one process.

`--requests` prompts, at most `--max-tokens` sampled tokens each (temperature 0.8, one seed per request), all at once
on an engine of batch `--batch`. Three settings: JSON mode on a fresh engine ("cold": the tokens' texts are read and
each automaton state's mask is computed as it first comes up); JSON mode again on the same engine ("warm": the masks
are cached, the answers the same); plain decoding of exactly as many tokens per request as JSON mode gave it (an
answer in JSON mode ends when its object closes), so that both runs have the same batch at every step. Reported per
setting: tokens/s (best of `--repeats`), forward passes, and how many answers parse as one JSON object; for JSON
mode, the automaton states met. Then a JSON schema (`SCHEMA`, 5 properties), warm, with jump-forward decoding (the
grammar's forced tokens fed in one pass; the default) and without (one pass per token): the same tokens, fewer passes. JSON rows take their logits to the host
each step (no multi-step bursts or drafts), so `--decode-steps` > 1 shows that cost too.

    python benchmarks/serve_json_mode.py                     # tiny tier, CPU
    python benchmarks/serve_json_mode.py --smoke             # seconds
    python benchmarks/serve_json_mode.py --batch 1 --requests 8 --name serve_json_mode_batch1   # one at a time
"""
from __future__ import annotations

import argparse, json, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "x": {"type": "integer"}, "y": {"type": "number"},
                                           "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}}, "visible": {"type": "boolean"}}}
PROMPTS = ['{"name": "add", "args": ', "A user record as JSON: ", "# config\nsettings = ", 'Return the point as an object: {"x"',
           "def to_json(self):\n    return ", "The answer, as JSON: ", "[1, 2, 3] and ", "config.json:\n"]


def parses(text: str) -> bool:
    try: return isinstance(json.loads(text), dict)
    except json.JSONDecodeError: return False


def run(eng, prompts, max_tokens: list[int], json_mode: bool, schema: dict | None = None):
    from guide.serve.engine import SamplingParams
    params = [SamplingParams(max_tokens=n, temperature=0.8, seed=i, json_mode=json_mode, json_schema=schema,
                             ignore_eos=not (json_mode or schema)) for i, n in enumerate(max_tokens)]
    steps = eng.stats["steps"]
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    seconds = time.perf_counter() - t0
    produced = sum(len(o["token_ids"]) for o in outs)
    return [o["token_ids"] for o in outs], dict(seconds=seconds, tokens=produced, tokens_per_s=produced / seconds, passes=eng.stats["steps"] - steps,
                parse_fraction=sum(parses(o["text"]) for o in outs) / len(outs),
                closed_fraction=sum(o["finish_reason"] == "stop" for o in outs) / len(outs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="tiny"); ap.add_argument("--device", default="cpu"); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=32); ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16); ap.add_argument("--decode-steps", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true"); ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="serve_json_mode", help="file name of the results (.json, .png)")
    a = ap.parse_args(argv)
    if min(a.requests, a.max_tokens, a.batch, a.decode_steps, a.repeats) < 1: ap.error("counts must be >= 1")
    from guide.core import atomic_write, environment_info, setup_torch
    from guide.pretrained import tiny_base
    from guide.serve.engine import Engine
    setup_torch()
    model, tok = tiny_base(a.tier, a.seed, device=a.device)
    if a.smoke: a.requests, a.max_tokens, a.repeats = 4, 16, 1
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.requests)]
    engine = lambda: Engine(model, tok, max_batch_size=a.batch, decode_steps=a.decode_steps)
    run(engine(), prompts[:2], [4, 4], False)                                 # warm up
    best = {}
    for _ in range(a.repeats):
        eng = engine()
        answers, cold = run(eng, prompts, [a.max_tokens] * a.requests, True)
        again, warm = run(eng, prompts, [a.max_tokens] * a.requests, True)
        if again != answers: raise SystemExit("JSON mode gave other answers on a warm engine")
        cold["states"] = warm["states"] = len(eng.json._masks)
        _, plain = run(engine(), prompts, list(map(len, answers)), False)
        schema_runs = {}
        for jump in (True, False):
            eng = Engine(model, tok, max_batch_size=a.batch, decode_steps=a.decode_steps, jump_forward=jump)
            run(eng, prompts, [a.max_tokens] * a.requests, False, SCHEMA)                       # the masks, cold
            schema_runs[jump] = run(eng, prompts, [a.max_tokens] * a.requests, False, SCHEMA)
        if schema_runs[True][0] != schema_runs[False][0]: raise SystemExit("jump-forward changed the tokens")
        for name, res in (("schema_jump_forward", schema_runs[True][1]), ("schema_one_pass_per_token", schema_runs[False][1])):
            if name not in best or res["seconds"] < best[name]["seconds"]: best[name] = res
        for name, res in (("plain", plain), ("json_cold", cold), ("json_warm", warm)):
            if name not in best or res["seconds"] < best[name]["seconds"]: best[name] = res
    for name, res in best.items(): print(name, json.dumps(res))
    res = dict(benchmark="serve_json_mode", env=environment_info(), tier=a.tier, device=a.device, requests=a.requests,
               max_tokens=a.max_tokens, batch=a.batch, decode_steps=a.decode_steps, results=best,
               json_warm_vs_plain=best["json_warm"]["tokens_per_s"] / best["plain"]["tokens_per_s"],
               json_cold_vs_plain=best["json_cold"]["tokens_per_s"] / best["plain"]["tokens_per_s"],
               jump_forward_speedup=best["schema_jump_forward"]["tokens_per_s"] / best["schema_one_pass_per_token"]["tokens_per_s"])
    print(f"tokens/s vs plain: JSON mode warm {res['json_warm_vs_plain']:.2f}x, cold {res['json_cold_vs_plain']:.2f}x; answers that parse: "
          f"{best['plain']['parse_fraction']:.0%} plain, {best['json_warm']['parse_fraction']:.0%} JSON mode; schema: jump-forward "
          f"{res['jump_forward_speedup']:.2f}x tokens/s, {best['schema_one_pass_per_token']['passes']} -> {best['schema_jump_forward']['passes']} passes")
    name = a.name + "_smoke" if a.smoke else a.name
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.4))
    keys = ("plain", "json_cold", "json_warm", "schema_one_pass_per_token", "schema_jump_forward")
    labels = ["plain", "JSON mode\ncold", "JSON mode\nwarm", "schema\none pass/token", "schema\njump-forward"]
    ax[0].bar(labels, [best[k]["tokens_per_s"] for k in keys]); ax[0].set_ylabel("tokens/s")
    ax[1].bar(labels, [best[k]["parse_fraction"] for k in keys]); ax[1].set_ylabel("answers that parse as JSON")
    ax[1].set_ylim(0, 1)
    fig.suptitle(f"JSON mode: {a.requests} sampled answers of <= {a.max_tokens} tokens, batch {a.batch}, {a.device}")
    fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
