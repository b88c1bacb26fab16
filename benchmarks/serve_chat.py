"""Chat serving with a long shared system prompt: `mlxft serve` (prompt cache on, and off) against
mlx_lm.server, on the same BLAS.

    python benchmarks/serve_chat.py --model ~/.cache/mlxft-real/SmolLM2-135M-Instruct
    python benchmarks/serve_chat.py                      # built-in model

N clients (--clients) each hold a chat of T turns (--turns) behind one system prompt of about
--system-tokens tokens, resending the whole history every turn, as chat clients do; greedy,
--max-tokens an answer, streamed with usage. Each server runs as its own process with the same
environment (common.side_environment: thread counts and the OpenBLAS preload), one after the other.
Reported per server: requests/s, time to the first streamed token per turn (median and p95), the
cached tokens the server reported, peak resident memory (VmHWM). mlxft's cached answers are checked
against its uncached ones, turn by turn (the exactness of a cache hit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from serve_load import free_port, percentile, start  # noqa: E402

ROOT = common.ROOT


def system_prompt(tokenizer, tokens: int) -> str:
    """House rules made of the bundled news titles, about `tokens` long."""
    titles = [line.split("\t")[3] for line in (ROOT / "data" / "mind-sample" / "news.tsv").read_text().splitlines()]
    lines, k = ["You are the assistant of a news site. Follow these notes when you answer:"], 0
    while len(tokenizer.encode("\n".join(lines))) < tokens:
        lines.append(f"{k + 1}. Readers liked the story \"{titles[k % len(titles)]}\".")
        k += 1
    return "\n".join(lines)


def turn(url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[str, float, int, float]:
    """(answer, time to first token, cached tokens reported, latency) of one streamed chat turn."""
    import http.client

    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = {**({"model": model} if model else {}), "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    connection = http.client.HTTPConnection(host, int(port), timeout=900)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise AssertionError(f"HTTP {response.status}: {response.read()[:300]!r}")
    pieces, first, cached = [], None, 0
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content"):
                first = first if first is not None else time.perf_counter() - began
                pieces.append(choice["delta"]["content"])
        usage = chunk.get("usage")
        if usage:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    connection.close()
    return "".join(pieces), first if first is not None else time.perf_counter() - began, cached, time.perf_counter() - began


def chats(url: str, model: str, system: str, clients: int, turns: int, max_tokens: int) -> dict:
    def client(c: int) -> list[tuple]:
        messages, out = [{"role": "system", "content": system}], []
        for t in range(turns):
            messages.append({"role": "user", "content": f"I am reader {c}. Which story of turn {t} should I read first?"})
            answer, first, cached, latency = turn(url, model, messages, max_tokens)
            out.append((answer, first, cached, latency))
            messages.append({"role": "assistant", "content": answer})
        return out

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - began
    ttft = {t + 1: [r[t][1] for r in results] for t in range(turns)}
    return {"requests_per_s": clients * turns / seconds, "seconds": seconds,
            "ttft_median": {t: statistics.median(v) for t, v in ttft.items()},
            "ttft_p95": {t: percentile(v, 95) for t, v in ttft.items()},
            "cached_tokens": sum(r[2] for rows in results for r in rows),
            "answers": [[r[0] for r in rows] for rows in results]}


def peak_rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def side(name: str, command: list[str], env: dict, work: Path, port: int, args, system: str, model: str) -> dict:
    process, url = start(command, env, work / f"{name.replace(' ', '-')}.log", port)
    try:
        result = chats(url, model, system, args.clients, args.turns, args.max_tokens)
        result["peak_rss_gb"] = peak_rss_gb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(f"{name}: {result['requests_per_s']:.3f} req/s, TTFT by turn "
          + " / ".join(f"{v:.1f}" for v in result["ttft_median"].values()) + f" s, cached {result['cached_tokens']}, "
          f"peak RSS {result['peak_rss_gb']:.2f} GB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from mlxft.models.files import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    system = system_prompt(tokenizer, args.system_tokens)
    env = common.side_environment(args.threads, fast_blas=True)
    work = Path(tempfile.mkdtemp(prefix="serve-chat-"))
    results = {"model": str(args.model), "clients": args.clients, "turns": args.turns, "max_tokens": args.max_tokens,
               "system_tokens": len(tokenizer.encode(system)), "threads": args.threads}
    ours = [sys.executable, "-m", "mlxft", "serve", "--model", str(model_dir), "--quiet", "--max-batch", "32"]
    port = free_port()
    results["mlxft"] = side("mlxft", [*ours, "--port", str(port)], env, work, port, args, system, None)
    port = free_port()
    results["mlxft_uncached"] = side("mlxft --prompt-cache-bytes 0", [*ours, "--port", str(port), "--prompt-cache-bytes", "0"],
                                     env, work, port, args, system, None)
    if not args.skip_peer:
        port = free_port()
        theirs = [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--port", str(port),
                  "--decode-concurrency", "32", "--log-level", "WARNING"]
        results["mlx_lm_server"] = side("mlx_lm.server", theirs, env, work, port, args, system, None)
    same = sum(a == b for x, y in zip(results["mlxft"]["answers"], results["mlxft_uncached"]["answers"]) for a, b in zip(x, y))
    results["cached_equals_uncached"] = f"{same} of {args.clients * args.turns}"
    print(f"mlxft cached answers equal to uncached: {results['cached_equals_uncached']}")
    if "mlx_lm_server" in results:
        print(f"requests/s: mlxft / mlx_lm.server = {results['mlxft']['requests_per_s'] / results['mlx_lm_server']['requests_per_s']:.2f}x")
    print("turn 2+ TTFT, cached over uncached mlxft: " + ", ".join(
        f"turn {t}: {results['mlxft']['ttft_median'][t] / results['mlxft_uncached']['ttft_median'][t]:.2f}"
        for t in range(2, args.turns + 1)))
    (args.out or work / "serve_chat.json").write_text(json.dumps(results, indent=1))
    print(f"saved {args.out or work / 'serve_chat.json'}")


if __name__ == "__main__":
    main()
