"""OpenAI's request and response shapes for /v1/chat/completions and /v1/completions.

Requests are checked field by field so a client learns what it got wrong (HTTP 400 with
{"error": {"message", "type", "code", "param"}}); unknown fields are ignored, as OpenAI-style
servers do. Extensions beyond OpenAI's fields, as mlx-lm's server and vLLM accept them: top_k,
repetition_penalty, and `input` (the Alpaca input that goes with the last user message).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from mlxft.generation import DEFAULT_MAX_TOKENS, Sampling

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4  # OpenAI's limit
MAX_INT32 = 2**31 - 1
MAX_SEED = 2**64 - 1  # MLX seeds are unsigned 64-bit


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


@dataclass
class GenerationRequest:
    chat: bool
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] = field(default_factory=list)
    prompt: str = ""
    input: str = ""
    model: str | None = None  # the adapter asked for; None: the model served by default


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_constant=_not_a_number)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except (ValueError, RecursionError) as e:  # NaN/Infinity, an integer too long to read, nesting too deep
        reason = str(e).splitlines()[0] if str(e) else "nested too deeply"
        raise ApiError(400, f"the request body is not valid JSON ({reason})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _not_a_number(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_chat(body: dict, models: list[str]) -> GenerationRequest:
    """`models`: the names served, the default first."""
    model = check_model(body, models)
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", code="missing_required_parameter", param="messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", code="invalid_value", param="messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    if not any(m["role"] == "user" for m in parsed):
        raise ApiError(400, "'messages' holds no user message to answer", code="invalid_value", param="messages")
    return GenerationRequest(True, _sampling(body), messages=parsed, input=_string(body, "input", ""), model=model,
                             **_streaming(body))


def parse_completion(body: dict, models: list[str]) -> GenerationRequest:
    model = check_model(body, models)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI allows a batch of prompts; one is what this server answers
    if prompt is None:
        raise ApiError(400, "'prompt' is required", code="missing_required_parameter", param="prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string", code="invalid_value", param="prompt")
    return GenerationRequest(False, _sampling(body), prompt=prompt, model=model, **_streaming(body))


def check_model(body: dict, models: list[str]) -> str | None:
    """The adapter a request names, None for the default model (models[0], or no name at all)."""
    model = body.get("model")
    if model is None or model == models[0]:
        return None
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", code="invalid_value", param="model")
    if model not in models:
        served = ", ".join(f"'{m}'" for m in models[:10]) + (" ..." if len(models) > 10 else "")
        raise ApiError(404, f"the model '{model[:200]}' does not exist; this server serves {served}",
                       type="not_found_error", code="model_not_found", param="model")
    return model


def _message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ApiError(400, f"{where} must be an object with a role among {', '.join(ROLES)}", code="invalid_value", param=where)
    content = message.get("content")
    if isinstance(content, list):  # the newer form: a list of typed parts; only text is understood
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{where}.content: only text parts are supported", code="invalid_value", param=where)
        content = "".join(p["text"] for p in content)
    if content is None and message["role"] == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string", code="invalid_value", param=where)
    return {"role": message["role"], "content": content}


def _streaming(body: dict) -> dict:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", code="invalid_value", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", code="invalid_value", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false", code="invalid_value",
                       param="stream_options")
    return {"stream": stream, "include_usage": include_usage}


def _sampling(body: dict) -> Sampling:
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "'n' must be 1: this server returns one choice", code="invalid_value", param="n")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", code="invalid_value", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 0, MAX_INT32),  # above the vocabulary's size it is off, as 0 is
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else _integer({"max_tokens": max_tokens}, "max_tokens", 0, 1, MAX_INT32),
        seed=_integer(body, "seed", None, 0, MAX_SEED),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, None, low_open=True),
        stop=stops,
    )


def _number(body: dict, key: str, default, low, high, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    number = _as_float(value)
    if number is None or not math.isfinite(number) or (low_open and number <= low) or number < low \
            or (high is not None and number > high):
        bounds = f"{'more than' if low_open else 'at least'} {low:g}" + (f" and at most {high:g}" if high is not None else "")
        raise ApiError(400, f"'{key}' must be a number {bounds}", code="invalid_value", param=key)
    return number


def _as_float(value) -> float | None:
    """A JSON number as a float (an integer too large for one is infinite); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _integer(body: dict, key: str, default, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be an integer from {low} to {high}", code="invalid_value", param=key)
    return value


def _string(body: dict, key: str, default: str) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise ApiError(400, f"'{key}' must be a string", code="invalid_value", param=key)
    return value


# Responses -----------------------------------------------------------------------------------

class Completion:
    """One answer's identity, shared by its chunks: id, creation time and the model served."""

    def __init__(self, chat: bool, model_id: str):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model_id

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self._head(False), "choices": [choice], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        return {**self._head(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens served from the prompt cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def model_list(models: list[str], created: int) -> dict:
    return {"object": "list", "data": [model_card(m, created) for m in models]}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "mlxft"}
