"""`mlxft serve` over real HTTP on loopback: OpenAI shapes, streaming, errors, API key, concurrency."""

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.backends.mlx.stream import load_generator
from mlxft.errors import UserError
from mlxft.generation import Sampling
from mlxft.serve.options import adapter_options, check_origins, is_loopback
from mlxft.serve.server import ModelServer, make_server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Write a short news headline about the weather."}]


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return load_generator(str(tiny_model_dir))


def start(generator, **kwargs):
    server = make_server(generator, host="127.0.0.1", port=0, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(generator):
    server = start(generator)
    yield server
    server.shutdown()
    server.server_close()


def call(server, method, path, body=None, *, raw=None, headers=None):
    """(status, headers, bytes) through the standard library's HTTP client."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=120)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def post(server, path, body, **kwargs):
    status, headers, payload = call(server, "POST", path, body, **kwargs)
    assert status == 200, payload
    return json.loads(payload)


def events(server, path, body):
    """The JSON payloads of a streamed answer; asserts the SSE framing and the final [DONE]."""
    status, headers, payload = call(server, "POST", path, {**body, "stream": True})
    assert status == 200 and headers["content-type"] == "text/event-stream"
    blocks = payload.decode().split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    assert all(block.startswith("data: ") for block in blocks[:-1])
    return [json.loads(block[6:]) for block in blocks[:-2]]


def assert_usage(usage, prompt_tokens=None):
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] >= 0
    if prompt_tokens is not None:
        assert usage["prompt_tokens"] == prompt_tokens


def chat_prompt_tokens(generator, messages):
    from mlxft.conversation import render_messages

    return len(generator.encode(render_messages(messages, "chat", generator.tokenizer)))


def test_health_models_and_page(server):
    status, _, payload = call(server, "GET", "/health")
    assert status == 200 and json.loads(payload)["status"] == "ok"
    listing = json.loads(call(server, "GET", "/v1/models")[2])
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [server.model_id]
    assert listing["data"][0]["object"] == "model"
    status, headers, page = call(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/v1/chat/completions" in page and b'id="instruction"' in page and b'id="input"' in page


def test_chat_completion_and_its_stream(server, generator):
    body = {"model": server.model_id, "messages": HELLO, "temperature": 0, "max_tokens": 12}
    answer = post(server, CHAT, body)
    assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
    assert isinstance(answer["created"], int) and answer["model"] == server.model_id
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length") and choice["message"]["content"]
    assert_usage(answer["usage"], chat_prompt_tokens(generator, HELLO))
    assert answer["usage"]["completion_tokens"] <= 12
    assert choice["finish_reason"] == "stop" or answer["usage"]["completion_tokens"] == 12

    chunks = events(server, CHAT, {**body, "stream_options": {"include_usage": True}})
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == server.model_id for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == choice["message"]["content"]  # temperature 0: the same answer, streamed
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == choice["finish_reason"] and set(finishes[:-1]) == {None}
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and {**usage, "prompt_tokens_details": None} == {**answer["usage"], "prompt_tokens_details": None}
    # The same prompt again: all of it but its last token came from the prompt cache.
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    assert len(chunks) > 4  # streamed in pieces, not in one block


def test_text_completion_and_its_stream(server):
    body = {"prompt": "Below is an instruction", "temperature": 0, "max_tokens": 10}
    answer = post(server, COMPLETIONS, body)
    assert answer["id"].startswith("cmpl-") and answer["object"] == "text_completion"
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    assert_usage(answer["usage"])
    chunks = events(server, COMPLETIONS, body)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_stop_strings_seed_and_top_p(server):
    body = {"prompt": "Below is an instruction", "temperature": 0, "max_tokens": 24}
    full = post(server, COMPLETIONS, body)["choices"][0]["text"]
    stop = full[8:11]
    cut = post(server, COMPLETIONS, {**body, "stop": [stop, "never appears"]})["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    streamed = events(server, COMPLETIONS, {**body, "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in streamed) == cut["text"]

    sampled = {**body, "temperature": 1.0, "top_p": 0.9}
    one = [post(server, COMPLETIONS, {**sampled, "seed": 7})["choices"][0]["text"] for _ in range(2)]
    others = {post(server, COMPLETIONS, {**sampled, "seed": s})["choices"][0]["text"] for s in (8, 9, 10)}
    assert one[0] == one[1] and others != {one[0]}


def error_of(server, method, path, body=None, **kwargs):
    status, headers, payload = call(server, method, path, body, **kwargs)
    error = json.loads(payload)["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    return status, error, headers


def test_bad_requests_get_json_errors(server):
    assert error_of(server, "POST", CHAT, raw=b'{"messages": [')[0] == 400
    assert error_of(server, "POST", CHAT, raw=b"[1, 2]")[0] == 400
    status, error, _ = error_of(server, "POST", CHAT, {"model": "gpt-4", "messages": HELLO})
    assert status == 404 and error["code"] == "model_not_found"
    status, error, _ = error_of(server, "POST", CHAT, {"model": server.model_id})
    assert status == 400 and error["param"] == "messages"
    assert error_of(server, "POST", CHAT, {"messages": []})[0] == 400
    assert error_of(server, "POST", CHAT, {"messages": [{"role": "user"}]})[0] == 400
    status, error, _ = error_of(server, "POST", COMPLETIONS, {"max_tokens": 5})
    assert status == 400 and error["param"] == "prompt"
    for bad in ({"temperature": 3}, {"top_p": 0}, {"max_tokens": 0}, {"max_tokens": "9"}, {"stop": 5}, {"n": 2}):
        assert error_of(server, "POST", COMPLETIONS, {"prompt": "hi", **bad})[0] == 400, bad
    status, error, _ = error_of(server, "POST", COMPLETIONS, {"prompt": "news " * 600})
    assert status == 400 and error["code"] == "context_length_exceeded" and "512" in error["message"]
    status, error, _ = error_of(server, "POST", CHAT, {"messages": [{"role": "user", "content": "news " * 600}]})
    assert status == 400 and error["code"] == "context_length_exceeded"
    assert error_of(server, "GET", "/v2/everything")[0] == 404
    status, error, headers = error_of(server, "GET", CHAT)
    assert status == 405 and headers["allow"] == "POST"
    assert error_of(server, "DELETE", "/v1/models")[0] == 405


def test_api_key(generator):
    server = start(generator, api_key="s3cret")
    try:
        body = {"prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, error, _ = error_of(server, "POST", COMPLETIONS, body, headers=headers)
            assert status == 401 and error["code"] == "invalid_api_key"
        assert error_of(server, "GET", "/v1/models")[0] == 401
        assert call(server, "POST", COMPLETIONS, body, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(server, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(server, "GET", "/health")[0] == 200  # the probe and the page stay open
    finally:
        server.shutdown()
        server.server_close()


def test_cors_is_off_unless_an_origin_is_named(server, generator):
    page = {"Origin": "https://app.example"}
    preflight = {**page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    # Off: no answer, preflight included, carries an Access-Control header (the browser blocks the page).
    for method, path in (("OPTIONS", COMPLETIONS), ("GET", "/v1/models"), ("POST", COMPLETIONS)):
        _, headers, _ = call(server, method, path, {"prompt": "hi", "max_tokens": 1} if method == "POST" else None,
                             headers=preflight if method == "OPTIONS" else page)
        assert not [h for h in headers if h.startswith("access-control")], (method, headers)
    named = start(generator, cors_origins=check_origins(["HTTPS://App.example"]), api_key="k")  # matched in lower case
    try:
        status, headers, _ = call(named, "OPTIONS", COMPLETIONS, headers=preflight)
        assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
        assert headers["access-control-allow-methods"] == "POST, OPTIONS" and headers["vary"] == "Origin"
        assert headers["access-control-allow-headers"] == "content-type"  # what the preflight asked for
        # A client library's own headers (the OpenAI SDK's x-stainless-*) are allowed as asked; a malformed list is not echoed.
        sdk = {**preflight, "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
        assert call(named, "OPTIONS", COMPLETIONS, headers=sdk)[1]["access-control-allow-headers"] == \
            "authorization, content-type, x-stainless-os"
        bad = {**preflight, "Access-Control-Request-Headers": "x-a, bad header"}
        assert call(named, "OPTIONS", COMPLETIONS, headers=bad)[1]["access-control-allow-headers"] == "Authorization, Content-Type"
        # The answer, a stream and an error (the page must be able to read why it failed) carry it too.
        status, headers, _ = call(named, "POST", COMPLETIONS, {"prompt": "hi", "max_tokens": 1, "stream": True},
                                  headers={**page, "Authorization": "Bearer k"})
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        status, headers, _ = call(named, "GET", "/v1/models", headers=page)
        assert status == 401 and headers["access-control-allow-origin"] == "https://app.example"
        _, headers, _ = call(named, "GET", "/health", headers={"Origin": "https://other.example"})
        assert "access-control-allow-origin" not in headers and headers["vary"] == "Origin"  # a cache keys on it
    finally:
        named.shutdown()
        named.server_close()
    anyone = start(generator, cors_origins=("*",))
    try:
        assert call(anyone, "GET", "/health", headers={"Origin": "http://localhost:3000"})[1]["access-control-allow-origin"] == "*"
    finally:
        anyone.shutdown()
        anyone.server_close()


def test_cors_origins_are_checked():
    assert check_origins(["http://localhost:3000", "*", "app://obsidian.md"]) == ("http://localhost:3000", "*", "app://obsidian.md")
    for bad in ("app.example", "https://app.example/", "https://app.example/chat"):
        with pytest.raises(UserError, match="--cors-origin"):
            check_origins([bad])


class StreamOnly:
    """A generator with only the one-request interface (as a backend without batching has),
    recording how many answers are generated at once."""

    def __init__(self, inner):
        self.inner, self.active, self.most, self.calls, self.mutex = inner, 0, 0, 0, threading.Lock()
        self.tokenizer, self.name, self.context_length, self.encode = inner.tokenizer, inner.name, inner.context_length, inner.encode

    def stream(self, ids, sampling):
        with self.mutex:
            self.active, self.calls = self.active + 1, self.calls + 1
            self.most = max(self.most, self.active)
        try:
            for piece in self.inner.stream(ids, sampling):
                time.sleep(0.002)  # widen the window in which another request could slip in
                yield piece
        finally:
            with self.mutex:
                self.active -= 1


def ask(server, body, stream=False, path=COMPLETIONS):
    """(text, finish_reason, completion_tokens) of one answer, streamed or not."""
    if not stream:
        answer = post(server, path, body)
        choice = answer["choices"][0]
        return choice["message"]["content"] if path == CHAT else choice["text"], choice["finish_reason"], answer["usage"]["completion_tokens"]
    chunks = events(server, path, {**body, "stream_options": {"include_usage": True}})
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    text = "".join(c["delta"].get("content", "") if path == CHAT else c["text"] for c in choices)
    return text, choices[-1]["finish_reason"], chunks[-1]["usage"]["completion_tokens"]


# Requests of different lengths and sampling settings, answered together in one batch below.
MIXED = [
    {"prompt": "Below is an instruction", "temperature": 0, "max_tokens": 20},
    {"prompt": "Write a short news headline about the weather.", "temperature": 0, "max_tokens": 7},
    {"prompt": "hi", "temperature": 0, "max_tokens": 30, "repetition_penalty": 1.3},
    {"prompt": "Below is an instruction", "temperature": 0, "max_tokens": 30, "stop": ["zzz", "instruction instruction"]},
    {"prompt": "Will this user like the article?", "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 11, "max_tokens": 16},
    {"prompt": "hi", "temperature": 0.8, "seed": 5, "max_tokens": 16, "repetition_penalty": 1.2},
]


def test_concurrent_requests_are_batched_and_equal_their_single_answers(server, monkeypatch):
    references = [ask(server, body) for body in MIXED]  # one at a time: the single-request answers
    assert references[3][1] == "stop" and references[1][2] == 7 and references[0][1] == "length", references
    assert references[2] != ask(server, {**MIXED[2], "repetition_penalty": 1.0})  # the penalty is applied
    assert references[4] != ask(server, {**MIXED[4], "seed": 12})  # the seed is the request's own
    engine, widths = server.scheduler.engine, []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: widths.append(len(engine)) or step())

    def one(i):
        return ask(server, MIXED[i % len(MIXED)], stream=bool(i // len(MIXED) % 2))

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(48)))
    for i, answer in enumerate(answers):
        assert answer == references[i % len(MIXED)], (i, answer)  # token for token, streamed or not
    assert max(widths) >= 8  # many answers in one decode step, not one at a time


def one_request_answers(generator, bodies):
    """Each body answered alone through the generator's stream(), the one-request path."""
    serial = start(StreamOnly(generator))
    try:
        return [ask(serial, body) for body in bodies]
    finally:
        serial.shutdown()
        serial.server_close()


def test_batched_answers_equal_mlx_lms_one_request_path(server, generator):
    # The engine computes a step ahead and keeps its own repetition-penalty context: its greedy,
    # penalized and stopped answers, 32 at once, equal stream()'s (mlx-lm's stream_generate).
    # Seeded draws are not compared: mlx-lm draws from one global key, the engine from a key per row.
    # The last body's answer changes when the penalty misses the token the step ahead was fed.
    bodies = MIXED[:4] + [{"prompt": "will headline write instruction read", "temperature": 0, "max_tokens": 30,
                           "repetition_penalty": 2.0}]
    references = one_request_answers(generator, bodies)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: ask(server, bodies[i % 5], stream=bool(i // 5 % 2)), range(40)))
    for i, answer in enumerate(answers):
        assert answer == references[i % 5], (i, answer)


def test_pytorch_batches_too_and_its_answers_equal_the_one_request_path(tiny_model_dir, monkeypatch):
    # The same mixed requests on PyTorch: one at a time through stream() (the one-request path),
    # then 48 at once through the batch engine; greedy, penalized, stopped and seeded answers agree.
    from mlxft.backends.torch.stream import load_generator as torch_generator

    generator = torch_generator(str(tiny_model_dir))
    references = one_request_answers(generator, MIXED)
    batched = start(generator)
    try:
        engine, widths = batched.scheduler.engine, []
        step = engine.step
        monkeypatch.setattr(engine, "step", lambda: widths.append(len(engine)) or step())
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda i: ask(batched, MIXED[i % len(MIXED)], stream=bool(i // len(MIXED) % 2)), range(48)))
        assert max(widths) >= 8 and len(engine) == 0  # many rows in a step; every row left at its end
        assert engine.valid is None and engine.cache is None
    finally:
        batched.shutdown()
        batched.server_close()
    for i, answer in enumerate(answers):
        assert answer == references[i % len(MIXED)], (i, answer)


def test_pytorch_batch_rows_compute_what_they_would_alone(tiny_model_dir):
    # Rows join a running batch at other lengths (left padding), one leaves (its columns cut):
    # each row's logits are those of its whole sequence run alone.
    import torch

    from mlxft.backends.torch.stream import load_generator as torch_generator

    generator = torch_generator(str(tiny_model_dir))
    engine, seen = generator.batch_engine(), []
    sample = engine.sample
    engine.sample = lambda logits, rows: seen.append(logits.clone()) or sample(logits, rows)
    greedy = Sampling(temperature=0)
    engine.start([([5, 6, 7, 8, 9, 10, 11, 12], greedy, 0)])
    engine.step()
    engine.start([([13, 14], greedy, 0), ([15, 16, 17], greedy, 0)])
    engine.step()
    engine.keep([1, 2])  # the longest row leaves: the padding before the others is cut
    assert engine.valid.shape[1] == 3 + 1 and not engine.valid.all()  # the longer prompt and one step
    engine.step()
    with torch.inference_mode():
        for row, logits in zip(engine.rows, seen[-1]):
            alone = generator.model(input_ids=torch.tensor([row.history[:-1]])).logits[0, -1]
            torch.testing.assert_close(logits, alone, atol=1e-5 * float(alone.abs().max()), rtol=0)


def test_pytorch_refuses_adapters_by_name_in_one_line(tiny_model_dir, adapters):
    from mlxft.backends.torch.stream import load_generator as torch_generator

    with pytest.raises(UserError, match="served on MLX only"):
        start(torch_generator(str(tiny_model_dir)), adapters={"attn8": adapters["attn8"]})


def test_a_generator_without_batching_answers_one_at_a_time(generator):
    watch = StreamOnly(generator)
    server = start(watch)
    try:
        body = {"messages": HELLO, "temperature": 0, "max_tokens": 16}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: ask(server, body, stream=bool(i % 2), path=CHAT), range(6)))
        assert len(set(answers)) == 1 and answers[0][0] and answers[0][1] in ("stop", "length")
        assert watch.calls == 6 and watch.most == 1
        status, error, _ = error_of(server, "POST", CHAT, {**body, "model": "other"})
        assert status == 404
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(UserError, match="one request at a time"):
        start(watch, adapters={"a": "somewhere"})


def neighbour_share(events):
    """A CpuShare whose every reading is a window later with a neighbour on one of two cores: it
    asks for one thread at its second reading. Thread changes and settles are logged in `events`."""
    from mlxft.cpu_share import CpuShare, CpuTimes

    state = {"at": 0.0, "busy": 0}

    def clock():
        state["at"] += 2.5
        return state["at"]

    def read():
        state["busy"] += 250  # 100 ticks a second: one core for 2.5 s
        return CpuTimes(state["busy"], 0, state["at"])

    share = CpuShare(lambda message: None, cores=2, setters=[lambda n: events.append(("threads", n))], read=read,
                     clock=clock, mode="auto")
    share.ticks = 100
    return share


def test_serving_gives_a_neighbour_threads_between_steps_with_nothing_in_flight(server, generator):
    from mlxft.serve.worker import SerialScheduler

    body = {"prompt": "Below is an instruction", "temperature": 0, "max_tokens": 12}
    reference = ask(server, body)
    events, scheduler = [], server.scheduler
    settle = scheduler.engine.settle
    scheduler.engine.settle = lambda: events.append(("settle",)) or settle()
    scheduler.threads = neighbour_share(events)
    try:
        assert ask(server, body) == reference
    finally:
        scheduler.threads = None
        scheduler.engine.settle = settle
    assert events == [("settle",), ("threads", 1)]  # the step ahead finished before the count changed

    events = []
    serial = SerialScheduler(generator, 4, threads=neighbour_share(events))
    try:
        for _ in range(3):  # asked before each answer: the second asks for the change
            assert len(list(serial.submit(lambda: generator.encode("hi"), Sampling(max_tokens=3), None))) > 1
    finally:
        serial.stop()
    assert events == [("threads", 1)]


def test_a_full_queue_gets_429_in_openai_shape(generator):
    server = start(generator, max_batch=1, max_queue=1)
    engine, release = server.scheduler.engine, threading.Event()
    step = engine.step
    engine.step = lambda: release.wait(30) and step()  # the batch's one place stays taken until released
    body = {"prompt": "hi", "temperature": 0, "max_tokens": 3}
    try:
        def until(condition):
            deadline = time.monotonic() + 10
            while not condition():
                assert time.monotonic() < deadline
                time.sleep(0.01)

        with ThreadPoolExecutor(2) as pool:
            # One after the other: sent together, the second could find the first still queued (429).
            held = [pool.submit(call, server, "POST", COMPLETIONS, body)]
            until(lambda: len(engine) == 1)  # the first runs
            held.append(pool.submit(call, server, "POST", COMPLETIONS, body))
            until(lambda: server.scheduler.admission.waiting == 1)  # the second waits
            status, error, headers = error_of(server, "POST", COMPLETIONS, body)
            assert status == 429 and error["code"] == "rate_limit_exceeded" and headers["retry-after"] == "1"
            release.set()
            assert [f.result()[0] for f in held] == [200, 200]
        assert call(server, "POST", COMPLETIONS, body)[0] == 200  # room again
    finally:
        release.set()
        server.shutdown()
        server.server_close()


# Many adapters on one base ----------------------------------------------------------------------

def write_adapter(folder, modules, targets, r, seed, layers=None, dora=False):
    """A random adapter for the tiny model ({path: (out, in)} its linear layers; B not zero, so it
    changes the answers)."""
    import numpy as np

    from mlxft.models.adapters import AdapterSpec, save_adapter

    rng = np.random.default_rng(seed)
    spec = AdapterSpec(r=r, alpha=2 * r, dropout=0.0, target_modules=targets, base_model="", layers=layers, use_dora=dora)
    weights = {}
    for path, (out_dim, in_dim) in modules.items():
        if path.rsplit(".", 1)[-1] in targets and (layers is None or int(path.split(".")[2]) in layers):
            tensors = (rng.normal(0, 0.3, (r, in_dim)), rng.normal(0, 0.3, (out_dim, r)))
            weights[path] = tensors + ((rng.uniform(0.5, 1.5, out_dim),) if dora else ())
    return save_adapter(folder, spec, weights)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Four adapters of different ranks, targets and layers, one DoRA: {name: folder}."""
    from mlxft.backends.mlx.lora import linear_modules

    modules = linear_modules(load_generator(str(tiny_model_dir)).model)
    root = tmp_path_factory.mktemp("adapters")
    return {
        "attn8": write_adapter(root / "attn8", modules, ["q_proj", "v_proj"], 8, 1),
        "mlp2": write_adapter(root / "mlp2", modules, ["gate_proj", "down_proj"], 2, 2, layers=[1]),
        "all4": write_adapter(root / "all4", modules, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4, 3),
        "dora": write_adapter(root / "dora", modules, ["q_proj", "o_proj", "up_proj"], 4, 4, dora=True),
    }


@pytest.fixture
def own_generator(tiny_model_dir):
    """A model of its own: serving adapters wraps the model's layers."""
    return load_generator(str(tiny_model_dir))


def test_requests_for_different_adapters_share_a_batch(own_generator, adapters, tiny_model_dir, monkeypatch):
    server = start(own_generator, adapters=adapters)
    try:
        listing = json.loads(call(server, "GET", "/v1/models")[2])
        assert [m["id"] for m in listing["data"]] == [server.model_id, *adapters]
        body = {"prompt": "Below is an instruction", "temperature": 0, "max_tokens": 16}
        names = [None, *adapters]
        alone = {name: ask(server, {**body, **({"model": name} if name else {})}) for name in names}
        assert len({answer[0] for answer in alone.values()}) == len(names)  # every adapter changes the answer
        for name, path in adapters.items():  # the per-row layer computes what the adapter applied alone does
            applied = load_generator(str(tiny_model_dir), path)
            text = "".join(p.text for p in applied.stream(applied.encode(body["prompt"]), Sampling(max_tokens=16)))
            assert text == alone[name][0], name
        assert post(server, COMPLETIONS, {**body, "model": "attn8"})["model"] == "attn8"

        engine, mixes = server.scheduler.engine, []
        step = engine.step
        monkeypatch.setattr(engine, "step", lambda: mixes.append({r.slot for r in engine.rows}) or step())
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda i: ask(server, {**body, **({"model": names[i % 5]} if names[i % 5] else {})},
                                                  stream=bool(i % 3)), range(40)))
        assert all(answer == alone[names[i % 5]] for i, answer in enumerate(answers))
        assert max(map(len, mixes)) >= 4  # rows of several adapters (and the base) in one step
        status, error, _ = error_of(server, "POST", COMPLETIONS, {**body, "model": "nope"})
        assert status == 404 and error["code"] == "model_not_found"
    finally:
        server.shutdown()
        server.server_close()


def test_adapters_are_added_and_removed_at_run_time_with_the_api_key(own_generator, adapters):
    body = {"prompt": "Below is an instruction", "temperature": 0, "max_tokens": 8}
    generator = own_generator
    server = start(generator)
    try:  # without an API key nobody may add one
        status, error, _ = error_of(server, "POST", "/v1/adapters", {"name": "x", "path": str(adapters["attn8"])})
        assert status == 403 and error["code"] == "api_key_required"
    finally:
        server.shutdown()
        server.server_close()
    server = start(generator, api_key="k", default_adapter=adapters["mlp2"])
    key = {"Authorization": "Bearer k"}
    try:
        default = post(server, COMPLETIONS, body, headers=key)["choices"][0]["text"]
        assert error_of(server, "POST", "/v1/adapters", {"name": "x", "path": str(adapters["attn8"])})[0] == 401
        added = post(server, "/v1/adapters", {"name": "x", "path": str(adapters["attn8"])}, headers=key)
        assert added["id"] == "x"
        assert [m["id"] for m in json.loads(call(server, "GET", "/v1/models", headers=key)[2])["data"]] == [server.model_id, "x"]
        with_x = post(server, COMPLETIONS, {**body, "model": "x"}, headers=key)["choices"][0]["text"]
        assert with_x != default
        for bad, status in (({"name": "x", "path": str(adapters["all4"])}, 409), ({"name": "y", "path": "/no/such"}, 400),
                            ({"name": "bad name", "path": str(adapters["all4"])}, 400), ({"name": "y"}, 400)):
            assert error_of(server, "POST", "/v1/adapters", bad, headers=key)[0] == status, bad
        assert call(server, "DELETE", "/v1/adapters/x", headers=key)[0] == 200
        status, error, _ = error_of(server, "POST", COMPLETIONS, {**body, "model": "x"}, headers=key)
        assert status == 404
        assert error_of(server, "DELETE", "/v1/adapters/x", headers=key)[0] == 404
        assert error_of(server, "DELETE", f"/v1/adapters/{server.model_id}", headers=key)[0] == 400
        post(server, "/v1/adapters", {"name": "x2", "path": str(adapters["attn8"])}, headers=key)  # its slot is reused
        assert post(server, COMPLETIONS, {**body, "model": "x2"}, headers=key)["choices"][0]["text"] == with_x
        assert post(server, COMPLETIONS, body, headers=key)["choices"][0]["text"] == default
    finally:
        server.shutdown()
        server.server_close()


def test_adapter_options(tmp_path, adapters):
    assert adapter_options(["a=/x", "/y", "b=/z"]) == (Path("/y"), {"a": Path("/x"), "b": Path("/z")})
    with pytest.raises(UserError, match="twice"):
        adapter_options(["a=/x", "a=/z"])
    with pytest.raises(UserError, match="without a name"):
        adapter_options(["/x", "/y"])
    default, named = adapter_options([], adapters["attn8"].parent)
    assert default is None and sorted(named) == ["all4", "attn8", "dora", "mlp2"]
    with pytest.raises(UserError, match="no subfolder"):
        adapter_options([], tmp_path)


def test_loopback_by_default_and_a_warning_without_key(tiny_model_dir, monkeypatch):
    from mlxft.cli import cli

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.9") and not is_loopback("example.org")
    monkeypatch.setattr(ModelServer, "serve_forever", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_model_dir), "--port", "0", "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "warning" in result.output and "--api-key" in result.output
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_model_dir), "--port", "0"])
    assert result.exit_code == 0 and "warning" not in result.output and "http://127.0.0.1:" in result.output


def test_the_server_on_pytorch_answers_the_openai_client_as_on_mlx(tiny_model_dir, server):
    from openai import OpenAI

    from mlxft.backends.torch.stream import load_generator as torch_generator

    def answers(server):
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        ask = {"model": server.model_id, "messages": HELLO, "temperature": 0, "max_tokens": 16}
        whole = client.chat.completions.create(**ask)
        chunks = list(client.chat.completions.create(**ask, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        text = client.completions.create(model=server.model_id, prompt="Below is an instruction", temperature=0, max_tokens=12)
        return (whole.choices[0].message.content, whole.choices[0].finish_reason, whole.usage.completion_tokens,
                whole.usage.prompt_tokens, streamed, text.choices[0].text, len(chunks))

    on_torch = start(torch_generator(str(tiny_model_dir)))
    try:
        got = answers(on_torch)
    finally:
        on_torch.shutdown()
        on_torch.server_close()
    assert got == answers(server)
    assert got[0] == got[4] and got[0] and got[6] > 4 and got[5].strip()  # streamed in pieces, the same text
