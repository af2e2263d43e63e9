"""Chapter 20 (serving): `guide serve` as a live process on 127.0.0.1, driven by the official openai client."""
import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

GUIDE = str(Path(sys.executable).parent / "guide")


def start_server(*args, timeout=120):
    "Start `guide serve --port 0 ...`; return (process, base_url) once /ready answers."
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [GUIDE, "serve", "--port", "0", *args] if os.path.exists(GUIDE) else \
        [sys.executable, "-c", "import sys; from guide.serve.server import main; sys.exit(main(sys.argv[1:]))", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base, lines, t0 = None, [], time.monotonic()
    while time.monotonic() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None: break
            continue
        lines.append(line)
        if "listening on" in line: base = line.strip().rsplit(" ", 1)[-1]; break
    if base is None:
        proc.kill(); raise RuntimeError("server did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()   # keep draining its output
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200: return proc, base
        except httpx.TransportError: pass
        time.sleep(0.1)
    proc.kill(); raise RuntimeError("server never became ready")


def stop(proc):
    if proc.poll() is None:
        proc.kill(); proc.wait(10)


def metric(base, name, labels=""):
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    raise KeyError(name + labels)


def wait_idle(base, timeout=10):
    "Wait until the engine runs nothing and every KV block is free."
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if metric(base, "guide_engine_requests", '{state="running"}') == 0 and \
           metric(base, "guide_kv_blocks", '{state="free"}') == metric(base, "guide_kv_blocks", '{state="total"}'):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--max-pending", "8")
    try: yield base
    finally: stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


def test_models_health_ready(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-base", "tiny-encoder"]
    assert httpx.get(server + "/health").json()["status"] == "ok"
    assert httpx.get(server + "/ready").status_code == 200
    text = httpx.get(server + "/metrics").text
    for name in ("guide_kv_blocks", "guide_engine_steps_total", "guide_engine_preemptions_total", "guide_spec_draft_tokens_total",
                 "guide_spec_accepted_tokens_total"):
        assert f"\n{name}" in text, name


def test_completion_matches_engine_and_stream(server, client):
    import torch
    from guide.model import generate
    from guide.pretrained import tiny_base
    model, tok = tiny_base()
    r = client.completions.create(model="tiny-base", prompt="def main(", max_tokens=20, temperature=0)
    ids = torch.tensor([tok.encode("def main(")])
    want = tok.decode(generate(model, ids, 20)[0, ids.shape[1]:], skip_special_tokens=True)
    assert r.choices[0].text == want and r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny-base", prompt="def main(", max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_stream_and_not(client):
    kw = dict(model="tiny-base", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"}],
              max_tokens=16, temperature=0.8, seed=3)
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_stream_usage_and_no_op_fields(client):
    """`stream_options={"include_usage": True}`: a last chunk with no choices carries the usage; the fields this server
    does not implement are accepted at their no-op values."""
    chunks = list(client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 6
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "length"
    r = client.completions.create(model="tiny-base", prompt="x", max_tokens=3, logprobs=0, echo=False, presence_penalty=0.0,
                                  frequency_penalty=0, best_of=1, logit_bias={})
    assert r.usage.completion_tokens >= 1


def test_logprobs_are_the_models_and_stream_the_same(server, client):
    """Completions `logprobs=k` and chat `logprobs/top_logprobs`: each token's log-probability is the model's own
    log_softmax at its position (greedy: the top alternative is the token); streamed, the same entries arrive in pieces."""
    import torch
    from guide.pretrained import tiny_base
    model, tok = tiny_base()
    r = client.completions.create(model="tiny-base", prompt="def main(", max_tokens=8, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp, ids = r.choices[0].logprobs, tok.encode("def main(")
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8 and lp.text_offset[0] == 0
    from guide.model import generate
    full = generate(model, torch.tensor([ids]), 8)[0]
    with torch.no_grad(): ref = torch.log_softmax(model(full[None])[0][0].float(), -1)[len(ids) - 1:-1].gather(1, full[len(ids):, None])[:, 0]
    assert lp.token_logprobs == pytest.approx(ref.tolist(), abs=1e-4)
    assert lp.tokens == [tok.decode([t]) for t in full[len(ids):].tolist()]
    for top, chosen, token in zip(lp.top_logprobs, lp.token_logprobs, lp.tokens):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-5) and top.get(token) == pytest.approx(chosen, abs=1e-5)
    stream = list(client.completions.create(model="tiny-base", prompt="def main(", max_tokens=8, temperature=0, logprobs=3, stream=True,
                                            extra_body={"ignore_eos": True}))
    pieces = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [x for p in pieces for x in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert [x for p in pieces for x in p.text_offset] == lp.text_offset
    kw = dict(model="tiny-base", messages=[{"role": "user", "content": "What is a list?"}], max_tokens=6, temperature=0.7, seed=5,
              logprobs=True, top_logprobs=2)
    chat = client.chat.completions.create(**kw)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= c.top_logprobs[0].logprob + 1e-6 and bytes(c.bytes).decode() == c.token for c in content)
    streamed = [x for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for x in c.choices[0].logprobs.content]
    assert [(x.token, round(x.logprob, 4)) for x in streamed] == [(x.token, round(x.logprob, 4)) for x in content]
    assert client.chat.completions.create(**dict(kw, logprobs=False, top_logprobs=None)).choices[0].logprobs is None


def test_penalties_and_logit_bias(server, client):
    "presence/frequency penalties and logit_bias reach the engine: the server's greedy text is the engine's with the same settings."
    from guide.pretrained import tiny_base
    from guide.serve.engine import Engine, SamplingParams
    model, tok = tiny_base()
    kw = dict(max_tokens=12, presence_penalty=0.4, frequency_penalty=1.5, logit_bias={5: -100.0, 9: 2.0}, ignore_eos=True)
    want = Engine(model, tok).generate(["def main("], SamplingParams(**kw))[0]["text"]
    r = client.completions.create(model="tiny-base", prompt="def main(", temperature=0, max_tokens=12, presence_penalty=0.4, frequency_penalty=1.5,
                                  logit_bias={"5": -100, "9": 2}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == want
    forced = client.completions.create(model="tiny-base", prompt="x", max_tokens=4, logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tok.decode([42] * 4)


def test_echo_scores_the_prompt(server, client):
    """`echo` with `logprobs` and `max_tokens=0`, as evaluation harnesses score a text: the prompt comes back with each
    token's log-probability under the model (the first has none); with max_tokens > 0 the completion follows."""
    import torch
    from guide.pretrained import tiny_base
    model, tok = tiny_base()
    ids = tok.encode("def add(a, b):\n    return a + b\n")
    r = client.completions.create(model="tiny-base", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == tok.decode(ids) and r.usage.completion_tokens == 0 and len(lp.tokens) == len(ids)
    with torch.no_grad(): ref = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(ref.tolist(), abs=1e-4)
    more = client.completions.create(model="tiny-base", prompt="def main(", max_tokens=5, echo=True, logprobs=0, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(model="tiny-base", prompt="def main(", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert more.choices[0].text == "def main(" + plain.choices[0].text and len(more.choices[0].logprobs.tokens) == len(tok.encode("def main(")) + 5
    assert client.completions.create(model="tiny-base", prompt="x", max_tokens=2, echo=True).choices[0].logprobs is None


def test_n_choices_stream_and_not(server, client):
    "`n` choices: choice i of a seeded request is the single request with seed + i; streamed, each index joins to its text."
    kw = dict(model="tiny-base", prompt="import", max_tokens=10, temperature=1.0, seed=41, extra_body={"ignore_eos": True})
    r = client.completions.create(**kw, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 30
    singles = [client.completions.create(**dict(kw, seed=41 + i)).choices[0].text for i in range(3)]
    assert [c.text for c in r.choices] == singles
    texts = {}
    for c in client.completions.create(**kw, n=3, stream=True):
        for ch in c.choices: texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert [texts[i] for i in range(3)] == singles
    chat = client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, n=2, seed=3)
    assert [c.index for c in chat.choices] == [0, 1] and all(c.message.role == "assistant" for c in chat.choices)
    bad = httpx.post(server + "/v1/completions", json=dict(model="tiny-base", prompt="x", n=9))       # more than --max-pending 8
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    assert httpx.post(server + "/v1/completions", json=dict(model="tiny-base", prompt="x", n=17)).status_code == 422
    assert wait_idle(server)


def test_prefix_cache_is_reported_in_usage_and_metrics(server, client):
    "A prompt sent again finds all its full KV blocks but the last in the prefix cache: usage and /metrics say how many tokens."
    prompt = "def main(args):\n    for item in args:\n        print(item)\n" * 4
    before = metric(server, "guide_prompt_tokens_cached_total")
    first, again = [client.completions.create(model="tiny-base", prompt=prompt, max_tokens=5, temperature=0) for _ in range(2)]
    n = again.usage.prompt_tokens
    assert n > 32 and again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
    assert again.choices[0].text == first.choices[0].text
    chunks = list(client.completions.create(model="tiny-base", prompt=prompt, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
    assert metric(server, "guide_prompt_tokens_cached_total") - before >= 2 * ((n - 1) // 16 * 16)


def test_stop_string(client):
    base = client.completions.create(model="tiny-base", prompt="def main(", max_tokens=30, temperature=0).choices[0].text
    stop = base[8:10]
    r = client.completions.create(model="tiny-base", prompt="def main(", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == base[:base.find(stop)]


def test_embeddings_and_classify(server, client):
    e = client.embeddings.create(model="tiny-encoder", input=["import os", "The list type."])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 64
    e2 = httpx.post(server + "/v1/embeddings", json={"model": "tiny-encoder", "input": "import os", "encoding_format": "float"}).json()
    assert abs(e2["data"][0]["embedding"][0] - e.data[0].embedding[0]) < 1e-5
    c = httpx.post(server + "/v1/classify", json={"model": "tiny-encoder", "input": ["def f(x):\n    return x + 1"]}).json()
    assert c["data"][0]["label"] == "code"


BAD = [
    ("/v1/completions", b'{"model": "tiny-base", "prompt": '),                                   # malformed JSON
    ("/v1/completions", b'{"model": "tiny-base", "prompt": "\xff\xfe"}'),                          # invalid UTF-8
    ("/v1/completions", b'[1, 2, 3]'),                                                              # not an object
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x", "max_tokens": "lots"}).encode()),
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": 3}).encode()),
    ("/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode()),                    # unknown model
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x " * 600}).encode()),         # over the context
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x", "max_tokens": 0}).encode()),
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x", "max_tokens": 100000}).encode()),
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x", "temperature": -0.5}).encode()),
    ("/v1/completions", b'{"model": "tiny-base", "prompt": "x", "temperature": NaN}'),
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": [1, 99999]}).encode()),        # token id out of range
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": ""}).encode()),
    ("/v1/chat/completions", json.dumps({"model": "tiny-base", "messages": []}).encode()),
    ("/v1/chat/completions", json.dumps({"model": "tiny-base", "messages": [{"role": "robot", "content": "x"}]}).encode()),
    ("/v1/embeddings", json.dumps({"model": "tiny-base", "input": "x"}).encode()),
    ("/v1/embeddings", json.dumps({"model": "tiny-encoder", "input": []}).encode()),
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x", "logprobs": 6}).encode()),          # the API's limit is 5
    ("/v1/chat/completions", json.dumps({"model": "tiny-base", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).encode()),
    ("/v1/chat/completions", json.dumps({"model": "tiny-base", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                         "top_logprobs": 21}).encode()),
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x", "best_of": 2}).encode()),           # not implemented: refused, not ignored
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x", "max_tokens": 0}).encode()),       # 0 needs echo
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x", "echo": True, "stream": True}).encode()),
    ("/v1/chat/completions", json.dumps({"model": "tiny-base", "messages": [{"role": "user", "content": "x"}],
                                         "presence_penalty": 2.5}).encode()),                            # out of [-2, 2]
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x", "logit_bias": {"x": 5}}).encode()),
    ("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x", "logit_bias": {"99999": 5}}).encode()),  # not in the vocabulary
    ("/v1/chat/completions", json.dumps({"model": "tiny-base", "messages": [{"role": "user", "content": "x"}],
                                         "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}).encode()),
    ("/v1/chat/completions", json.dumps({"model": "tiny-base", "messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"enum": ["\u4e2d"]}}}}}}).encode()),
]


def test_json_mode_answers_parse(client):
    """response_format json_object: every answer that ended is one JSON object, streamed or not (the engine's JSON mode);
    one cut by max_tokens is a prefix of one. json_schema: every answer that ended is valid under the schema (jsonschema);
    a schema outside the grammar's subset is a 400 that says so."""
    from guide.serve.structured import JSON_START, json_feed
    messages = [{"role": "user", "content": "A user record as JSON, please."}]
    ended = 0
    for seed in range(4):
        r = client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=48, temperature=0.8, seed=seed,
                                           response_format={"type": "json_object"})
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert json_feed(JSON_START, text) is not None, text
        if reason == "stop": assert isinstance(json.loads(text), dict); ended += 1
        streamed = client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=48, temperature=0.8, seed=seed,
                                                  response_format={"type": "json_object"}, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    assert ended >= 2
    import jsonschema
    point = {"type": "object", "properties": {"x": {"type": "integer"}, "label": {"enum": ["a", "b"]}, "tags": {"type": "array", "items": {"type": "string"}}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "point", "schema": point, "strict": True}}
    valid = 0
    for seed in range(4):
        r = client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=48, temperature=0.8, seed=seed, response_format=fmt)
        if r.choices[0].finish_reason == "stop": jsonschema.validate(json.loads(r.choices[0].message.content), point); valid += 1
    assert valid >= 2
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"x": {"type": "string", "format": "uri-template"}}}}})
    for schema, why in (({"type": "object", "properties": {"x": {"type": "integer", "minimum": 10**400}}}, "within"),    # (no float holds it)
                        ({"type": "object", "properties": {"x": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}}, "cannot overlap")):
        with pytest.raises(openai.BadRequestError, match=why):
            client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=8,
                                           response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    plain = client.completions.create(model="tiny-base", prompt="x = ", max_tokens=8, temperature=0,
                                      extra_body={"response_format": {"type": "text"}})
    assert plain.choices[0].text                                          # text: the no-op format


def test_openai_parse_helper_returns_pydantic_models(client):
    """The openai SDK's own structured-output helper: `chat.completions.parse(response_format=Model)` sends the strict
    JSON schema of a Pydantic model ($defs, $ref, recursion, anyOf for Optional, maxLength, maxItems, minimum and
    maximum on integers and floats, a pattern with a maxLength, a tagged union) and parses the answer back into the
    model; an answer cut by max_tokens is the SDK's LengthFinishReasonError."""
    from typing import Literal
    from pydantic import BaseModel, Field
    class Cat(BaseModel):
        kind: Literal["cat"]
        lives: int = Field(ge=0, le=9)
    class Dog(BaseModel):
        kind: Literal["dog"]
        good: bool
    class Address(BaseModel):
        city: str = Field(max_length=10)
        zip: str = Field(pattern=r"^[0-9]+$", max_length=5)
    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int | None = Field(ge=0, le=150)
        height: float = Field(gt=0, le=2.5)
        pet: Cat | Dog | None = Field(discriminator="kind")
        home: Address | None
        friends: list["Person"] = Field(max_length=2)
    parsed = 0
    for seed in range(4):
        try:
            r = client.chat.completions.parse(model="tiny-base", messages=[{"role": "user", "content": "A person as JSON."}],
                                              max_tokens=160, temperature=0.8, seed=seed, response_format=Person)
        except openai.LengthFinishReasonError: continue
        assert isinstance(r.choices[0].message.parsed, Person) and r.choices[0].finish_reason == "stop"
        parsed += 1
    assert parsed >= 2


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "$defs": {"Zone": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}/[A-Z][a-z]{1,8}$"}},
    "type": "object", "properties": {"zone": {"$ref": "#/$defs/Zone"}}, "required": ["zone"]}}}


def test_tool_calls(client):
    """tools with tool_choice required or a named function: the answer is a call, as OpenAI's tool_calls (the engine's
    grammar makes the model write the call's JSON: a tool's name, then arguments its parameters describe, $refs in them
    included), finish_reason tool_calls; streamed, the same calls. A conversation that holds calls and their results
    goes on; auto with this base model answers in text."""
    import jsonschema
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    called = set()
    for seed in range(4):
        kw = dict(model="tiny-base", messages=messages, tools=[WEATHER, TIME], tool_choice="required", max_tokens=64, temperature=0.9, seed=seed)
        r = client.chat.completions.create(**kw)
        choice = r.choices[0]
        if choice.finish_reason == "length": continue
        assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name]); called.add(call.function.name)
        streamed = list(client.chat.completions.create(**kw, stream=True))
        calls = [tc for c in streamed for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
        assert [(c.function.name, c.function.arguments) for c in calls] == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert streamed[-1].choices[0].finish_reason == "tool_calls" and not any(c.choices[0].delta.content for c in streamed if c.choices)
    assert called, "no call closed within 64 tokens"
    named = client.chat.completions.create(model="tiny-base", messages=messages, tools=[WEATHER, TIME], max_tokens=64, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    call = named.choices[0].message.tool_calls[0]
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    after = client.chat.completions.create(model="tiny-base", messages=follow, tools=[WEATHER, TIME], max_tokens=8, temperature=0)
    assert after.choices[0].message.content is not None and after.choices[0].finish_reason in ("stop", "length")
    auto = dict(model="tiny-base", messages=messages, tools=[WEATHER], max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**auto).choices[0]
    assert plain.message.tool_calls is None and plain.message.content and plain.finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**auto, stream=True) if c.choices) == plain.message.content
    one_call = {"type": "object", "properties": {"tool_calls": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
        "type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["function"]["parameters"]}}}}}
    closed = 0
    for seed in range(3):       # auto, with the text held to a call's JSON (response_format): read as a call, streamed or not
        kw = dict(auto, max_tokens=96, temperature=0.9, seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": one_call}})
        choice = client.chat.completions.create(**kw).choices[0]
        if choice.finish_reason == "length": continue
        streamed = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
        calls = [tc for c in streamed for tc in (c.choices[0].delta.tool_calls or [])]
        assert choice.finish_reason == "tool_calls" and [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        assert [c.function.arguments for c in calls] == [c.function.arguments for c in choice.message.tool_calls]
        assert not any(c.choices[0].delta.content for c in streamed)
        closed += 1
    assert closed, "no call closed within 96 tokens"


def test_tool_call_errors(client):
    messages = [{"role": "user", "content": "hi"}]
    for bad in (dict(tool_choice="required"), dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                dict(tools=[WEATHER, WEATHER]), dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
                dict(tools=[WEATHER], logprobs=True), dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})):
        with pytest.raises(openai.UnprocessableEntityError): client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=4, **bad)
    odd = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "format": "uri-template"}}}}}
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=4, tools=[odd], tool_choice="required")
    for bad_messages in ([{"role": "tool", "content": "x"}], [{"role": "user", "content": "x", "tool_calls": []}], [{"role": "assistant"}]):
        with pytest.raises(openai.UnprocessableEntityError): client.chat.completions.create(model="tiny-base", messages=bad_messages, max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny-base", prompt="x", max_tokens=4, extra_body={"tools": [WEATHER]})


@pytest.mark.parametrize("route,body", BAD, ids=range(len(BAD)))
def test_bad_input_is_4xx_with_openai_error(server, route, body):
    r = httpx.post(server + route, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError): client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError): client.completions.create(model="tiny-base", prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError): client.get("/nothing-here", cast_to=object)


@pytest.fixture(scope="module")
def slow_server():
    "A slow engine (--step-delay 0.03 s per step, like a bigger model), a 4 s request timeout, a queue bound of 4."
    proc, base = start_server("--step-delay", "0.03", "--request-timeout", "4", "--drain-timeout", "20", "--no-encoder",
                              "--max-pending", "4")
    try: yield proc, base
    finally: stop(proc)


def test_overload_gets_429_with_retry_after(slow_server):
    "Four long streams fill the bounded queue (--max-pending 4): the next requests get 429 + Retry-After, the worker lives on."
    proc, server = slow_server
    body = {"model": "tiny-base", "prompt": "x", "max_tokens": 480, "temperature": 0.7, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        streams = [c.stream("POST", server + "/v1/completions", json=body) for _ in range(4)]
        iters = []                         # keep the line iterators alive: a collected one closes its connection
        try:
            for s in streams:
                iters.append(s.__enter__().iter_lines()); next(iters[-1])
            for _ in range(3):
                r = httpx.post(server + "/v1/completions", json={"model": "tiny-base", "prompt": "y", "max_tokens": 4}, timeout=10)
                assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
                assert r.json()["error"]["type"] == "rate_limit_error"
        finally:
            for s in streams: s.__exit__(None, None, None)
    assert wait_idle(server)
    assert httpx.get(server + "/health").json()["status"] == "ok"          # the worker is alive
    r = httpx.post(server + "/v1/completions", json={"model": "tiny-base", "prompt": "y", "max_tokens": 4}, timeout=10)
    assert r.status_code == 200


def test_a_burst_respects_the_queue_bound(slow_server):
    "Ten streams sent at once with --max-pending 4: four are served, six get 429 (before, all ten passed the check)."
    proc, server = slow_server
    body = {"model": "tiny-base", "prompt": "x", "max_tokens": 40, "stream": True, "ignore_eos": True}
    async def one(c):
        async with c.stream("POST", server + "/v1/completions", json=body) as r:
            return r.status_code, [line async for line in r.aiter_lines() if line]
    async def burst():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as c:
            return await asyncio.gather(*[one(c) for _ in range(10)])
    got = asyncio.run(burst())
    codes = sorted(code for code, _ in got)
    assert codes == [200] * 4 + [429] * 6, codes
    assert all(lines[-1] == "data: [DONE]" for code, lines in got if code == 200)
    assert wait_idle(server)


@pytest.fixture(scope="module")
def small_cache():
    "An in-process server whose KV cache (4 blocks of 16) is smaller than the context (512), with a 100 kB body limit."
    from guide.serve.server import build_app, build_state, serve_in_thread
    state = build_state(num_blocks=4, max_body_bytes=100_000, request_timeout=3)
    server, thread, base = serve_in_thread(build_app(state))
    try: yield state, base
    finally: server.should_exit = True; thread.join(10)


def test_json_masks_are_built_with_the_state(small_cache):
    "build_state builds the engine's JsonConstraint, so that no JSON request waits for it (half a second at 62,000 tokens)."
    assert small_cache[0].engine.engine.json is not None


def test_limits_are_4xx_and_cheap(small_cache):
    """A request the KV cache cannot hold is a 400, streamed or not (it was a 500, or a 200 cut short); a body over the
    limit is a 413; a prompt too long for any tokenization is refused without tokenizing it; unknown paths share one
    metrics label; every error is counted under its status."""
    state, base = small_cache
    body = {"model": "tiny-base", "prompt": "x", "max_tokens": 300}
    for stream in (False, True):
        r = httpx.post(base + "/v1/completions", json=body | {"stream": stream}, timeout=30)
        assert r.status_code == 400 and "KV blocks" in r.json()["error"]["message"], r.text
    r = httpx.post(base + "/v1/completions", json={"model": "tiny-base", "prompt": "x" * 200_000}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    def chunks():
        yield b'{"model": "tiny-base", "prompt": "'
        for _ in range(30): yield b"y" * 10_000
        yield b'"}'
    r = httpx.post(base + "/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text                                    # chunked: no content-length to check up front
    t = time.perf_counter()
    r = httpx.post(base + "/v1/completions", json={"model": "tiny-base", "prompt": "z" * 90_000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - t < 2
    for i in range(20): httpx.get(f"{base}/v1/nothing{i}")
    text = httpx.get(base + "/metrics").text
    assert "nothing" not in text and 'route="other",status="404"' in text and 'route="/v1/completions",status="400"' in text
    r = httpx.post(base + "/v1/completions", json={"model": "tiny-base", "prompt": "x", "max_tokens": 8}, timeout=30)
    assert r.status_code == 200 and state.engine.engine.num_free_blocks == 4


def test_a_model_without_a_chat_template_is_a_400_on_chat(small_cache):
    state, base = small_cache
    body = {"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    template, state.tokenizer.chat_template = state.tokenizer.chat_template, None      # a base model's tokenizer
    try: r = httpx.post(base + "/v1/chat/completions", json=body)
    finally: state.tokenizer.chat_template = template
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template", r.text
    assert httpx.post(base + "/v1/chat/completions", json=body).status_code == 200


def test_a_slow_or_stopped_encoder_answers_408_or_503(small_cache):
    """An encoder batch that takes longer than request_timeout (3 s) is a 408 after it, not a wait for the batch; a
    stopped batcher is a 503 at once, and /health says so."""
    from guide.serve.batcher import DynamicBatcher
    state, base = small_cache
    real = state.encoder
    def slow_model(seqs, length): time.sleep(6); return real.fn(seqs, length)
    slow_model.max_len = real.fn.max_len
    state.encoder = DynamicBatcher(slow_model, 4, 0.001).start()
    try:
        t = time.perf_counter()
        r = httpx.post(base + "/v1/embeddings", json={"model": "tiny-encoder", "input": "import os"}, timeout=30)
        assert r.status_code == 408 and 2.5 < time.perf_counter() - t < 5.5, (r.text, time.perf_counter() - t)
    finally: state.encoder.stop(); state.encoder = real
    real.stop()
    r = httpx.post(base + "/v1/embeddings", json={"model": "tiny-encoder", "input": "import os"}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "encoder_unavailable", r.text
    h = httpx.get(base + "/health")
    assert h.status_code == 503 and h.json()["encoder"] == "unavailable"


def test_encoder_queue_full_gets_429_with_retry_after():
    "The encoder's bounded queue (--encoder-queue 2): a request of 50 texts overflows it and gets 429; the ones queued are dropped, the worker lives on."
    proc, base = start_server("--no-llm", "--encoder-queue", "2", "--encoder-batch-size", "1", "--encoder-delay", "0")
    try:
        r = httpx.post(base + "/v1/classify", json={"model": "tiny-encoder", "input": [f"def f{i}(): pass" for i in range(50)]}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "overloaded"
        assert metric(base, "guide_rejected_total", '{reason="overload"}') >= 1
        r = httpx.post(base + "/v1/classify", json={"model": "tiny-encoder", "input": "import os"}, timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["label"] in ("prose", "code")
        assert httpx.get(base + "/health").json()["status"] == "ok"
    finally: stop(proc)
    bad = subprocess.run([GUIDE, "serve", "--encoder-queue", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--encoder-queue must be >= 1" in bad.stderr
    for flags in (["--model", "/no/such/model"], ["--decode-steps", "0"], ["--max-prefill-tokens", "0"], ["--speculate", "-1"], ["--speculate-max-batch", "0"], ["--num-blocks", "0"], ["--max-pending", "0"], ["--request-timeout", "0"],
                  ["--drain-timeout", "-1"], ["--pdl", "--device", "cpu"], ["--paged-attention", "--device", "cpu"], ["--device", "gpu7"]):
        bad = subprocess.run([GUIDE, "serve", *flags], capture_output=True, text=True)
        assert bad.returncode == 2 and flags[0] in bad.stderr and "Traceback" not in bad.stderr, (flags, bad.stderr)


def test_disconnect_cancels_and_frees_blocks(server):
    before = metric(server, "guide_cancelled_total", '{reason="disconnect"}') if 'guide_cancelled_total{reason="disconnect"}' in \
        httpx.get(server + "/metrics").text else 0.0
    body = {"model": "tiny-base", "prompt": "import os\n", "max_tokens": 480, "temperature": 0.7, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as r:
        it = r.iter_lines(); next(it); next(it)
        assert metric(server, "guide_kv_blocks", '{state="free"}') < metric(server, "guide_kv_blocks", '{state="total"}')
    assert wait_idle(server)
    assert metric(server, "guide_cancelled_total", '{reason="disconnect"}') == before + 1
    # a non-streaming request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json=body | {"stream": False}, timeout=0.3)
    assert wait_idle(server)


def test_timeout_cancels_and_frees_blocks(slow_server):
    proc, base = slow_server
    r = httpx.post(base + "/v1/completions", json={"model": "tiny-base", "prompt": "x", "max_tokens": 480, "ignore_eos": True}, timeout=30)
    assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
    assert wait_idle(base)


def test_sigterm_drains_in_flight_then_exits_0(slow_server):
    "SIGTERM: new requests get 503, /ready 503, the three streams in flight finish, the process exits 0."
    proc, base = slow_server
    results, started = {}, threading.Barrier(4)
    def stream(i):
        texts = []
        with httpx.stream("POST", base + "/v1/completions", timeout=30, json={
                "model": "tiny-base", "prompt": f"def f{i}(", "max_tokens": 30, "temperature": 0, "stream": True, "ignore_eos": True}) as r:
            it = r.iter_lines()
            first = True
            for line in it:
                if first and line.startswith("data:"): started.wait(10); first = False
                if line.startswith("data: {"): texts.append(json.loads(line[6:]))
        results[i] = texts
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads: t.start()
    started.wait(10)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    r = httpx.post(base + "/v1/completions", json={"model": "tiny-base", "prompt": "x"}, timeout=5)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert httpx.get(base + "/ready").status_code == 503
    for t in threads: t.join(30)
    assert proc.wait(30) == 0
    assert len(results) == 3
    for chunks in results.values():                     # every in-flight stream ran to its end
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_serve_a_transformers_checkpoint_folder(tmp_path):
    """`guide serve --model <folder>` of a transformers Mistral checkpoint (saved here, random weights): its greedy
    completion is transformers' own greedy generate, decoded; chat works through the tokenizer's template."""
    import torch, transformers
    from guide.data import get_tokenizer
    tok = get_tokenizer("tiny")
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()
    folder = tmp_path / "mistral-tiny"
    hf.save_pretrained(folder); tok.save_pretrained(folder)
    proc, base = start_server("--model", str(folder), "--no-encoder", "--no-prefix-caching", "--max-prefill-tokens", "4", "--speculate", "3",
                              "--speculate-max-batch", "1")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["mistral-tiny"]
        ids = tok.encode("def main(")
        r = client.completions.create(model="mistral-tiny", prompt=ids, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        want = hf.generate(torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(ids):]
        assert r.choices[0].text == tok.decode(want, skip_special_tokens=True) and r.usage.completion_tokens == 10
        again = client.completions.create(model="mistral-tiny", prompt=ids * 8, max_tokens=2)
        again = client.completions.create(model="mistral-tiny", prompt=ids * 8, max_tokens=2)
        assert again.usage.prompt_tokens_details.cached_tokens == 0                          # --no-prefix-caching
        client.completions.create(model="mistral-tiny", prompt=ids * 8, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        drafted, accepted = (metric(base, f"guide_spec_{n}_tokens_total") for n in ("draft", "accepted"))
        assert drafted > 0 and 0 < accepted <= drafted                   # this model's greedy answer to it loops: drafts, some kept
        chat = client.chat.completions.create(model="mistral-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert chat.usage.completion_tokens >= 1
    finally:
        stop(proc)


@pytest.mark.parametrize("shared", [False, True], ids=["own-encoders", "shared-encoder"])
def test_prefork_workers_encoder_only(shared):
    """`guide serve --no-llm --workers 2 [--shared-encoder]`: two processes share the port, each answers (with its own
    encoder or one model process batching for both); SIGTERM stops every process of the server, exit 0."""
    proc, base = start_server("--no-llm", "--workers", "2", *(["--shared-encoder"] if shared else []))
    try:
        pids, t0 = set(), time.monotonic()
        while len(pids) < 2 and time.monotonic() - t0 < 60:
            with httpx.Client() as c: pids.add(c.get(base + "/health").json()["pid"])     # a new connection each time
        assert len(pids) == 2
        r = httpx.post(base + "/v1/classify", json={"model": "tiny-encoder", "input": "def f(x):\n    return x + 1"})
        assert r.status_code == 200 and r.json()["data"][0]["label"] == "code"
        r = httpx.post(base + "/v1/completions", json={"model": "tiny-base", "prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"
        # many requests at once: each answer is its own text's (with a shared encoder, batched across both workers)
        texts = [f"def f{i}(x):\n    return x + {i}" if i % 2 else f"The statement number {i} is explained here." for i in range(64)]
        async def many():
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                return await asyncio.gather(*[c.post("/v1/classify", json={"model": "tiny-encoder", "input": t}) for t in texts])
        rs = asyncio.run(many())
        assert all(r.status_code == 200 for r in rs)
        from guide.data import get_tokenizer
        from guide.serve.batcher import load_encoder_fn
        direct = load_encoder_fn("tiny")([get_tokenizer("tiny").encode(t) for t in texts], 128)     # each answer is its own text's
        for r, d in zip(rs, direct):
            assert abs(r.json()["data"][0]["probs"]["code"] - d["probs"][1]) < 1e-4
        children = _children(proc.pid)
        assert len(children) >= (3 if shared else 2), children   # two workers (+ the encoder process and multiprocessing's tracker)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        time.sleep(0.5)
        assert not [p for p in children if _alive(p)], "a worker or the encoder process outlived the server"
    finally:
        stop(proc)


def test_a_dead_shared_encoder_is_503_at_once():
    """SIGKILL the shared encoder's model process: every worker's /health (and /ready: it serves nothing else) turns 503
    within seconds and encoder requests get 503 encoder_unavailable at once (not a wait for the request timeout); SIGTERM still stops the server, exit 1."""
    proc, base = start_server("--no-llm", "--workers", "2", "--shared-encoder", "--request-timeout", "60")
    try:
        model_procs = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
        assert len(model_procs) == 1, [(p, _cmdline(p)) for p in _children(proc.pid)]
        body = {"model": "tiny-encoder", "input": "import os"}
        assert httpx.post(base + "/v1/classify", json=body).status_code == 200
        os.kill(model_procs[0], signal.SIGKILL)
        unhealthy, t0 = set(), time.monotonic()
        while len(unhealthy) < 2 and time.monotonic() - t0 < 15:
            with httpx.Client() as c: h = c.get(base + "/health")     # a new connection each time: both workers answer
            if h.status_code == 503:
                assert h.json()["encoder"] == "unavailable", h.text
                unhealthy.add(h.json()["pid"])
            time.sleep(0.05)
        assert len(unhealthy) == 2, unhealthy
        for _ in range(4):
            with httpx.Client() as c: r = c.get(base + "/ready")
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_model_up", r.text          # it serves nothing else
        for _ in range(4):
            t = time.perf_counter()
            with httpx.Client() as c: r = c.post(base + "/v1/classify", json=body, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "encoder_unavailable", r.text
            assert time.perf_counter() - t < 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 1
    finally:
        stop(proc)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f: return f.read().replace(b"\0", b" ").decode()
    except OSError: return ""


def _alive(pid: int) -> bool:
    "Running (not gone, not a zombie left for init to reap)."
    try:
        with open(f"/proc/{pid}/stat") as f: return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError: return False


def _children(pid: int) -> list[int]:
    "Process ids whose parent is `pid` (from /proc)."
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f: stat = f.read()
            except OSError: continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid: out.append(int(d))
    return out


def test_an_overlapped_engine_streams_what_the_engine_writes():
    """guide serve --overlap (with bursts of two steps): streamed completions, read with the openai client while another
    request shares the batch, are the texts the engine writes one step at a time."""
    from guide.serve.engine import Engine, SamplingParams
    from guide.serve.server import build_app, build_state, serve_in_thread
    state = build_state(encoder=False, overlap=True, decode_steps=2)
    server, thread, base = serve_in_thread(build_app(state))
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        prompts = ["def main(", "The "]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            texts = list(pool.map(lambda p: "".join(c.choices[0].text for c in client.completions.create(
                model="tiny-base", prompt=p, max_tokens=40, temperature=0, stream=True)), prompts))
        plain = Engine(state.engine.engine.model, state.tokenizer)
        assert texts == [r["text"] for r in plain.generate(prompts, SamplingParams(max_tokens=40))]
        assert state.engine.engine.stats["overlapped_bursts"] > 0 and state.engine.engine._ahead is None
        assert "\nguide_engine_overlapped_bursts_total" in httpx.get(base + "/metrics").text
    finally: server.should_exit = True; thread.join(10)
