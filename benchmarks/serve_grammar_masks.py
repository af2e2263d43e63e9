"""What a grammar's token masks cost at a real vocabulary size: `TokenTrie.allowed` (a walk over the tokens' prefix
tree, or past the characters a string state loops on; what `JsonConstraint` uses) against feeding every token's
text from the state (the plain way), one run.

A mask is computed once per new grammar state (once per `mask_key`) and then cached, so its cost is what a request
with a new schema (or the first request after start-up) adds to the engine step it is in, for every row of that step. The tiny model's
2,048 tokens hide it; a production vocabulary has 32,000 to 128,000. This script trains a byte-level BPE tokenizer
on the offline corpus (`tokenizers`, about 62,000 tokens: as many merges as the corpus gives, up to `--vocab`), and
on it and on the tiny tokenizer walks two grammars with uniformly drawn allowed tokens (a Pydantic model with ranges,
a pattern, a set of literals and one of strings, a date and a nested list; a call to one of 64 tools) and reads a nested document in JSON mode.
Each state on the way with a mask key not met before (the masks `JsonConstraint` would compute) is masked both
ways, in order, each way with its own grammar (so both see the same memory of steps taken); the masks must be equal. Reported per vocabulary and grammar: the milliseconds of all the walk's masks, the median and
the costliest mask, both ways.

    python benchmarks/serve_grammar_masks.py [--vocab 128000] [--smoke]
"""
from __future__ import annotations

import argparse, datetime, gc, json, random, statistics, sys, time
from pathlib import Path
from typing import Annotated, Literal

HERE = Path(__file__).resolve().parent


def bpe_tokenizer(vocab_size: int):
    "A byte-level BPE tokenizer trained on the offline code and prose corpora (as many merges as they give, up to `vocab_size`)."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from guide.data import code_corpus, prose_corpus
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(code_corpus("train") + prose_corpus("train"), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|eos|>")


def grammars():
    """(name, a maker of a fresh grammar, the text to read or None to walk): a Pydantic model and a 64-tool call are
    walked; JSON mode (whose uniform walks mostly close the object at once) reads a nested document."""
    from pydantic import BaseModel, Field
    from guide.serve.structured import JsonObjectGrammar, SchemaGrammar
    from guide.serve.server import Tool, tool_call_schema

    class Line(BaseModel):
        sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{2}$")
        qty: int = Field(ge=1, le=99)

    class Order(BaseModel):
        id: int = Field(ge=1, le=9999)
        status: Literal["new", "paid", "shipped"]
        gift: bool
        note: str | None = Field(max_length=8)
        tags: set[Literal["fragile", "express", "bulk"]]
        labels: set[Annotated[str, Field(max_length=4)]] = Field(max_length=3)
        day: datetime.date
        lines: list[Line] = Field(min_length=1, max_length=3)

    tools = [Tool.model_validate({"type": "function", "function": {"name": f"get_{i}_report", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 14}, "unit": {"enum": ["c", "f"]}}}}})
             for i in range(64)]
    document = {"user": {"name": "Ada Lovelace", "langs": ["en", "fr", "it"], "age": 36, "score": 0.97, "active": True,
                         "note": "Wrote the first program, for the Analytical Engine (1843)."},
                "items": [{"id": i, "title": f"Item number {i}", "price": 9.5 * i, "tags": ["new", "sale"][: i % 3]} for i in range(1, 5)]}
    return [("pydantic_order", lambda: SchemaGrammar(Order.model_json_schema()), None),
            ("tool_call_64", lambda: SchemaGrammar(tool_call_schema(tools)), None),
            ("json_mode", JsonObjectGrammar, json.dumps(document, separators=(",", ":")))]


def text_states(grammar, tok, jc, text: str) -> list:
    "The states at the token boundaries of `text`, as `tok` splits it."
    state, states = grammar.start, []
    for token in tok.encode(text):
        states.append(state)
        state = grammar.feed(state, jc.pieces[token])
        if state is None: raise SystemExit(f"the grammar refused {jc.pieces[token]!r} in {text!r}")
    return states


def walk_states(grammar, jc, rng, max_tokens: int) -> list:
    "The states of a walk that draws each token uniformly among those `grammar` allows, until it is done."
    state, states = grammar.start, []
    while not grammar.done(state) and len(states) < max_tokens:
        states.append(state)
        token = rng.choice(jc.trie.allowed(grammar, state).nonzero().flatten().tolist())
        state = grammar.feed(state, jc.pieces[token])
    return states


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128_000, help="the most tokens the BPE tokenizer may have (the corpus gives about 62,000)")
    ap.add_argument("--tokens", type=int, default=200, help="the longest walk, in tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true"); ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    if a.vocab < 300 or a.tokens < 1: ap.error("--vocab must be >= 300 (the byte alphabet and the special token) and --tokens >= 1")
    from guide.core import atomic_write, environment_info, setup_torch
    from guide.pretrained import tiny_base
    from guide.serve.structured import JsonConstraint
    setup_torch()
    if a.smoke: a.vocab, a.tokens = 2_000, 40
    model, tiny = tiny_base("tiny")
    t0 = time.perf_counter(); big = bpe_tokenizer(a.vocab); train_s = time.perf_counter() - t0
    vocabularies = [("tiny", tiny, model.config.vocab_size), ("bpe", big, len(big))]
    rows = []
    for vocab_name, tok, V in vocabularies:
        t0 = time.perf_counter(); jc = JsonConstraint(tok, V); build_s = time.perf_counter() - t0
        pieces, trie = jc.pieces, jc.trie
        for name, make, text in grammars():
            grammar = make()
            along = (walk_states(grammar, jc, random.Random(a.seed), a.tokens) if text is None else text_states(grammar, tok, jc, text))
            keys, states = set(), []
            for state in along:                          # the states whose masks a JsonConstraint would compute
                if (key := grammar.mask_key(state, jc.horizon)) not in keys: keys.add(key); states.append(state)
            plain, walk = make(), make()
            seconds = {"plain": [], "trie": []}
            gc.collect(); gc.disable()                   # (a collection inside one mask would be timed as that mask's)
            for state in states:
                t0 = time.perf_counter(); want = [t for t, p in enumerate(pieces) if p and plain.feed(state, p) is not None]; t1 = time.perf_counter()
                got = trie.allowed(walk, state); t2 = time.perf_counter()
                if got.nonzero().flatten().tolist() != want: raise SystemExit(f"{vocab_name} {name}: the masks differ at {state!r}")
                seconds["plain"].append(t1 - t0); seconds["trie"].append(t2 - t1)
            gc.enable()
            row = dict(vocabulary=vocab_name, vocab_size=V, trie_nodes=len(trie.chars), text_chars=sum(map(len, pieces)),
                       constraint_build_s=build_s, grammar=name, tokens_read=len(along), masks=len(states))
            for way, s in seconds.items():
                row[way] = dict(total_ms=sum(s) * 1e3, median_ms=statistics.median(s) * 1e3, worst_ms=max(s) * 1e3)
            row["speedup"] = row["plain"]["total_ms"] / row["trie"]["total_ms"]
            rows.append(row)
            print(f"{vocab_name:4s} {V:6d} tokens, {name:14s} {len(along):3d} tokens, {len(states):3d} masks: plain {row['plain']['total_ms']:8.1f} ms "
                  f"(worst {row['plain']['worst_ms']:6.1f}), trie {row['trie']['total_ms']:7.1f} ms (worst {row['trie']['worst_ms']:6.1f}): {row['speedup']:.1f}x")
    res = dict(benchmark="serve_grammar_masks", env=environment_info(), bpe_train_s=train_s, seed=a.seed, rows=rows)
    name = "serve_grammar_masks_smoke" if a.smoke else "serve_grammar_masks"
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (vocab_name, _, V) in zip(axes, vocabularies):
        mine = [r for r in rows if r["vocabulary"] == vocab_name]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r["plain"]["total_ms"] for r in mine], 0.4, label="every token's text")
        ax.bar([x + 0.2 for x in xs], [r["trie"]["total_ms"] for r in mine], 0.4, label="TokenTrie.allowed")
        ax.set_xticks(list(xs), [f"{r['grammar']}\n{r['masks']} masks" for r in mine]); ax.set_yscale("log")
        ax.set_ylabel("ms, all masks of one walk"); ax.set_title(f"{vocab_name}: {V:,} tokens"); ax.legend()
    fig.suptitle("The masks one request computes from cold: every token's text vs the trie"); fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
