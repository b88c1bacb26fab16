"""What a generation asks for, independent of the backend: sampling settings, stop strings, and
how long a prompt may be.

`mlxft generate`, `mlxft chat` and `mlxft serve` all fill a Sampling and hand it to the backend's
streamer; stop strings are cut here, on text, so every backend stops at the same place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlxft.errors import UserError

DEFAULT_MAX_TOKENS = 256


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy, so an answer is reproducible without a seed
    top_p: float = 1.0  # 1: off (OpenAI's convention)
    top_k: int = 0  # 0: off
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1: off
    stop: list[str] = field(default_factory=list)


class StopScanner:
    """Cuts streamed text at the first stop string, holding back only what could still become one.

    feed() returns the text that is safe to show now; once a stop string is seen, `stopped` is set
    and everything from it on is dropped. finish() releases what was held back at the end."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max(self._partial_tail(s) for s in self.stops)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def finish(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _partial_tail(self, stop: str) -> int:
        """Length of the longest end of `pending` that is a proper start of `stop`."""
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0


# Names models use in config.json for the longest sequence they were built for.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(folder: str | Path, tokenizer=None) -> int | None:
    """The model's context length from config.json, else the tokenizer's; None when unknown."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for source in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return source[key]
    limit = getattr(tokenizer, "model_max_length", None)
    # transformers puts a huge sentinel there when the tokenizer does not know.
    return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else None


class ContextTooLong(UserError):
    """The prompt leaves no room for an answer in the model's context."""


def fit_to_context(prompt_tokens: int, max_tokens: int, context: int | None) -> int:
    """max_tokens, shortened so prompt + answer fit the context; ContextTooLong when nothing fits."""
    if context is None:
        return max_tokens
    if prompt_tokens >= context:
        raise ContextTooLong(f"the prompt is {prompt_tokens} tokens, and this model's context length is {context} tokens")
    return min(max_tokens, context - prompt_tokens)
