"""Prompt templates: a row becomes a prompt (not scored by default) and a completion (scored).

Templates by name:
  alpaca   the alpaca-lora texts, with and without input (exact strings below)
  phi3     "<|user|>\n{instruction}\n{input}\n<|assistant|>\n"
  chat     the tokenizer's own chat template (rows become user/assistant messages)
  plain    the prompt exactly as the row gives it (prompt/completion and text rows)
  any string with {field} placeholders: a format string over the row's fields, e.g.
           "Generate a product description for the following item:\nFeatures: {features}\n\nDescription:"
  auto     alpaca for Alpaca rows, chat for messages; a prompt given as a string goes through the
           tokenizer's chat template as a user message when it has one, else plain
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from mlxft.data.records import SCHEMAS, Record, detect_schema
from mlxft.errors import UserError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PHI3_WITH_INPUT = "<|user|>\n{instruction}\n{input}\n<|assistant|>\n"
PHI3_NO_INPUT = "<|user|>\n{instruction}\n<|assistant|>\n"

NAMED_TEMPLATES = ("auto", "alpaca", "phi3", "chat", "plain")

# Where the answer lives for each schema when a format string is used without naming it.
DEFAULT_COMPLETION_FIELD = {"alpaca": "output", "completion": "completion"}


@dataclass(frozen=True)
class Prompted:
    prompt: str  # context the model reads; scored only with train_on_inputs
    completion: str  # the answer the model learns to write
    # Earlier answers inside `prompt` that are scored too: (start, end) character spans, in order
    # (a multi-turn chat row's assistant turns before the last; data.assistant_turns=all).
    scored_spans: tuple[tuple[int, int], ...] = ()

    def pieces(self) -> list[tuple[str, bool]]:
        """The prompt as (text, scored) pieces, then the completion (scored)."""
        out, at = [], 0
        for start, end in self.scored_spans:
            out += [(self.prompt[at:start], False), (self.prompt[start:end], True)]
            at = end
        return [*out, (self.prompt[at:], False), (self.completion, True)]


@dataclass(frozen=True)
class PreferencePrompted:
    prompt: str
    chosen: str
    rejected: str


def is_format_string(template: str) -> bool:
    return template not in NAMED_TEMPLATES


def format_fields(template: str) -> list[str]:
    """The {field} names a format string uses, in order; a malformed one is a UserError."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UserError(f"prompt format string {template!r} is malformed ({e})") from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    if not fields:
        raise UserError(
            f"unknown template {template!r}: use one of {', '.join(NAMED_TEMPLATES)} "
            "or a format string with {field} placeholders"
        )
    if any(name == "" or not name.isidentifier() for name in fields):
        raise UserError(f"prompt format string {template!r}: placeholders must be named, like {{features}}")
    return fields


def auto_template(tokenizer) -> str:
    """What 'auto' means for a prompt given as a string: the model's own chat template, as a user
    message, when its tokenizer has one (an instruct model answers a bare prompt with its
    end-of-turn token at once), else the text as it is."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def describe_template(template: str, tokenizer) -> str:
    """'auto (the chat template)' or 'auto (plain)': what a run log says it rendered with."""
    if template != "auto":
        return template
    return "auto (the chat template)" if auto_template(tokenizer) == "chat" else "auto (plain)"


def resolve_template(template: str, schema: str | None) -> str:
    """Pick the concrete template for 'auto' and check that it fits the schema. Prompt/completion
    rows under 'auto' stay 'auto' until the tokenizer is known (see auto_template)."""
    if template == "auto":
        return {"alpaca": "alpaca", "chat": "chat", "completion": "auto"}.get(schema or "", "plain")
    if is_format_string(template):
        format_fields(template)
        return template
    if schema == "chat" and template != "chat":
        raise UserError(f"chat (messages) rows need the chat template, not {template!r}")
    if template in ("alpaca", "phi3") and schema not in ("alpaca", None):
        raise UserError(f"the {template} template needs Alpaca rows (instruction, input, output), got {schema} rows")
    return template


def schema_and_template(records: list[Record], template: str, completion_field: str | None = None):
    """Check rows against a template before any tokenizer or model is loaded.

    Returns (schema, concrete template); schema is None for CSV-like rows under a format
    string, which need only the columns the string names.
    """
    if is_format_string(template):
        check_format_columns(template, records[0], completion_field)
        required_sets = [req for req, _ in SCHEMAS.values()]
        keys = set(records[0].fields)
        schema = detect_schema(records) if any(req <= keys for req in required_sets) else None
        return schema, resolve_template(template, schema)
    schema = detect_schema(records)
    return schema, resolve_template(template, schema)


def check_format_columns(template: str, record: Record, completion_field: str | None) -> None:
    """Fail once, up front, naming the first row, when a column the format string uses is absent."""
    needed = format_fields(template) + ([completion_field] if completion_field else [])
    missing = [name for name in needed if name not in record.fields]
    if missing:
        raise UserError(
            f"{record.origin}: no column {', '.join(repr(m) for m in missing)} "
            f"(the prompt format uses it; columns: {', '.join(record.fields)})"
        )


def render(
    record: Record,
    schema: str | None,
    template: str,
    tokenizer=None,
    *,
    completion_field: str | None = None,
    system_prompt: str | None = None,
    assistant_turns: str = "all",
) -> Prompted:
    """One row -> (prompt, completion) under a resolved template (see resolve_template); a chat
    row's earlier assistant turns are scored too unless `assistant_turns` is "last"."""
    fields = record.fields
    if template == "auto":
        template = auto_template(tokenizer)
    if is_format_string(template):
        field = completion_field or DEFAULT_COMPLETION_FIELD.get(schema or "")
        if field is None:
            raise UserError("a prompt format string needs the answer's column: set completion_field")
        try:
            prompt = template.format(**{k: _text(v) for k, v in fields.items()})
        except KeyError as e:
            raise UserError(f"{record.origin}: no field {e.args[0]!r} for the prompt format") from None
        if field not in fields:
            raise UserError(f"{record.origin}: no field {field!r} for the answer")
        return Prompted(prompt, _text(fields[field]))
    if template == "alpaca":
        return Prompted(alpaca_prompt(fields["instruction"], fields.get("input", "")), fields["output"])
    if template == "phi3":
        return Prompted(phi3_prompt(fields["instruction"], fields.get("input", "")), fields["output"])
    if template == "chat":
        return _render_chat(record, schema, tokenizer, system_prompt, assistant_turns)
    # plain
    if schema == "text":
        return Prompted("", fields["text"])
    if schema == "completion":
        return Prompted(fields["prompt"], fields["completion"])
    raise UserError(f"{record.origin}: the plain template takes prompt/completion or text rows, not {schema} rows")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def phi3_prompt(instruction: str, input: str = "") -> str:
    if input:
        return PHI3_WITH_INPUT.format(instruction=instruction, input=input)
    return PHI3_NO_INPUT.format(instruction=instruction)


def _user_message(fields: dict, schema: str | None) -> str:
    if schema == "alpaca":
        extra = fields.get("input", "")
        return fields["instruction"] + (f"\n\n{extra}" if extra else "")
    return fields["prompt"]


def _render_chat(record: Record, schema, tokenizer, system_prompt, assistant_turns: str = "all") -> Prompted:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("this tokenizer has no chat template; use --template alpaca, phi3, plain or a format string")
    if schema == "chat":
        messages = list(record.fields["messages"])
        answer = messages.pop()
    else:
        answer_field = DEFAULT_COMPLETION_FIELD.get(schema or "")
        if answer_field is None:
            raise UserError(f"{record.origin}: the chat template cannot render {schema} rows")
        messages = [{"role": "user", "content": _user_message(record.fields, schema)}]
        answer = {"role": "assistant", "content": record.fields[answer_field]}
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    prompted = _chat_split(messages, [answer], tokenizer, record.origin)
    if assistant_turns == "last":
        return prompted
    return Prompted(prompted.prompt, prompted.completion, _earlier_turns(messages, prompted.prompt, tokenizer, record.origin))


def _earlier_turns(messages: list[dict], prompt: str, tokenizer, origin: str) -> tuple[tuple[int, int], ...]:
    """Where each assistant turn before the last sits in the rendered `prompt`: from the end of
    the history before it (with the generation prompt) to the end of the history through it, the
    same cut as the last turn's (TRL's assistant_only_loss scores the same turns)."""
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        part = _chat_split(messages[:i], [message], tokenizer, origin)
        start, end = len(part.prompt), len(part.prompt) + len(part.completion)
        if prompt[:end] != part.prompt + part.completion:
            raise UserError(f"{origin}: the chat template renders earlier turns differently later in the conversation; "
                            f"cannot score them: set data.assistant_turns=last")
        spans.append((start, end))
    return tuple(spans)


def _chat_split(messages: list[dict], answer: list[dict], tokenizer, origin: str) -> Prompted:
    """The chat template's text for `messages` (+ the generation prompt) and what `answer` adds."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + answer, tokenize=False)
    if not full.startswith(prompt):
        raise UserError(f"{origin}: the chat template renders the history differently with the answer; cannot mask the prompt")
    return Prompted(prompt, full[len(prompt) :])


def is_conversational(record: Record) -> bool:
    """A preference row in TRL's conversational form (lists of messages)."""
    return any(isinstance(record.fields.get(k), list) for k in ("prompt", "chosen", "rejected"))


def resolve_preference_template(template: str, records: list[Record], tokenizer=None) -> str:
    """'auto' -> chat for conversational rows; for string prompts it stays 'auto', which renders
    through the chat template when the tokenizer has one (auto_template), else plain. Other
    templates are checked against the rows."""
    conversational = next((r for r in records if is_conversational(r)), None)
    if template == "auto":
        return "chat" if conversational else "auto"
    if conversational is not None and template != "chat":
        raise UserError(f"{conversational.origin}: rows with lists of messages need the chat template, not {template!r}")
    if is_format_string(template):
        check_format_columns(template, records[0], None)
    elif template not in ("plain", "alpaca", "phi3", "chat"):
        raise UserError(f"unknown template {template!r} for preference rows")
    return template


def render_preference(record: Record, template: str, tokenizer=None, *, system_prompt=None) -> PreferencePrompted:
    """A {prompt, chosen, rejected} row -> texts; the prompt is wrapped by the template.

    With the chat template the prompt may be a list of messages and each answer a list ending
    with the assistant's (TRL's conversational form), or plain strings (one user turn, one
    assistant turn). The row's `system` (else the recipe's system prompt) goes in as the system
    message; other templates put it before the prompt as its own paragraph."""
    fields = record.fields
    system_prompt = fields.get("system") or system_prompt
    if template == "auto":
        template = auto_template(tokenizer)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("this tokenizer has no chat template; use --set data.template=plain, alpaca, phi3 or a format string")
        prompt = fields["prompt"]
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        answers = [fields[k] if isinstance(fields[k], list) else [{"role": "assistant", "content": fields[k]}]
                   for k in ("chosen", "rejected")]
        chosen = _chat_split(messages, answers[0], tokenizer, record.origin)
        rejected = _chat_split(messages, answers[1], tokenizer, record.origin)
        return PreferencePrompted(chosen.prompt, chosen.completion, rejected.completion)
    if template == "alpaca":
        prompt = alpaca_prompt(fields["prompt"])
    elif template == "phi3":
        prompt = phi3_prompt(fields["prompt"])
    elif template == "plain":
        prompt = fields["prompt"]
    else:
        prompt = template.format(**{k: _text(v) for k, v in fields.items()})
    if system_prompt:
        prompt = f"{system_prompt}\n\n{prompt}"
    return PreferencePrompted(prompt, fields["chosen"], fields["rejected"])


def _text(value) -> str:
    return "" if value is None else str(value)


def preference_prompt(record: Record, template: str, tokenizer=None, *, system_prompt=None) -> str:
    """The prompt text a preference row (or a row with only a prompt) renders to: what a model
    is asked when its answers are compared before and after training."""
    fields = {**record.fields, "chosen": "", "rejected": ""}
    return render_preference(Record(fields, record.origin), template, tokenizer, system_prompt=system_prompt).prompt


def check_yes_no_rows(records: list[Record], template: str, answers: list[str]):
    """(schema, template) for rows scored by AUC: Alpaca or prompt/completion rows whose every
    answer is one of the two; a one-line error naming the first row that is not."""
    schema, template = schema_and_template(records, template)
    answer_field = DEFAULT_COMPLETION_FIELD.get(schema)
    if answer_field is None:
        raise UserError(f"AUC needs Alpaca or prompt/completion rows with {answers[0]!r}/{answers[1]!r} answers, not {schema} rows")
    odd = next((r for r in records if r[answer_field] not in answers), None)
    if odd is not None:
        raise UserError(f"{odd.origin}: answer {odd[answer_field]!r} is neither {answers[0]!r} nor {answers[1]!r}")
    return schema, template
