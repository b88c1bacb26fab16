"""Prompts -> token ids + loss masks, the one encoding both backends train and evaluate on.

Conventions (DESIGN.md):
- `loss_mask[t] == 1` means token t is a target: the model is scored on predicting it from the
  tokens before it. Position 0 is never a target.
- Prompt and completion are tokenized separately and concatenated, so the boundary between
  them is exact (tokenizing the joined text can merge across it and shift the mask).
- EOS is appended and scored, so the model learns to stop.
- Rows longer than the cutoff keep their start; rows left with no scored token are dropped.
  Both are counted in the report, never silent.

The tokenizer is any object with Hugging Face's `encode(text, add_special_tokens=...)`,
`eos_token_id` and `bos_token` (a transformers tokenizer, or mlx-lm's wrapper around one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxft.data.records import Record
from mlxft.data.templates import PreferencePrompted, Prompted, render, render_preference
from mlxft.errors import UserError


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]
    origin: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    origin: str = ""

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def as_examples(self) -> tuple[Example, Example]:
        """prompt + chosen and prompt + rejected, each scored on its answer only."""
        return tuple(_answer_only(self.prompt_ids, answer, self.origin) for answer in (self.chosen_ids, self.rejected_ids))


def _answer_only(prompt_ids: list[int], answer_ids: list[int], origin: str) -> Example:
    mask = [0] * len(prompt_ids) + [1] * len(answer_ids)
    mask[0] = 0  # nothing precedes the first token (only when a cut left no prompt)
    return Example(prompt_ids + answer_ids, mask, origin)


@dataclass
class EncodeReport:
    rows: int = 0
    kept: int = 0
    truncated: int = 0  # longer than the cutoff, cut to it
    dropped: int = 0  # no scored token left after the cut
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.kept} of {self.rows} rows encoded"
        if self.truncated:
            text += f"; {self.truncated} truncated at the cutoff"
        if self.dropped:
            text += f"; {self.dropped} dropped (no answer token left after truncation)"
        return text


def encode_prompt(tokenizer, prompt: str, limit: int | None = None, keep: str = "start") -> list[int]:
    """Prompt ids with the tokenizer's BOS, unless the text (a chat template) already has it.
    With a limit, see encode_bounded: at least limit + 1 ids when the text has more."""
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = bool(bos) and prompt.startswith(bos)
    return encode_bounded(lambda text: tokenizer.encode(text, add_special_tokens=not has_bos), prompt, limit, keep)


def encode_completion(tokenizer, completion: str, limit: int | None = None) -> list[int]:
    return encode_bounded(lambda text: tokenizer.encode(text, add_special_tokens=False), completion, limit, "start")


# Tokens tokenized past a cut and then thrown away: where a text is cut, its last few tokens can
# come out otherwise than in the whole text (a word cut in two); these never reach the result.
CUT_MARGIN = 16
CHARS_PER_TOKEN = 8  # first guess; most text is 3-5 characters a token, and the guess grows if short


def encode_bounded(encode, text: str, limit: int | None, keep: str = "start") -> list[int]:
    """encode(text), or when the text holds more than `limit` tokens, only its first (keep="start")
    or last (keep="end") limit + 1 tokens: one more than fits, so the caller sees it was cut.

    A row of 50 MB is not tokenized whole: a piece of (limit + margin) x 8 characters at the kept
    end is, grown 4x at a time until it holds enough tokens, so memory follows the limit, not the
    row. The ids are those of the whole text, since the piece's uncertain tokens lie past the cut.
    """
    if limit is None:
        return list(encode(text))
    chars = (limit + CUT_MARGIN) * CHARS_PER_TOKEN
    while chars < len(text):
        ids = list(encode(text[:chars] if keep == "start" else text[-chars:]))
        if len(ids) > limit + CUT_MARGIN:
            return ids[: limit + 1] if keep == "start" else ids[-(limit + 1):]
        chars *= 4
    return list(encode(text))


def encode_prompted(
    prompted: Prompted,
    tokenizer,
    *,
    cutoff: int | None = None,
    train_on_inputs: bool = False,
    add_eos: bool = True,
    origin: str = "",
) -> tuple[Example, bool]:
    """Encode one prompt/completion pair; returns (example, was_truncated). A prompt holding
    earlier scored answers (Prompted.scored_spans) is tokenized piece by piece, as prompt and
    completion are, so that each answer's mask boundary is exact too."""
    if prompted.scored_spans:
        pieces = prompted.pieces()
        prompt_ids, mask = [], []
        for k, (text, scored) in enumerate(pieces[:-1]):
            ids = encode_prompt(tokenizer, text) if k == 0 else encode_completion(tokenizer, text)
            prompt_ids += ids
            mask += [1 if scored or train_on_inputs else 0] * len(ids)
    else:
        prompt_ids = encode_prompt(tokenizer, prompted.prompt, cutoff)
        mask = [1 if train_on_inputs else 0] * len(prompt_ids)
    answer_ids = encode_completion(tokenizer, prompted.completion,
                                   None if cutoff is None else max(cutoff - len(prompt_ids), 0))
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not answer_ids or answer_ids[-1] != eos):
        answer_ids.append(eos)
    ids = prompt_ids + answer_ids
    mask = mask + [1] * len(answer_ids)
    if ids:
        mask[0] = 0  # nothing precedes the first token, so it cannot be predicted
    truncated = cutoff is not None and len(ids) > cutoff
    if truncated:
        ids, mask = ids[:cutoff], mask[:cutoff]
    return Example(ids, mask, origin), truncated


def encode_records(
    records: list[Record],
    schema: str,
    template: str,
    tokenizer,
    *,
    cutoff: int | None = None,
    train_on_inputs: bool = False,
    completion_field: str | None = None,
    system_prompt: str | None = None,
    assistant_turns: str = "all",
) -> tuple[list[Example], EncodeReport]:
    """Render and encode every row; raise UserError when no row is left to train on."""
    report = EncodeReport()
    examples = []
    for record in records:
        report.rows += 1
        prompted = render(record, schema, template, tokenizer, completion_field=completion_field, system_prompt=system_prompt,
                          assistant_turns=assistant_turns)
        example, truncated = encode_prompted(
            prompted, tokenizer, cutoff=cutoff, train_on_inputs=train_on_inputs, origin=record.origin
        )
        report.truncated += truncated
        if sum(example.loss_mask) == 0:
            report.dropped += 1
            continue
        report.kept += 1
        report.lengths.append(len(example))
        examples.append(example)
    if not examples:
        raise UserError(f"no usable rows: {report.summary()}")
    return examples, report


def answer_token_ids(tokenizer, answers: list[str]) -> list[int]:
    """The first token of each answer as it is encoded for training ("Yes." -> id of "▁Yes").

    AUC reads the probability of these tokens at the first answer position, so they must come
    from the same encoding the model was trained on, never from a hard-coded table.
    """
    ids = []
    for answer in answers:
        encoded = encode_completion(tokenizer, answer)
        if not encoded:
            raise UserError(f"the answer {answer!r} encodes to no tokens")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise UserError(f"answers {answers} start with the same token; the tokenizer cannot tell them apart at the first position")
    return ids


def encode_preference(
    prompted: PreferencePrompted,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    add_eos: bool = True,
    origin: str = "",
) -> tuple[PreferenceExample, bool]:
    """Encode a preference pair; the prompt is cut first (keeping its end by default, where the
    question is), then each answer so that prompt + answer fits max_length."""
    keep = "end" if truncation_mode == "keep_end" else "start"
    prompt_ids = encode_prompt(tokenizer, prompted.prompt, max_prompt_length, keep)
    room = None if max_length is None else max(max_length - min(len(prompt_ids), max_prompt_length or len(prompt_ids)), 0)
    answers = [encode_completion(tokenizer, text, room) for text in (prompted.chosen, prompted.rejected)]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None:
        answers = [a if a and a[-1] == eos else a + [eos] for a in answers]
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        truncated = True
        if truncation_mode == "keep_end":
            prompt_ids = prompt_ids[-max_prompt_length:]
        elif truncation_mode == "keep_start":
            prompt_ids = prompt_ids[:max_prompt_length]
        else:
            raise UserError(f"truncation_mode must be keep_end or keep_start, not {truncation_mode!r}")
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise UserError(f"{origin}: max_length {max_length} leaves no room for an answer after a {len(prompt_ids)}-token prompt")
        truncated = truncated or any(len(a) > room for a in answers)
        answers = [a[:room] for a in answers]
    return PreferenceExample(prompt_ids, answers[0], answers[1], origin), truncated


def encode_preference_records(records: list[Record], template: str, tokenizer, **options) -> tuple[list[PreferenceExample], EncodeReport]:
    report = EncodeReport()
    examples = []
    system_prompt = options.pop("system_prompt", None)
    for record in records:
        report.rows += 1
        prompted = render_preference(record, template, tokenizer, system_prompt=system_prompt)
        example, truncated = encode_preference(prompted, tokenizer, origin=record.origin, **options)
        report.truncated += truncated
        report.kept += 1
        report.lengths.append(len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids)))
        examples.append(example)
    return examples, report
