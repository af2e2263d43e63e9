"""What a tool list costs a constrained decoder: the token masks of a tool call, with SchemaGrammar's "tag" nodes
(the default) and with one reading per tool (`SchemaGrammar(schema, tags=False)`, the baseline), one run.

A request with `tool_choice="required"` is decoded under `tool_call_schema(tools)`: an anyOf with one object per
tool, each opening `{"name":`. Kept as an anyOf, every mask until the name is written steps one reading per tool;
folded into a tag node it steps one and finds the name by bisection. For each tool count, the call
`{"tool_calls":[{"name":<the middle tool>,"arguments":{...}}]}` is split into the tiny tokenizer's tokens, and the
mask at each token boundary is computed from empty caches (the first request with that tool list pays this; later
ones find the masks cached). Reported per tool count and way: milliseconds to compile the schema, to compute all the
call's masks, and for the costliest mask; the masks of both ways must be equal.

    python benchmarks/serve_tool_masks.py [--tools 1 4 16 64 256] [--smoke]
"""
from __future__ import annotations

import argparse, json, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tools_of(n: int) -> list:
    "`n` tools, each with a few arguments of the usual kinds."
    from guide.serve.server import Tool
    return [Tool.model_validate({"type": "function", "function": {"name": f"get_{i}_report", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 14}, "unit": {"enum": ["c", "f"]}}}}})
            for i in range(n)]


def call_masks(jc, grammar, pieces: list[str]):
    "The masks at each token boundary of `pieces` (`jc` a fresh JsonConstraint: no mask cached), and the seconds each took."
    state, masks, seconds = grammar.start, [], []
    for piece in pieces:
        t0 = time.perf_counter(); masks.append(jc.allowed(grammar, state)); seconds.append(time.perf_counter() - t0)
        state = grammar.feed(state, piece)
        if state is None: raise SystemExit(f"the grammar refused {piece!r}")
    if not grammar.done(state): raise SystemExit("the call did not end the grammar")
    return masks, seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="tiny"); ap.add_argument("--tools", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per setting")
    ap.add_argument("--smoke", action="store_true"); ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    if min(a.tools) < 1 or a.repeats < 1: ap.error("tool counts and --repeats must be >= 1")
    import torch
    from guide.core import atomic_write, environment_info, setup_torch
    from guide.pretrained import tiny_base
    from guide.serve.structured import JsonConstraint, SchemaGrammar
    from guide.serve.server import tool_call_schema
    setup_torch()
    if a.smoke: a.tools, a.repeats = [1, 8], 1
    model, tok = tiny_base(a.tier)
    jc = JsonConstraint(tok, model.config.vocab_size)
    rows = []
    for n in a.tools:
        schema = tool_call_schema(tools_of(n))
        call = json.dumps({"tool_calls": [{"name": f"get_{n // 2}_report", "arguments": {"city": "Oslo", "days": 3, "unit": "c"}}]}, separators=(",", ":"))
        pieces = [jc.pieces[t] for t in tok.encode(call)]
        if "".join(pieces) != call: raise SystemExit("the tokens' texts do not spell the call")
        row, masks = dict(tools=n, tokens=len(pieces)), {}
        for way, tags in (("tag", True), ("per_option", False)):
            best = None
            for _ in range(a.repeats):
                t0 = time.perf_counter(); grammar = SchemaGrammar(schema, tags=tags); compile_s = time.perf_counter() - t0
                masks[way], seconds = call_masks(JsonConstraint(tok, model.config.vocab_size), grammar, pieces)
                if best is None or sum(seconds) < best["masks_ms"] / 1e3:
                    best = dict(compile_ms=compile_s * 1e3, masks_ms=sum(seconds) * 1e3, worst_mask_ms=max(seconds) * 1e3,
                                most_readings=max(len(grammar.feed(grammar.start, call[:i])) for i in range(len(call))))
            row[way] = best
        if not all(torch.equal(x, y) for x, y in zip(masks["tag"], masks["per_option"])): raise SystemExit(f"{n} tools: the masks differ")
        row["masks_speedup"] = row["per_option"]["masks_ms"] / row["tag"]["masks_ms"]
        rows.append(row)
        print(f"{n:4d} tools: masks of one call {row['per_option']['masks_ms']:8.1f} ms one reading per tool, {row['tag']['masks_ms']:6.1f} ms "
              f"with a tag node ({row['masks_speedup']:.1f}x); readings at most {row['per_option']['most_readings']} vs {row['tag']['most_readings']}")
    res = dict(benchmark="serve_tool_masks", env=environment_info(), tier=a.tier, vocab_size=jc.vocab_size, rows=rows)
    name = "serve_tool_masks_smoke" if a.smoke else "serve_tool_masks"
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    counts = [r["tools"] for r in rows]
    for way, label in (("per_option", "one reading per tool (anyOf)"), ("tag", "tag node")):
        ax[0].plot(counts, [r[way]["masks_ms"] for r in rows], "o-", label=label)
        ax[1].plot(counts, [r[way]["worst_mask_ms"] for r in rows], "o-", label=label)
    for axis, title in zip(ax, ("all masks of one call, cold (ms)", "the costliest mask (ms)")):
        axis.set_xscale("log", base=2); axis.set_yscale("log"); axis.set_xlabel("tools"); axis.set_title(title); axis.legend()
    fig.suptitle(f"Tool-call masks over a {jc.vocab_size}-token vocabulary, {rows[0]['tokens']}-token call")
    fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
