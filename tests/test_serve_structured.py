"""Notebook 20 (structured output): the JSON automaton, CharRegex and SchemaGrammar against the reference readers
(json, Python's re, jsonschema, Pydantic), and the token masks of JsonConstraint (no notebook needed)."""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from guide.core import setup_torch

setup_torch()


@pytest.fixture(scope="module")
def tok():
    from guide.pretrained import tiny_base
    return tiny_base()[1]


_PATTERN_ALPHABET = "".join(map(chr, range(32, 127))) + "\n\t"


def _patterns():
    "Regular expressions in CharRegex's subset: literals, classes, escapes, groups, alternation, repeats, anchors."
    atom = st.sampled_from(["a", "b", "x", "0", "-", ".", r"\d", r"\w", r"\s", r"\D", r"\S", "[a-c]", "[^a]", r"[\d_]", r"\.", r"\n", '"', r"\\"])
    def combine(inner):
        return st.one_of(st.lists(inner, min_size=2, max_size=3).map("".join),
                         st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
                         st.tuples(inner, st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "*?"])).map(lambda t: "(?:" + t[0] + ")" + t[1]))
    return st.tuples(st.sampled_from(["", "^"]), st.recursive(atom, combine, max_leaves=6), st.sampled_from(["", "$"])).map("".join)


def _short_matches(pattern: str):
    """Strings the pattern matches whole, of at most 12 characters: Python's re, the reference, backtracks; a pattern
    such as (?:a{1,3})+$ on 45 a's and a quote takes it longer than the test's timeout."""
    return st.from_regex(pattern, fullmatch=True, alphabet=_PATTERN_ALPHABET).filter(lambda s: len(s) <= 12)


def _bounded_numbers():
    """A `number` schema with a range (hundredths, each end inclusive, exclusive or open) and a value in it: a float of
    ten-thousandths, which json.dumps writes without an exponent."""
    def make(lo, width, lo_key, hi_key):
        hi = None if width is None else (-5000 if lo is None else lo) + width
        schema = {"type": "number", **({} if lo is None else {lo_key: lo / 100}), **({} if hi is None else {hi_key: hi / 100})}
        first = (lo * 100 + (lo_key == "exclusiveMinimum")) if lo is not None else (hi or 0) * 100 - 10**6
        last = (hi * 100 - (hi_key == "exclusiveMaximum")) if hi is not None else first + 10**6
        return st.tuples(st.just(schema), st.integers(first, last).map(lambda k: k / 10000))
    return st.tuples(st.one_of(st.none(), st.integers(-10**5, 10**5)), st.one_of(st.none(), st.integers(1, 10**4)),
                     st.sampled_from(["minimum", "exclusiveMinimum"]), st.sampled_from(["maximum", "exclusiveMaximum"])).flatmap(lambda t: make(*t))


def _schemas_and_values():
    """A JSON schema in SchemaGrammar's subset, with a value it describes: leaves (bounded strings and numbers too),
    arrays (bounded too), objects, anyOf, tagged oneOf, lists of types; at the top, the value's schema is sometimes a $ref into $defs."""
    def bounded_strings(lo, extra):
        hi = lo + extra
        return st.tuples(st.just({"type": "string", "minLength": lo, "maxLength": hi}), st.text(min_size=lo, max_size=hi))
    sets = st.lists(st.one_of(st.text(max_size=3), st.integers(-9, 99)), min_size=1, max_size=4, unique=True).flatmap(
        lambda opts: st.permutations(opts).flatmap(lambda order: st.integers(0, len(opts)).map(
            lambda n: ({"type": "array", "items": {"enum": opts}, "uniqueItems": True}, order[:n]))))
    string_sets = st.tuples(st.one_of(st.none(), st.integers(1, 4)), st.lists(st.text(st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from('\n"\\'),
                                                                               max_size=4), max_size=4, unique=True)).map(
        lambda t: ({"type": "array", "items": {"type": "string", **({} if t[0] is None else {"maxLength": t[0]})}, "uniqueItems": True},
                   [s for s in t[1] if t[0] is None or len(s) <= t[0]]))                  # set[str], unicode escapes aside
    leaf = st.one_of(st.tuples(st.just({"type": "string"}), st.text(max_size=6)), sets, string_sets,
                     st.integers(0, 3).flatmap(lambda lo: st.integers(0, 3).flatmap(lambda extra: bounded_strings(lo, extra))),
                     st.tuples(st.just({"type": "integer"}), st.integers(-10**12, 10**12)),
                     st.tuples(st.one_of(st.none(), st.integers(-300, 300)), st.one_of(st.none(), st.integers(0, 400))).flatmap(
                         lambda b: st.tuples(st.just({"type": "integer", **({} if b[0] is None else {"minimum": b[0]}),
                                                      **({} if b[1] is None else {"exclusiveMaximum": (b[0] or 0) + b[1] + 1})}),
                                             st.integers(b[0], None if b[1] is None else (b[0] or 0) + b[1]))),
                     st.tuples(st.integers(2, 9), st.integers(-10**6, 10**6)).map(lambda t: ({"type": "integer", "multipleOf": t[0]}, t[0] * t[1])),
                     st.tuples(st.just({"type": "number"}), st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)),
                     _bounded_numbers(),
                     st.tuples(st.just({"type": "boolean"}), st.booleans()), st.tuples(st.just({"type": "null"}), st.none()),
                     st.tuples(st.just({"type": ["string", "null"]}), st.one_of(st.none(), st.text(max_size=3))),
                     _patterns().flatmap(lambda rx: st.tuples(st.just({"type": "string", "pattern": rx}),
                                                              st.from_regex(rx, fullmatch=True, alphabet=_PATTERN_ALPHABET))),
                     st.lists(st.one_of(st.text(max_size=4), st.integers(-99, 99)), min_size=1, max_size=3, unique=True)
                       .flatmap(lambda opts: st.tuples(st.just({"enum": opts}), st.sampled_from(opts))))
    def nest(inner):
        arrays = inner.flatmap(lambda sv: st.tuples(st.just({"type": "array", "items": sv[0]}), st.lists(st.just(sv[1]), max_size=3)))
        bounded = st.tuples(inner, st.integers(0, 2), st.integers(0, 2)).flatmap(lambda t: st.tuples(
            st.just({"type": "array", "items": t[0][0], "minItems": t[1], "maxItems": t[1] + t[2]}), st.lists(st.just(t[0][1]), min_size=t[1], max_size=t[1] + t[2])))
        objects = st.dictionaries(st.text(max_size=4), inner, max_size=3).map(
            lambda d: ({"type": "object", "properties": {k: sv[0] for k, sv in d.items()}}, {k: sv[1] for k, sv in d.items()}))
        unions = st.lists(inner, min_size=1, max_size=3).flatmap(lambda opts: st.integers(0, len(opts) - 1).map(
            lambda i: ({"anyOf": [sv[0] for sv in opts]}, opts[i][1])))
        maps = inner.flatmap(lambda sv: st.tuples(st.just({"type": "object", "additionalProperties": sv[0]}),
                                                  st.dictionaries(st.text(max_size=3), st.just(sv[1]), max_size=3)))
        tuples = st.lists(inner, min_size=1, max_size=3).map(lambda svs: ({"type": "array", "prefixItems": [sv[0] for sv in svs], "minItems": len(svs),
                                                              "maxItems": len(svs)}, [sv[1] for sv in svs]))
        wrapped = inner.map(lambda sv: ({"allOf": [sv[0]], "description": "one schema"}, sv[1]))
        def tagged_object(tag, sv, tag_first): return {"type": "object", "properties": {"kind": tag, "v": sv[0]} if tag_first else {"v": sv[0], "kind": tag}}
        tagged = st.tuples(st.lists(inner, min_size=1, max_size=3), st.booleans()).flatmap(lambda t: st.integers(0, len(t[0]) - 1).map(lambda i: (
            {"oneOf": [tagged_object({"const": f"k{j}"}, sv, t[1]) for j, sv in enumerate(t[0])], "discriminator": {"propertyName": "kind"}},
            {"kind": f"k{i}", "v": t[0][i][1]} if t[1] else {"v": t[0][i][1], "kind": f"k{i}"})))
        tag_values = st.lists(st.sampled_from(["a", "ab", 1, 12, 1.5, True, None]), min_size=1, max_size=2, unique=True)
        tag_unions = st.lists(st.tuples(inner, tag_values), min_size=1, max_size=4).flatmap(lambda opts: st.integers(0, len(opts) - 1).flatmap(
            lambda i: st.sampled_from(opts[i][1]).map(lambda tag: (      # anyOf: values may repeat across options (then either rest)
                {"anyOf": [tagged_object({"enum": vs} if len(vs) > 1 else {"const": vs[0]}, sv, True) for sv, vs in opts]},
                {"kind": tag, "v": opts[i][0][1]}))))
        return st.one_of(arrays, bounded, objects, unions, maps, tuples, wrapped, tagged, tag_unions)
    def top(sv, by_ref):
        if by_ref: return {"type": "object", "$defs": {"V": sv[0]}, "properties": {"v": {"$ref": "#/$defs/V"}}}, {"v": sv[1]}
        return {"type": "object", "properties": {"v": sv[0]}}, {"v": sv[1]}
    return st.tuples(st.recursive(leaf, nest, max_leaves=10), st.booleans()).map(lambda t: top(*t))


@settings(max_examples=300, deadline=None)
@given(_schemas_and_values())
def test_schema_grammar_reads_what_the_schema_describes(schema_value):
    """For a schema and a value it describes (jsonschema agrees), the grammar reads the value's compact text to the
    end, every prefix on the way and none of them done; one more character is refused."""
    import json
    import jsonschema
    from guide.serve.structured import SchemaGrammar
    schema, value = schema_value
    jsonschema.validate(value, schema)
    g, text = SchemaGrammar(schema), json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    state = g.start
    for i, ch in enumerate(text):
        assert not g.done(state), text[:i]
        state = g.step(state, ch)
        assert state is not None, (text, i)
    assert g.done(state) and g.step(state, "}") is None and g.step(state, " ") is None


@settings(max_examples=300, deadline=None)
@given(_schemas_and_values(), st.lists(st.text('{}[]",:0-1.25e+trufalsnxyzé \\\n\t', min_size=1, max_size=6), max_size=60), st.data())
def test_token_trie_allows_what_feeding_every_token_allows(schema_value, extra, data):
    """TokenTrie's two ways (the trie walk, and past the characters a state loops on) and `allowed`, which picks one,
    give at every state along a valid value's text, under the schema's grammar and under JSON mode, exactly the tokens
    whose whole text the grammar reads from there: a random vocabulary of the value's characters, some of their pairs
    and random texts, with duplicates and an empty token. The plain answer comes from a grammar of its own, and the
    trie's grammar may forget its steps every few characters."""
    import json
    from guide.serve.structured import JSON_OBJECT, JsonObjectGrammar, SchemaGrammar, TokenTrie
    schema, value = schema_value
    text = json.dumps({"v": value} if data.draw(st.booleans()) else value, separators=(",", ":"), ensure_ascii=False)
    pieces = sorted(set(text)) + [text[i:i + 2] for i in range(0, len(text) - 1, 3)] + extra + [""]
    data.draw(st.randoms()).shuffle(pieces)
    trie, forgetful = TokenTrie(pieces), data.draw(st.booleans())
    for grammar, plain in ((SchemaGrammar(schema), SchemaGrammar(schema)), (JsonObjectGrammar(), JSON_OBJECT)):
        if forgetful: grammar.max_steps = 3              # the memory of steps cleared again and again in mid-walk
        state = grammar.start
        for i in range(len(text) + 1):
            if state is None: break                      # (JSON mode reads an object only; the schema's value may be another)
            want = [t for t, p in enumerate(pieces) if p and plain.feed(state, p) is not None]
            assert trie.allowed(grammar, state).nonzero().flatten().tolist() == want, (text[:i], grammar)
            assert trie.walk(grammar, state).nonzero().flatten().tolist() == want, (text[:i], grammar)
            breaks = [ch for ch in trie.alphabet if grammar.feed(state, ch) != state]
            assert trie.past_loops(grammar, state, breaks).nonzero().flatten().tolist() == want, (text[:i], grammar)
            state = grammar.feed(state, text[i:i + 1]) if i < len(text) else None


@settings(max_examples=300, deadline=None)
@given(_schemas_and_values(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2), st.sampled_from('{}[]",:0-1.etrufalsnxé\\')), min_size=1, max_size=3))
def test_schema_grammar_reads_only_what_the_schema_describes(schema_value, edits):
    """The other way round: a valid value's text with a few characters inserted, deleted or replaced. Whatever the
    grammar reads to the end is JSON that jsonschema finds valid under the schema."""
    import json
    import jsonschema
    from guide.serve.structured import SchemaGrammar
    schema, value = schema_value
    g, text = SchemaGrammar(schema), json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for where, how, ch in edits:
        i = where % (len(text) + 1)
        text = text[:i] + ch + text[i:] if how == 0 else text[:i] + text[i + 1:] if how == 1 else text[:i] + ch + text[i + 1:]
    state = g.feed(g.start, text)
    if state is not None and g.done(state): jsonschema.validate(json.loads(text), schema)


@settings(max_examples=200, deadline=None)
@given(_schemas_and_values(), st.integers(0, 10**6), st.data())
def test_tag_nodes_allow_what_a_reading_per_option_allows(schema_value, leave_at, data):
    """Parity: the grammar that folds tagged anyOf/oneOf options into one "tag" node and the one that keeps a reading
    per option (tags=False) allow the same characters and are done alike at every step, along a value's text up to a
    point and then along a random walk from there (40 characters)."""
    import json
    from guide.serve.structured import SchemaGrammar
    schema, value = schema_value
    folded, per_option = SchemaGrammar(schema), SchemaGrammar(schema, tags=False)
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    alphabet, leave_at = sorted(set(text) | set('{}[]",:0-1.2eEtrufalsnkv\\')), leave_at % (len(text) + 1)
    a, b = folded.start, per_option.start
    for i in range(leave_at + 40):
        allowed = [c for c in alphabet if folded.step(a, c) is not None]
        assert allowed == [c for c in alphabet if per_option.step(b, c) is not None], (text[:i], allowed)
        assert folded.done(a) == per_option.done(b) and len(a) <= len(b)
        if not allowed: break
        ch = text[i] if i < leave_at else data.draw(st.sampled_from(allowed))
        a, b = folded.step(a, ch), per_option.step(b, ch)


_SCHEMA_WORDS = ["type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum", "const", "anyOf", "oneOf",
                 "discriminator", "propertyName", "allOf", "$ref", "$defs", "minItems", "maxItems", "minLength", "maxLength", "pattern",
                 "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "object", "string", "integer", "number",
                 "array", "boolean", "null", "#/$defs/a", "#", "a", "k", "uuid", "^a+$"]


@settings(max_examples=400, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False) | st.sampled_from(_SCHEMA_WORDS),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_SCHEMA_WORDS), inner, max_size=4),
                    max_leaves=24),
       st.dictionaries(st.sampled_from(_SCHEMA_WORDS), st.sampled_from(_SCHEMA_WORDS + [0, 1.5, -3, 10**400, float("nan"), [], {}]), max_size=3))
@example({"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}, {"$ref": "#/$defs/a"})       # a $ref to itself among options
def test_schema_grammar_refuses_what_it_cannot_read_with_a_value_error(value_schema, defs):
    """Any JSON (NaN, infinities and huge integers too) given as a schema: SchemaGrammar compiles it or raises
    ValueError, nothing else (the server answers that with a 400); what compiles reads text without raising."""
    from guide.serve.structured import SchemaGrammar
    schema = {"type": "object", "properties": {"v": value_schema}, "$defs": {"a": defs}}
    try: g = SchemaGrammar(schema)
    except ValueError: return
    state = g.feed(g.start, '{"v":')
    for ch in '"a1-.[{}]tn':
        if state is not None: g.step(state, ch)


@settings(max_examples=300, deadline=None)
@given(_bounded_numbers(), st.lists(st.text("0123456789.-", min_size=1, max_size=9), min_size=1, max_size=6))
def test_number_ranges_read_exactly_the_numbers_in_range(schema_value, texts):
    """A number with a range: a text is read to the end exactly when it is a JSON number without an exponent that
    jsonschema finds in range (short texts: where exact decimals and floats agree), and from every prefix of such a
    text some character leads on."""
    import json
    schema, value = schema_value
    _reads_exactly_the_valid(schema, texts + [json.dumps(value)], "0123456789.-}")


def _reads_exactly_the_valid(schema: dict, texts: list[str], chars: str, written=lambda text: True):
    """The grammar of {"x": schema} reads '{"x":' + text + '}' to the end exactly when the text is JSON that jsonschema
    finds valid (and `written` as the grammar writes it), and from every prefix of it some one of `chars` leads on."""
    import json
    import jsonschema
    from guide.serve.structured import SchemaGrammar
    g = SchemaGrammar({"type": "object", "properties": {"x": schema}})
    for text in texts:
        try: valid = jsonschema.Draft202012Validator(schema).is_valid(json.loads(text)) and written(text)
        except json.JSONDecodeError: valid = False
        state = g.feed(g.start, '{"x":' + text + "}")
        assert (state is not None and g.done(state)) == valid, (schema, text)
        state = g.feed(g.start, '{"x":')
        for ch in text + "}":
            assert any(g.step(state, c) is not None for c in chars), (schema, text)
            state = g.step(state, ch)
            if state is None or g.done(state): break


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(1, 40), st.sampled_from([100, 250, 10**6, 10**30])), st.one_of(st.none(), st.integers(-10**4, 10**4)),
       st.one_of(st.none(), st.integers(0, 10**4)), st.booleans(),
       st.lists(st.text("0123456789-", min_size=1, max_size=8), min_size=1, max_size=6), st.integers(-10**5, 10**5))
def test_integer_multiples_read_exactly_the_multiples_in_range(step, lo, width, exclusive, texts, near):
    """An integer with multipleOf (and maybe a range): a text is read to the end exactly when it is a JSON integer that
    jsonschema finds valid, from every prefix of such a text some character leads on, and a schema whose range holds
    no multiple is refused. The multiple of `step` nearest to `near` is among the texts."""
    from guide.serve.structured import SchemaGrammar
    hi = None if width is None else (lo or 0) + width
    schema = {"type": "integer", "multipleOf": step, **({} if lo is None else {"exclusiveMinimum" if exclusive else "minimum": lo}),
              **({} if hi is None else {"maximum": hi})}
    first, last = (None if lo is None else lo + exclusive), hi
    if first is not None and last is not None and not any(n % step == 0 for n in range(first, min(last, first + step) + 1)):
        with pytest.raises(ValueError, match="no integer lies within"): SchemaGrammar({"type": "object", "properties": {"x": schema}})
        return
    _reads_exactly_the_valid(schema, texts + [str(near // step * step), str(-(near // step) * step)], "0123456789-}",
                             written=lambda text: text == str(int(text)))      # (an integer: no -0)


_JSON_KEY = lambda v: (type(v) is bool, v)          # JSON's equality on scalars: 1 == 1.0, true != 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "ab", 1, 12, 1.0, 1.5, True, False, None]), min_size=1, max_size=6, unique_by=lambda v: (type(v), v)),
       st.integers(0, 4), st.one_of(st.none(), st.integers(0, 3)), st.data())
def test_sets_read_exactly_the_arrays_of_distinct_values(values, lo, extra, data):
    """uniqueItems over an enum (Pydantic's set[Enum]): an array is read to the end exactly when jsonschema finds it
    valid (distinct as JSON compares, 1 and 1.0 alike; within minItems and maxItems), from every prefix some character
    leads on, and a set asked for more items than there are distinct values is refused."""
    import json
    from guide.serve.structured import SchemaGrammar
    schema = {"type": "array", "items": {"enum": values}, "uniqueItems": True, "minItems": lo, **({} if extra is None else {"maxItems": lo + extra})}
    if lo > len({_JSON_KEY(v) for v in values}):
        with pytest.raises(ValueError, match="distinct values"): SchemaGrammar({"type": "object", "properties": {"x": schema}})
        return
    arrays = data.draw(st.lists(st.lists(st.sampled_from(values), max_size=6), min_size=1, max_size=6))
    arrays.append(list({_JSON_KEY(v): v for v in data.draw(st.permutations(values))}.values())[:lo + (extra or 0)])   # a valid one
    chars = "[],-}" + "".join(sorted({c for v in values for c in json.dumps(v)}))
    _reads_exactly_the_valid(schema, [json.dumps(a, separators=(",", ":")) for a in arrays], chars)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3), st.one_of(st.none(), st.integers(0, 3)), st.integers(0, 2), st.one_of(st.none(), st.integers(0, 2)), st.data())
def test_string_sets_read_exactly_the_arrays_of_distinct_strings(lo, extra, short, extra_length, data):
    """uniqueItems over strings (Pydantic's set[str]): an array of strings is read to the end exactly when jsonschema
    finds it valid (distinct strings, each within minLength and maxLength; within minItems and maxItems) and has no
    \\u escape (which the grammar does not take), and from every prefix some character leads on: a string equal to
    one so far can always grow or change instead of closing."""
    import json
    from guide.serve.structured import SchemaGrammar
    long = None if extra_length is None else short + extra_length
    schema = {"type": "array", "items": {"type": "string", "minLength": short, **({} if long is None else {"maxLength": long})},
              "uniqueItems": True, "minItems": lo, **({} if extra is None else {"maxItems": lo + extra})}
    if long == 0 and lo > 1:
        with pytest.raises(ValueError, match="maxLength 0"): SchemaGrammar({"type": "object", "properties": {"x": schema}})
        return
    arrays = data.draw(st.lists(st.lists(st.text('ab\n"\x01', max_size=3), max_size=5), min_size=1, max_size=6))
    size = short or (0 if long == 0 else 1)
    distinct = [("c" * (size - 1)) + "abcdefghij"[i] for i in range(10)] if size else [""]
    arrays.append(distinct[:lo + (extra or 0)])                                                # a valid one
    _reads_exactly_the_valid(schema, [json.dumps(a, separators=(",", ":"), ensure_ascii=False) for a in arrays],
                             '[]",-}abcdefghij\\n', written=lambda text: "\\u" not in text)


@settings(max_examples=300, deadline=None)
@given(_patterns(), st.data())
def test_char_regex_matches_what_python_re_matches(pattern, data):
    """On characters where Python's re and ECMA-262 agree (printable ASCII, newline, tab), a string is a JSON string
    value the grammar reads to the end exactly when re.search finds the pattern in it ($ at the very end, as \\Z):
    strings drawn to match, the same with a character replaced or inserted, and strings drawn at random."""
    import json
    import re
    from guide.serve.structured import SchemaGrammar
    g = SchemaGrammar({"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}})
    python = re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)
    matching = data.draw(_short_matches(pattern))
    i, ch = data.draw(st.integers(0, len(matching))), data.draw(st.sampled_from("abx0-._ \n\t\"\\"))
    for text in (matching, matching[:i] + ch + matching[i + 1:], matching[:i] + ch + matching[i:], data.draw(st.text("abx0-._ \n\t\"\\", max_size=8))):
        state = g.feed(g.start, json.dumps({"s": text}, separators=(",", ":")))
        assert (state is not None and g.done(state)) == bool(python.search(text)), (pattern, text)
    state = g.start
    for ch in json.dumps({"s": matching + ch}, separators=(",", ":")):      # never stuck: each live state has a way on
        if state is None or g.done(state): break
        assert any(g.step(state, c) for c in _PATTERN_ALPHABET + "\\\"}"), (pattern, matching)
        state = g.step(state, ch)


@settings(max_examples=500, deadline=None)
@given(st.text("()[]{}|*+?.^$\\-,0123456789abdswDSW:=!<>", max_size=24), st.integers(0, 3), st.one_of(st.none(), st.integers(0, 3)))
def test_char_regex_refuses_what_it_cannot_read_with_a_value_error(pattern, lo, extra):
    """Any text as a pattern, with or without lengths: compiled, or ValueError (a 400 at the server), nothing else."""
    from guide.serve.structured import SchemaGrammar
    schema = {"type": "string", "pattern": pattern, "minLength": lo, **({} if extra is None else {"maxLength": lo + extra})}
    try: g = SchemaGrammar({"type": "object", "properties": {"s": schema}})
    except ValueError: return
    g.feed(g.start, '{"s":"ab0')


@settings(max_examples=300, deadline=None)
@given(_patterns(), st.integers(0, 4), st.one_of(st.none(), st.integers(0, 5)), st.data())
def test_patterns_with_lengths_read_the_matches_of_those_lengths(pattern, lo, extra, data):
    """A pattern with minLength and maxLength: a string is read to the end exactly when re.search finds the pattern in
    it and its length is within the bounds; from the opening quote on, some character always leads on (a character is
    taken only where the match can still end in time). A schema that no string fits is refused."""
    import json
    import re
    from guide.serve.structured import SchemaGrammar
    hi = None if extra is None else lo + extra
    python = re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)
    texts = [data.draw(_short_matches(pattern)) for _ in range(3)] + [data.draw(st.text("abx0-._ \n\t\"\\", max_size=8))]
    fits = [t for t in texts if python.search(t) and lo <= len(t) and (hi is None or len(t) <= hi)]
    schema = {"type": "string", "pattern": pattern, "minLength": lo, **({} if hi is None else {"maxLength": hi})}
    try: g = SchemaGrammar({"type": "object", "properties": {"s": schema}})
    except ValueError as e:
        assert "no string" in str(e) and not fits, (pattern, lo, hi, fits)
        return
    for text in texts:
        state = g.feed(g.start, json.dumps({"s": text}, separators=(",", ":")))
        assert (state is not None and g.done(state)) == (text in fits), (pattern, lo, hi, text)
    state = g.feed(g.start, '{"s":"')
    for _ in range(12):                                          # a random walk: never stuck
        options = [c for c in _PATTERN_ALPHABET + '\\"}' if g.step(state, c) is not None]
        assert options, (pattern, lo, hi)
        state = g.step(state, data.draw(st.sampled_from(options)))
        if g.done(state): break


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["uuid", "ipv4", "ipv6", "date", "time", "date-time", "duration", "email", "hostname", "uri"]), st.data())
def test_formats_write_only_valid_values(fmt, data):
    """A string format is a pattern all of whose matches are valid: each passes jsonschema's FormatChecker (draft
    2020-12) and Pydantic's parsing of the type whose schema has that format; real values of the format are read too
    (what Python's and Pydantic's own writers give: uuid4, any IP address, times and dates with an offset but 29
    February, timedeltas of whole microseconds under 100 years...)."""
    import datetime
    import ipaddress
    import json
    import uuid
    import jsonschema
    import pydantic
    from guide.serve.structured import _FORMATS, SchemaGrammar
    types = {"uuid": uuid.UUID, "ipv4": ipaddress.IPv4Address, "ipv6": ipaddress.IPv6Address, "date": datetime.date, "time": datetime.time,
             "date-time": datetime.datetime, "duration": datetime.timedelta, "uri": pydantic.AnyUrl}
    text = data.draw(st.from_regex(_FORMATS[fmt], fullmatch=True))
    assert jsonschema.Draft202012Validator.FORMAT_CHECKER.conforms(text, fmt), text
    if fmt in types: pydantic.TypeAdapter(types[fmt]).validate_python(text)
    zone = datetime.timezone(datetime.timedelta(minutes=data.draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))))
    moment = data.draw(st.datetimes(datetime.datetime(1000, 1, 1), timezones=st.just(zone)).filter(lambda d: (d.month, d.day) != (2, 29)))
    real = {"uuid": lambda: str(uuid.UUID(int=data.draw(st.integers(0, 2**128 - 1)), version=4)),
            "ipv4": lambda: str(ipaddress.IPv4Address(data.draw(st.integers(0, 2**32 - 1)))),
            "ipv6": lambda: str(ipaddress.IPv6Address(data.draw(st.integers(0, 2**128 - 1)))),
            "date": lambda: moment.date().isoformat(), "time": lambda: moment.timetz().isoformat(), "date-time": lambda: moment.isoformat(),
            "duration": lambda: json.loads(pydantic.TypeAdapter(datetime.timedelta).dump_json(
                data.draw(st.timedeltas(datetime.timedelta(0), datetime.timedelta(days=36499))))),
            "email": lambda: "ada.lovelace@example.org", "hostname": lambda: data.draw(st.sampled_from(["localhost", "example.com", "api.eu-west-1.example.org"])),
            "uri": lambda: data.draw(st.sampled_from(["https://example.com", "http://docs.example.org:8080/guide/serve.html", "https://a.io/x/y_z~1/"]))}[fmt]()
    g = SchemaGrammar({"type": "object", "properties": {"v": {"type": "string", "format": fmt}}})
    state = g.feed(g.start, json.dumps({"v": real}, separators=(",", ":")))
    assert state is not None and g.done(state), real


def test_masks_shared_by_mask_key_are_the_masks(tok):
    """States whose counts no token can reach (a string's length, with or without a pattern, an array's items, an
    integer's or a number's digits) share one cached mask: for every state on the way through texts near and far from
    the bounds (below a far minLength or minItems and past it too), the cached mask is the one computed from that state
    alone, and fewer masks than states were computed."""
    import json
    from guide.serve.structured import JsonConstraint, SchemaGrammar
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 150},
              "a": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 10**30}, "minItems": 1, "maxItems": 60},
              "x": {"type": "number", "exclusiveMinimum": -2.5, "maximum": 1e40},
              "m": {"type": "array", "items": {"type": "integer", "multipleOf": 7, "minimum": -10**9, "maximum": 10**40}},
              "p": {"type": "string", "pattern": "^([a-z]+ )*$", "minLength": 2, "maxLength": 120},
              "L": {"type": "string", "minLength": 100}, "A": {"type": "array", "items": {"type": "integer"}, "minItems": 40},
              "u": {"type": "array", "items": {"type": "string", "maxLength": 30}, "uniqueItems": True},
              "w": {"type": "array", "items": {"type": "string", "minLength": 1}, "uniqueItems": True, "maxItems": 12}}}
    g, jc = SchemaGrammar(schema), JsonConstraint(tok, len(tok))
    states = set()
    for n_chars, n_items in [(3, 1), (70, 20), (150, 60), (125, 59)]:
        text = json.dumps({"s": ("ab c\\é\n" * 40)[:n_chars], "a": [10**12 + i for i in range(n_items)], "x": float(f"{n_items}{n_chars}.{n_chars}"),
                           "m": [7 * (10**12 + i) for i in range(n_items)] + [-7 * n_chars, 0, 7 * 10**39 - 7],
                           "p": ("ab c " * 40)[:max(5, min(n_chars, 120) // 5 * 5)], "L": "xy z" * (25 + n_chars // 4), "A": [3] * (40 + n_items),
                           "u": [("ab c" * 10)[:k] for k in sorted({1, 2, 5, n_chars % 27 + 3})],          # each a prefix of the next
                           "w": ["x" * (n_chars // 3 + 4), "x" * 3, "y", "x" * (n_chars // 3 + 5), "z" * 40][:n_items % 6 + 1]},
                          separators=(",", ":"))
        state = g.start
        for ch in text: states.add(state); state = g.step(state, ch)
        assert g.done(state)
    for state in states:
        assert torch.equal(jc.allowed(g, state), torch.tensor([bool(p) and g.feed(state, p) is not None for p in jc.pieces])), state
    keys = {g.mask_key(state, jc.horizon) for state in states}
    print(f"{len(states)} states, {len(keys)} masks")
    assert len(keys) < len(states) / 2
