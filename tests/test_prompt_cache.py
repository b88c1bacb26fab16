"""The prompt cache of `mlxft serve`: what it keeps and gives back (pure), and what a server with it
answers: a hit equals a miss, adapters never share entries, cached tokens are reported."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mlxft.serve.prompt_cache import PromptCache, common_prefix


def test_the_longest_common_beginning_wins_and_the_last_token_always_runs():
    cache = PromptCache(1000)
    cache.insert("base", [1, 2, 3, 4, 5], "A", 10)
    cache.insert("base", [1, 2, 9], "B", 10)
    assert cache.lookup("base", [1, 2, 3, 7, 7]) == (3, "A")  # a beginning of an entry, not the whole
    assert cache.lookup("base", [1, 2, 9, 9]) == (3, "B")
    assert cache.lookup("base", [1, 2, 3, 4, 5]) == (4, "A")  # the same prompt: its last token still runs
    assert cache.lookup("base", [8, 1, 2]) == (0, None)
    figures = cache.figures()
    assert figures["hits"] == 3 and figures["misses"] == 1 and figures["cached_tokens"] == 10 and figures["prompt_tokens"] == 17


def test_entries_of_one_adapter_never_serve_another_or_the_base():
    cache = PromptCache(1000)
    cache.insert(1, [1, 2, 3, 4], "under adapter 1", 10)
    assert cache.lookup(2, [1, 2, 3, 4, 5]) == (0, None) and cache.lookup(0, [1, 2, 3, 4, 5]) == (0, None)
    assert cache.lookup(1, [1, 2, 3, 4, 5]) == (4, "under adapter 1")
    cache.forget(1)
    assert cache.lookup(1, [1, 2, 3, 4, 5]) == (0, None) and cache.bytes == 0


def test_the_byte_bound_holds_under_a_flood_and_the_least_recently_used_leave_first():
    cache = PromptCache(100)
    rng = np.random.default_rng(0)
    for i in range(500):  # distinct prompts of 10 to 30 bytes
        cache.insert("base", rng.integers(0, 1000, 8).tolist(), i, int(rng.integers(10, 31)))
        assert cache.bytes <= 100 and cache.bytes == sum(e.nbytes for e in cache.entries.values())
    assert cache.figures()["evictions"] >= 490
    small = PromptCache(30)
    small.insert("base", [1, 1], "old", 10)
    small.insert("base", [2, 2], "used", 10)
    small.insert("base", [3, 3], "new", 10)
    assert small.lookup("base", [1, 1, 0]) == (2, "old")  # used: now the most recent
    small.insert("base", [4, 4], "newest", 10)
    assert [e.state for e in small.entries.values()] == ["new", "old", "newest"]  # "used" was the least recent
    assert small.insert("base", [5], "too big", 31) is False and len(small.entries) == 3


def test_an_entry_is_superseded_by_a_longer_one_of_the_same_adapter():
    cache = PromptCache(1000)
    cache.insert("base", [1, 2, 3], "turn 1", 10)
    cache.insert("other", [1, 2, 3], "other adapter", 10)
    cache.insert("base", [1, 2, 3, 4, 5], "turn 2", 20)
    assert [e.state for e in cache.entries.values()] == ["other adapter", "turn 2"] and cache.bytes == 30
    assert common_prefix(np.array([1, 2]), np.array([1, 2, 3])) == 2 and common_prefix(np.array([]), np.array([1])) == 0


# A server with the cache ------------------------------------------------------------------------

SYSTEM = "You answer questions about the news. " * 12  # a long shared beginning, as chat clients send


@pytest.fixture(scope="module")
def generators(tiny_model_dir):
    from mlxft.backends.mlx.stream import load_generator

    return load_generator(str(tiny_model_dir)), load_generator(str(tiny_model_dir))


def start(generator, **kwargs):
    from mlxft.serve.server import make_server

    server = make_server(generator, host="127.0.0.1", port=0, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def chat(server, messages, stream=False, **extra):
    from openai import OpenAI

    host, port = server.server_address[:2]
    client = OpenAI(base_url=f"http://{host}:{port}/v1", api_key="none", max_retries=0)
    body = dict(model=extra.pop("model", server.model_id), messages=messages, temperature=0, max_tokens=12, **extra)
    if not stream:
        answer = client.chat.completions.create(**body)
        return answer.choices[0].message.content, answer.usage.prompt_tokens_details.cached_tokens
    text, cached = [], None
    for chunk in client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return "".join(text), cached


def conversations(n):
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: will user {i} like it?"}]
            for i in range(n)]


def three_turns(server, first):
    """A chat of three turns that resends its history, as clients do: [(answer, cached tokens)]."""
    messages, out = list(first), []
    for turn in range(3):
        answer, cached = chat(server, messages, stream=bool(turn % 2))
        out.append((answer, cached))
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And then {turn}?"}]
    return out


def test_a_hit_answers_as_a_miss_and_reports_its_cached_tokens(generators):
    cached_server, plain_server = start(generators[0]), start(generators[1], prompt_cache_bytes=0)
    try:
        for first in conversations(3):
            with_cache, without = three_turns(cached_server, first), three_turns(plain_server, first)
            assert [a for a, _ in with_cache] == [a for a, _ in without]  # greedy, token for token
            assert all(cached == 0 for _, cached in without)
            assert all(cached > 0 for _, cached in with_cache[1:]), with_cache  # turns 2 and 3 hit
        # the 2nd and 3rd chats' first turns hit the system prompt the 1st left behind
        health = json.loads(__import__("urllib.request").request.urlopen(f"{cached_server.url}/health").read())
        figures = health["prompt_cache"]
        assert figures["hits"] >= 8 and figures["cached_tokens"] > 0.5 * figures["prompt_tokens"], figures
        assert "prompt_cache" not in json.loads(__import__("urllib.request").request.urlopen(f"{plain_server.url}/health").read())
    finally:
        for server in (cached_server, plain_server):
            server.shutdown()
            server.server_close()


def test_concurrent_chats_sharing_a_system_prompt_answer_as_alone(generators):
    server = start(generators[0])
    try:
        firsts = conversations(12)
        alone = [chat(server, first)[0] for first in firsts]
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda first: chat(server, first), firsts))
        assert [text for text, _ in together] == alone
        assert all(cached > 0 for _, cached in together)  # each started from an earlier chat's system prompt
    finally:
        server.shutdown()
        server.server_close()


def test_an_adapters_entries_serve_only_that_adapter(tiny_model_dir, tmp_path):
    from test_serve import write_adapter

    from mlxft.backends.mlx.lora import linear_modules
    from mlxft.backends.mlx.stream import load_generator

    generator = load_generator(str(tiny_model_dir))
    path = write_adapter(tmp_path / "a", linear_modules(generator.model), ["q_proj", "v_proj"], 4, 1)
    server = start(generator, adapters={"tuned": path})
    try:
        first = conversations(1)[0]
        base_answer, _ = chat(server, first)
        tuned_answer, cached = chat(server, first, model="tuned")
        assert cached == 0 and tuned_answer != base_answer  # the base's entry did not serve the adapter
        again, cached = chat(server, first, model="tuned")
        assert again == tuned_answer and cached > 0
        engine = server.scheduler.engine
        assert {e.adapter for e in engine.prompt_cache.entries.values()} == {0, engine.adapter_keys[engine.slot("tuned")]}
    finally:
        server.shutdown()
        server.server_close()


def test_a_cancelled_request_leaves_its_prompt_but_no_half_made_answer(generators):
    from mlxft.generation import Sampling

    server = start(generators[0], prompt_cache_bytes=1 << 30)
    try:
        scheduler = server.scheduler
        before = scheduler.prompt_cache.figures()
        ids = generators[0].encode("Tell me a long story about the weather.")
        job = scheduler.submit(lambda: ids, Sampling(max_tokens=200), None)
        items = iter(job)
        next(items)  # the prompt's token count: the request is in the batch
        next(items)  # a first piece of the answer
        job.cancel()
        list(items)
        scheduler.call(lambda: None)  # a step later: the row has left
        entries = list(scheduler.prompt_cache.entries.values())
        assert len(entries) == before["entries"] + 1 and entries[-1].tokens.tolist() == ids  # the prompt alone
        assert entries[-1].state[0][0].shape[2] == len(ids)
    finally:
        server.shutdown()
        server.server_close()


def test_a_warmed_system_prompt_serves_the_first_chat_behind_it(generators):
    warmed, cold = start(generators[0], warm_prompt=SYSTEM), start(generators[1])
    try:
        assert warmed.warmed_tokens > 40  # the rendered system turn, up to where the user's message begins
        first = conversations(1)[0]
        (answer, cached), (cold_answer, cold_cached) = chat(warmed, first), chat(cold, first)
        assert answer == cold_answer  # greedy: a warmed beginning answers as one computed now
        assert cold_cached == 0 and warmed.warmed_tokens - 2 <= cached <= warmed.warmed_tokens, (cached, warmed.warmed_tokens)
        # a chat with another system prompt finds only the template's own beginning warmed
        other = chat(warmed, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])[1]
        assert other < 0.3 * warmed.warmed_tokens, (other, warmed.warmed_tokens)
    finally:
        for server in (warmed, cold):
            server.shutdown()
            server.server_close()


def test_warming_needs_the_prompt_cache(generators):
    from mlxft.errors import UserError

    with pytest.raises(UserError, match="--warm-prompt fills the prompt cache, which this server does not have"):
        start(generators[1], warm_prompt=SYSTEM, prompt_cache_bytes=0)
