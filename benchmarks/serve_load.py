"""Load test for `mlxft serve`: many concurrent clients on loopback, every answer checked.

    python benchmarks/serve_load.py                               # built-in model, 32 clients
    python benchmarks/serve_load.py --model PATH --clients 32 --requests 4 --max-tokens 32

Starts the real command (`python -m mlxft serve --port 0`, so with its fast BLAS on Linux) as a
subprocess, reads its URL, and sends requests from N threads at once: chat and text completions,
streamed and not, in turn. Sampling is greedy, so every answer to the same request must equal a
reference answer taken before the load starts: an answer cut short or mixed with another fails.
Prints p50 / p95 latency, requests/s and generated tokens/s. The server answers one request at
a time (see mlxft/serve/server.py), so latency grows with the queue while throughput holds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Will this user like the article?"}]}),
    "text": ("/v1/completions", {"prompt": "Below is an instruction that describes a task."}),
}


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, "-m", "mlxft", "serve", "--model", model, "--port", "0", "--quiet"],
                               cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        found = re.search(r"at (http://\S+) ", line)
        if found:
            # Keep draining stderr, or a chatty server would block on a full pipe.
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, found.group(1)
    raise SystemExit("the server did not start:\n" + "".join(lines))


def ask(url: str, kind: str, stream: bool, max_tokens: int) -> tuple[str, int, float, float]:
    """(answer, completion tokens, latency, time to first byte of the answer); raises when malformed."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    path, body = REQUESTS[kind]
    body = {**body, "temperature": 0, "max_tokens": max_tokens, "stream": stream, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    first = time.perf_counter() - start
    payload = response.read().decode()
    latency = time.perf_counter() - start
    connection.close()
    if response.status != 200:
        raise AssertionError(f"HTTP {response.status}: {payload}")
    if not stream:
        answer = json.loads(payload)
        choice = answer["choices"][0]
        assert answer["object"] == ("chat.completion" if kind == "chat" else "text_completion")
        assert choice["finish_reason"] in ("stop", "length")
        usage = answer["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        return (choice["message"]["content"] if kind == "chat" else choice["text"]), usage["completion_tokens"], latency, first
    blocks = payload.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""], "stream does not end with data: [DONE]"
    chunks = [json.loads(block.removeprefix("data: ")) for block in blocks[:-2]]
    assert len({c["id"] for c in chunks}) == 1, "chunks of one answer carry different ids"
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[-1]["finish_reason"] in ("stop", "length")
    text = "".join((c["delta"].get("content") or "") if kind == "chat" else c["text"] for c in choices)
    return text, chunks[-1]["usage"]["completion_tokens"], latency, first


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    process, url = start_server(args.model)
    try:
        reference = {kind: ask(url, kind, False, args.max_tokens)[0] for kind in REQUESTS}  # also warms up

        def client(i: int) -> list[tuple]:
            results = []
            for j in range(args.requests):
                kind, stream = ("chat", "text")[(i + j) % 2], (i // 2 + j) % 2 == 1
                text, tokens, latency, first = ask(url, kind, stream, args.max_tokens)
                assert text == reference[kind], f"client {i}: {kind} answer differs from the reference: {text!r}"
                results.append((latency, first, tokens, stream))
            return results

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
        wall = time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(timeout=30)

    latencies = [r[0] for r in results]
    first_bytes = [r[1] for r in results if r[3]]
    tokens = sum(r[2] for r in results)
    print(f"model {args.model}: {args.clients} concurrent clients x {args.requests} requests, "
          f"max_tokens {args.max_tokens}, greedy; all {len(results)} answers complete and identical to the reference")
    print(f"latency p50 {percentile(latencies, 50):.3f} s, p95 {percentile(latencies, 95):.3f} s, max {max(latencies):.3f} s")
    print(f"streamed: time to first byte p50 {percentile(first_bytes, 50):.3f} s")
    print(f"throughput {len(results) / wall:.1f} requests/s, {tokens / wall:.0f} generated tokens/s ({wall:.2f} s wall)")


if __name__ == "__main__":
    main()
