"""What a generation asks for, independent of the backend: sampling settings, stop strings, and
how long a prompt may be.

`mlxft generate`, `mlxft chat` and `mlxft serve` all fill a Sampling and hand it to the backend's
streamer; stop strings are cut here, on text, so every backend stops at the same place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
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


@dataclass
class Piece:
    """A stretch of answer text; the last one carries finish_reason ("stop" or "length")."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, those whose keys and values came from the prompt cache


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


class TextDecoder:
    """Answer token ids -> text, handed out as soon as it is final.

    Each step decodes the tokens since the last hand-out with a few tokens before them as context
    (so a word-initial space survives in SentencePiece and byte-level vocabularies, whose decoders
    drop a space at the very start), and holds text back while it ends in half a UTF-8 character.
    Linear in the answer's length, with the tokenizer's own decode()."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.context = 0  # first id of the context decoded with the new ones
        self.shown = 0  # ids before this one have been handed out

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self.context:self.shown])
        text = self._decode(self.ids[self.context:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.context, self.shown = self.shown, len(self.ids)
        return text[len(before):]

    def _decode(self, ids: list[int]) -> str:
        # Special tokens stay in the text, as mlx-lm's streaming detokenizers keep them.
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""


def end_of_sequence_ids(folder: str | Path, tokenizer) -> set[int]:
    """The ids that end an answer, read as mlx-lm reads them: generation_config.json's
    eos_token_id, else config.json's, plus the tokenizer's own."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((Path(folder) / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
            break
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def answer_pieces(tokens: Iterable[int], tokenizer, end_ids: set[int], sampling: Sampling, prompt_tokens: int) -> Iterator[Piece]:
    """A backend's sampled token ids -> answer Pieces, with mlx-lm's stream_generate rules: an
    end-of-sequence id ends the answer ("stop") and is not counted in it, max_tokens ends it
    ("length"), a stop string ends it ("stop") and is cut from the text. The caller stops pulling
    tokens once the last piece is out, so no token past the end is computed."""
    decoder, stops, used = TextDecoder(tokenizer), StopScanner(sampling.stop), 0
    for token in tokens:
        if token in end_ids:
            text = stops.feed(decoder.finish())
            yield Piece(text + stops.finish(), "stop", prompt_tokens, used)
            return
        used += 1
        text = stops.feed(decoder.add(token))
        if not stops.stopped and used >= sampling.max_tokens:
            text += stops.feed(decoder.finish())
            if not stops.stopped:
                yield Piece(text + stops.finish(), "length", prompt_tokens, used)
                return
        if stops.stopped:
            yield Piece(text, "stop", prompt_tokens, used)
            return
        if text:
            yield Piece(text, None, prompt_tokens, used)
    text = stops.feed(decoder.finish())  # the source ran out early (an empty one: max_tokens 0)
    yield Piece(text + stops.finish(), "stop" if stops.stopped else "length", prompt_tokens, used)


def adapter_and_base(adapter: str | Path | None, model_name: str | None):
    """(adapter spec, adapter weights, model name) for --adapter and --model as generate, chat and
    serve take them: without --model the adapter's own base model (adapter_config.json), else the
    built-in model. No adapter: (None, None, name)."""
    from mlxft.models.adapters import load_adapter, whole_model_folder

    spec = weights = None
    if adapter is not None:
        whole = whole_model_folder(adapter)
        if whole is not None:
            raise UserError(f"--adapter {adapter}: {whole} is a whole model (full fine-tuning), not an adapter; use --model {whole}")
        spec, weights = load_adapter(adapter)
        if model_name is None:
            if not spec.base_model:
                raise UserError(f"adapter {adapter} does not name its base model; give --model")
            model_name = spec.base_model
    return spec, weights, model_name or "builtin"


class Generator:
    """What a backend's TextGenerator shares: its model, tokenizer and folder, the context it
    allows, and prompts encoded as in training (encode_prompt: BOS once)."""

    def __init__(self, model, tokenizer, folder: str | Path, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.folder = Path(folder)
        self.name = name
        self.context_length = context_length(folder, tokenizer)

    def encode(self, prompt: str) -> list[int]:
        from mlxft.data.encode import encode_prompt

        return encode_prompt(self.tokenizer, prompt)


def length_groups(prompts: list[list[int]], together: bool = True) -> list[list[int]]:
    """Indices of the prompts, grouped by length (each alone unless `together`): prompts of one
    length run as one batch with no padding, so each row's arithmetic is that of the prompt alone."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups: list[list[int]] = []
    for i in order:
        if together and groups and len(prompts[groups[-1][0]]) == len(prompts[i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class RunningBatch:
    """What every backend's batch engine (mlxft.serve.scheduler's model side) keeps the same way:
    its rows in one order, reordered together with the backend's state for them (its cache and
    each row's newest token: `reorder_state`)."""

    rows: list

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (finished and cancelled ones leave)."""
        if len(indices) < len(self.rows):
            self.reorder(indices)

    def clear(self) -> None:
        self.keep([])

    def reorder(self, indices: list[int]) -> None:
        self.rows = [self.rows[i] for i in indices]
        self.reorder_state(indices)

    def reorder_state(self, indices: list[int]) -> None:
        raise NotImplementedError

    def in_request_order(self, before: int, joined: list[int]) -> None:
        """After start() added requests 0..n-1 as rows in the order `joined` (grouped by prompt
        length), put the new rows back in the order they were asked for."""
        if joined != sorted(joined):
            self.reorder(list(range(before)) + [before + joined.index(i) for i in range(len(joined))])
