"""`mlxft serve` over real HTTP on loopback: OpenAI shapes, streaming, errors, API key, concurrency."""

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

from mlxft.backends.mlx.stream import load_generator
from mlxft.serve.server import ModelServer, is_loopback, make_server

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
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == answer["usage"]
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


class Overlaps:
    """Wraps the generator to record how many answers are being generated at once."""

    def __init__(self, inner):
        self.inner, self.active, self.most, self.calls, self.mutex = inner, 0, 0, 0, threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

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


def test_concurrent_requests_are_answered_whole(server, monkeypatch):
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 16}
    watch = Overlaps(server.generator)
    monkeypatch.setattr(server, "generator", watch)

    def ask(i):
        if i % 2:
            chunks = events(server, CHAT, body)
            return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), chunks[-1]["choices"][0]["finish_reason"]
        answer = post(server, CHAT, body)
        return answer["choices"][0]["message"]["content"], answer["choices"][0]["finish_reason"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(set(answers)) == 1  # the same prompt at temperature 0: the same answer, never interleaved
    assert answers[0][0] and answers[0][1] in ("stop", "length")
    assert watch.calls == 8 and watch.most == 1  # one generation at a time


def test_loopback_by_default_and_a_warning_without_key(tiny_model_dir, monkeypatch):
    from mlxft.cli import cli

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.9") and not is_loopback("example.org")
    monkeypatch.setattr(ModelServer, "serve_forever", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_model_dir), "--port", "0", "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "warning" in result.output and "--api-key" in result.output
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_model_dir), "--port", "0"])
    assert result.exit_code == 0 and "warning" not in result.output and "http://127.0.0.1:" in result.output
