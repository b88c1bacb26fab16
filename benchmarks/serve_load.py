"""Load test for `mlxft serve` against mlx-lm's server (mlx_lm.server), every answer checked.

    python benchmarks/serve_load.py                                   # built-in model
    python benchmarks/serve_load.py --model ~/.cache/mlxft-real/SmolLM2-135M-Instruct --max-tokens 32
    python benchmarks/serve_load.py --backend torch                   # PyTorch: batched vs one at a time

Each server runs as its own process on the same model folder, one after the other, with the same
environment (common.side_environment: the same thread counts and the OpenBLAS preload the `mlxft`
command uses, so both MLX processes multiply matrices with the same library). For each number of
concurrent clients (1, 8, 32, 64), every client sends --requests text completions in turn, half
of them streamed, over a few different prompts, greedy. Before the load, each prompt is asked
alone: every answer under load must equal that single-request reference, token for token.
Reported per level: requests/s, generated tokens/s, p50/p95 latency, p50/p95 time to the first
streamed token.

Then the mixed-adapter load on mlxft alone (mlx-lm's server holds one adapter at a time): four
random adapters of the model served at once (--adapters-dir), 32 clients spread over them against
the same 32 clients all on one adapter; every answer equal to its adapter's single-request one.

With --backend torch: `mlxft serve --backend torch` batched (--max-batch 32) against the same
server answering one request at a time (--max-batch 1), both checked against single requests;
no peer and no named adapters (those are MLX's).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = common.ROOT
PROMPTS = [
    "Below is an instruction that describes a task.",
    "Will this user like the article?",
    "Write a short news headline about the weather.",
    "The user read these articles before:",
]
LEVELS = (1, 8, 32, 64)


def wait_ready(url: str, process: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited (code {process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            connection = http.client.HTTPConnection(host, int(port), timeout=5)
            connection.request("GET", "/v1/models")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"the server at {url} did not answer within {seconds:.0f} s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict, log: Path, port: int) -> tuple[subprocess.Popen, str]:
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command)}", flush=True)
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, log)
    return process, url


def ask(url: str, prompt: str, stream: bool, max_tokens: int, model: str | None = None) -> tuple[str, float, float | None]:
    """(answer, latency, time to the first streamed text or None); raises when malformed."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = {"prompt": prompt, "temperature": 0, "max_tokens": max_tokens, "stream": stream}
    if model is not None:
        body["model"] = model
    start = time.perf_counter()
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise AssertionError(f"HTTP {response.status}: {response.read()[:300]!r}")
    if not stream:
        text = json.loads(response.read())["choices"][0]["text"]
        connection.close()
        return text, time.perf_counter() - start, None
    pieces, first = [], None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices", []):
            if choice.get("text"):
                first = first if first is not None else time.perf_counter() - start
                pieces.append(choice["text"])
    connection.close()
    return "".join(pieces), time.perf_counter() - start, first


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def run_load(url: str, clients: int, requests: int, max_tokens: int, references: dict, tokens: dict,
             models: list[str | None] = (None,)) -> dict:
    """Every client asks `requests` times; each answer must equal references[(model, prompt)]."""
    resets = []

    def client(i: int) -> list[tuple]:
        results = []
        for j in range(requests):
            prompt, model = PROMPTS[(i + j) % len(PROMPTS)], models[i % len(models)]
            for attempt in range(20):
                try:
                    text, latency, first = ask(url, prompt, (i + j) % 2 == 1, max_tokens, model)
                    break
                except (ConnectionResetError, ConnectionRefusedError):
                    # mlx_lm.server listens with the standard library's backlog of 5 connections: a burst
                    # of clients is reset. Counted, and asked again, as a client library would.
                    resets.append(1)
                    time.sleep(0.05 * (attempt + 1))
            else:
                raise AssertionError(f"client {i}: the connection was reset 20 times")
            if text != references[(model, prompt)]:
                raise AssertionError(f"client {i}, {model or 'base'}: the answer differs from the single-request one: {text!r}")
            results.append((latency, first, tokens[(model, prompt)]))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    latencies, firsts = [r[0] for r in results], [r[1] for r in results if r[1] is not None]
    return {"clients": clients, "requests": len(results), "seconds": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 2), "tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
            "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3),
            "ttft_p50_s": round(percentile(firsts, 50), 3), "ttft_p95_s": round(percentile(firsts, 95), 3),
            "connections_reset": len(resets)}


def references_of(url: str, max_tokens: int, tokenizer, models: list[str | None] = (None,)) -> tuple[dict, dict]:
    """Each (model, prompt) asked alone: the answer and its token count."""
    answers, counts = {}, {}
    for model in models:
        for prompt in PROMPTS:
            answers[(model, prompt)] = ask(url, prompt, False, max_tokens, model)[0]
            counts[(model, prompt)] = len(tokenizer.encode(answers[(model, prompt)], add_special_tokens=False))
    return answers, counts


def side(name: str, command: list[str], env: dict, work: Path, port: int, args, tokenizer) -> list[dict]:
    process, url = start(command, env, work / f"{name}.log", port)
    try:
        references, tokens = references_of(url, args.max_tokens, tokenizer)
        rows = []
        for clients in args.levels:
            row = run_load(url, clients, args.requests, args.max_tokens, references, tokens)
            print(f"  {name}: {row}", flush=True)
            rows.append(row)
        return rows
    finally:
        process.terminate()
        process.wait(timeout=30)


def write_adapters(model_dir: Path, folder: Path) -> list[str]:
    """Four random adapters of the model, of different ranks and targets: their names."""
    import numpy as np

    from mlxft.backends.mlx.lora import linear_modules
    from mlxft.backends.mlx.stream import load_generator
    from mlxft.models.adapters import AdapterSpec, save_adapter

    modules = linear_modules(load_generator(str(model_dir)).model)
    kinds = {"attn-r8": (["q_proj", "v_proj"], 8), "mlp-r4": (["gate_proj", "up_proj", "down_proj"], 4),
             "all-r16": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16),
             "qo-r2": (["q_proj", "o_proj"], 2)}
    for seed, (name, (targets, r)) in enumerate(kinds.items()):
        rng = np.random.default_rng(seed)
        weights = {path: (rng.normal(0, 0.2, (r, i)), rng.normal(0, 0.2, (o, r))) for path, (o, i) in modules.items()
                   if path.rsplit(".", 1)[-1] in targets}
        save_adapter(folder / name, AdapterSpec(r, 2 * r, 0.0, targets, str(model_dir)), weights)
    return list(kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", help="'builtin' or a model folder both servers load")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", default="1",
                        help="BLAS/OpenMP threads of each server, or 'auto': none set, so mlxft serve chooses them "
                             "(mlxft.cpu_share: fewer while other processes, the clients among them, take cores)")
    parser.add_argument("--skip-peer", action="store_true", help="mlxft only")
    parser.add_argument("--backend", choices=("mlx", "torch"), default="mlx", help="the backend mlxft serves with")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="numbers of concurrent clients, comma-separated")
    parser.add_argument("--skip-adapters", action="store_true", help="no mixed-adapter load")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    args.levels = [int(n) for n in args.levels.split(",")]
    if args.threads != "auto" and not args.threads.isdigit():
        parser.error(f"--threads {args.threads}: a number or 'auto'")

    import mlx.core as mx
    import mlx_lm

    from mlxft.models.files import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    env = common.side_environment(None if args.threads == "auto" else int(args.threads), fast_blas=True)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    results = {"model": str(args.model), "max_tokens": args.max_tokens, "requests_per_client": args.requests,
               "threads": args.threads, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "cpus": os.cpu_count()}
    try:
        port = free_port()
        ours = [sys.executable, "-m", "mlxft", "serve", "--model", str(model_dir), "--port", str(port), "--quiet",
                "--max-batch", "32", "--max-queue", "256"]
        if args.backend == "torch":
            results["backend"] = "torch"
            results["mlxft_torch"] = side("mlxft torch", [*ours, "--backend", "torch"], env, work, port, args, tokenizer)
            port = free_port()
            serial = [*ours[:ours.index("--port")], "--port", str(port), "--quiet", "--max-batch", "1", "--backend", "torch"]
            results["mlxft_torch_one_at_a_time"] = side("mlxft torch, --max-batch 1", serial, env, work, port, args, tokenizer)
            print(json.dumps(results, indent=1))
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
            return
        results["mlxft"] = side("mlxft", ours, env, work, port, args, tokenizer)
        if not args.skip_peer:
            port = free_port()
            theirs = [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--port", str(port),
                      "--decode-concurrency", "32", "--log-level", "WARNING"]
            results["mlx_lm_server"] = side("mlx_lm.server", theirs, env, work, port, args, tokenizer)

        if args.skip_adapters:
            print(json.dumps(results, indent=1))
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
            return
        names = write_adapters(model_dir, work / "adapters")
        port = free_port()
        process, url = start([*ours[:ours.index("--port")], "--adapters-dir", str(work / "adapters"), "--port", str(port),
                              "--quiet", "--max-batch", "32"], env, work / "mlxft-adapters.log", port)
        try:
            references, tokens = references_of(url, args.max_tokens, tokenizer, names)
            assert len({references[(n, PROMPTS[0])] for n in names}) == len(names), "the adapters do not change the answers"
            one = run_load(url, 32, args.requests, args.max_tokens, references, tokens, names[:1])
            mixed = run_load(url, 32, args.requests, args.max_tokens, references, tokens, names)
            results["adapters"] = {"one_adapter": one, "four_adapters": mixed}
            print(f"  one adapter: {one}\n  four adapters: {mixed}", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
