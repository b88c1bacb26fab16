"""An LLM judge: each model response scored 0-100 against the reference answer by another model
behind an Ollama or OpenAI-compatible endpoint (`mlxft serve` is one).

    mlxft eval judge --responses responses.json --judge-url http://127.0.0.1:11434 --judge-model qwen3:8b

The prompt is fixed and the judge runs at temperature 0 with a seed, so a rerun asks the same
thing. Reasoning models put a <think>...</think> block before their answer; it is skipped. A reply
with no score in 0-100 is counted and listed, never dropped silently, and never counted as 0.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import numpy as np

from mlxft.errors import UserError

JUDGE_PROMPT = """You are grading a model's answer against a reference answer.

Question:
{question}

Reference answer:
{reference}

Model's answer:
{response}

How well does the model's answer match the reference in meaning and correctness? Reply with one
whole number from 0 (wrong or unrelated) to 100 (fully correct), and nothing else."""

THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d+)?)(?![\w.]*\d)")
APIS = ("ollama", "openai")


def question_of(row: dict) -> str:
    """The question as the model saw it: Alpaca instruction (+ input), or prompt."""
    if "instruction" in row:
        return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if "prompt" in row:
        return row["prompt"]
    raise UserError("a judged row needs 'instruction' (Alpaca) or 'prompt', with a reference answer and 'model_response'")


def reference_of(row: dict) -> str:
    for field in ("output", "completion", "reference", "answer"):
        if field in row:
            return row[field]
    raise UserError("a judged row needs a reference answer: 'output', 'completion', 'reference' or 'answer'")


def parse_score(reply: str) -> float | None:
    """The first number from 0 to 100 after any <think> block; None when there is none. An
    unclosed <think> means the judge never got to its answer."""
    text = THINK.sub("", reply)
    if re.search(r"<think>", text, re.IGNORECASE):
        return None
    for match in NUMBER.finditer(text):
        value = float(match.group(1))
        if 0 <= value <= 100:
            return value
    return None


def ask(url: str, model: str, prompt: str, *, api: str, seed: int, api_key: str | None = None,
        timeout: float = 300.0) -> str:
    """One judge reply at temperature 0."""
    messages = [{"role": "user", "content": prompt}]
    if api == "ollama":
        endpoint = url.rstrip("/") + "/api/chat"
        body = {"model": model, "messages": messages, "stream": False, "options": {"temperature": 0, "seed": seed}}
    elif api == "openai":
        base = url.rstrip("/")
        endpoint = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        body = {"model": model, "messages": messages, "temperature": 0, "seed": seed, "stream": False}
    else:
        raise UserError(f"--api must be one of {', '.join(APIS)}, not {api!r}")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise UserError(f"judge at {endpoint} answered {e.code}: {e.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise UserError(f"cannot reach the judge at {endpoint}: {getattr(e, 'reason', e)}") from None
    except json.JSONDecodeError:
        raise UserError(f"judge at {endpoint} did not answer JSON") from None
    try:
        return payload["message"]["content"] if api == "ollama" else payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise UserError(f"judge at {endpoint}: unexpected reply shape {str(payload)[:200]}") from None


def judge(rows: list[dict], url: str, model: str, *, api: str = "ollama", seed: int = 0,
          api_key: str | None = None, progress=None) -> tuple[list[dict], dict]:
    """(rows with judge_score and judge_reply added, report)."""
    judged = []
    for row in rows:
        if "model_response" not in row:
            raise UserError("each row needs 'model_response' (make them with `mlxft eval generate`)")
        prompt = JUDGE_PROMPT.format(question=question_of(row), reference=reference_of(row), response=row["model_response"])
        reply = ask(url, model, prompt, api=api, seed=seed, api_key=api_key)
        judged.append({**row, "judge_score": parse_score(reply), "judge_reply": reply})
        if progress:
            progress()
    return judged, report(judged)


def report(judged: list[dict]) -> dict:
    scores = np.array([r["judge_score"] for r in judged if r["judge_score"] is not None], dtype=float)
    unparseable = [i for i, r in enumerate(judged) if r["judge_score"] is None]
    # Ten bins of ten points; 100 falls in the last.
    counts = np.histogram(scores, bins=np.arange(0, 101, 10))[0] if len(scores) else np.zeros(10, int)
    return {
        "mean": float(scores.mean()) if len(scores) else float("nan"),
        "count": int(len(scores)),
        "rows": len(judged),
        "unparseable": len(unparseable),
        "unparseable_rows": unparseable,
        "histogram": {f"{lo}-{lo + 10 if lo < 90 else 100}": int(c) for lo, c in zip(range(0, 100, 10), counts)},
    }
