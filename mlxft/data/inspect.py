"""What a data file holds, as a person checking it before training wants to see it:
schema, row count, token lengths, label balance, and one example with its loss mask."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mlxft.data.encode import encode_preference_records, encode_records
from mlxft.data.records import Record
from mlxft.data.templates import render

MAX_LABELS = 10  # more distinct answers than this is free text, not labels


@dataclass
class Inspection:
    source: str
    schema: str
    template: str
    rows: int
    lengths: dict = field(default_factory=dict)  # statistics of tokens per row
    supervised: dict = field(default_factory=dict)  # statistics of scored tokens per row
    truncated: int = 0
    cutoff: int | None = None
    labels: dict | None = None  # answer -> count, for Yes/No-style data
    example: dict | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def describe_lengths(values) -> dict:
    a = np.asarray(values)
    return {
        "min": int(a.min()),
        "median": float(np.median(a)),
        "mean": round(float(a.mean()), 1),
        "p95": float(np.percentile(a, 95)),
        "max": int(a.max()),
    }


def inspect_records(
    records: list[Record],
    tokenizer,
    *,
    source: str,
    schema: str | None,
    template: str,
    completion_field: str | None = None,
    cutoff: int | None = None,
    train_on_inputs: bool = False,
) -> Inspection:
    """Describe rows whose schema and template were resolved by schema_and_template."""
    if schema == "opposing":
        return Inspection(source, schema, "-", len(records))
    if schema == "preference":
        return _inspect_preference(records, tokenizer, source, template, cutoff)

    examples, report = encode_records(records, schema, template, tokenizer, cutoff=cutoff,
                                      train_on_inputs=train_on_inputs, completion_field=completion_field)
    completions = Counter(render(r, schema, template, tokenizer, completion_field=completion_field).completion
                          for r in records)
    example = max(examples, key=lambda e: scored_runs(e.loss_mask))  # the first with the most scored turns
    return Inspection(
        source, schema or "columns", template, len(records),
        lengths=describe_lengths(report.lengths),
        supervised=describe_lengths([sum(e.loss_mask) for e in examples]),
        truncated=report.truncated,
        cutoff=cutoff,
        labels=dict(completions.most_common()) if len(completions) <= MAX_LABELS else None,
        example=_show_example(example.origin, example.input_ids, example.loss_mask, tokenizer),
    )


def _inspect_preference(records, tokenizer, source, template, cutoff) -> Inspection:
    examples, report = encode_preference_records(records, template, tokenizer, max_length=cutoff)
    first = examples[0]
    return Inspection(
        source, "preference", template, len(records),
        lengths=describe_lengths(report.lengths),
        supervised=describe_lengths([len(e.chosen_ids) + len(e.rejected_ids) for e in examples]),
        truncated=report.truncated,
        cutoff=cutoff,
        example=_show_example(
            records[0].origin, first.prompt_ids + first.chosen_ids,
            [0] * len(first.prompt_ids) + [1] * len(first.chosen_ids), tokenizer,
        ),
    )


def _show_example(origin, ids, mask, tokenizer) -> dict:
    """The example split at its mask: what the model reads, what it is scored on, and the
    mask as runs ("0x187 1x3") so a shifted boundary is visible at a glance."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append(f"{mask[start]}x{i - start}")
            start = i
    scored = [t for t, m in zip(ids, mask) if m]
    unscored = [t for t, m in zip(ids, mask) if not m]
    pieces, start = [], 0
    for run in runs:  # each run of the mask as its text: a multi-turn row shows every scored turn
        value, n = run.split("x")
        pieces.append((value == "1", tokenizer.decode(ids[start : start + int(n)])))
        start += int(n)
    return {
        "origin": origin,
        "not_scored": tokenizer.decode(unscored),
        "scored": tokenizer.decode(scored),
        "scored_tokens": tokenizer.convert_ids_to_tokens(scored),
        "mask_runs": " ".join(runs),
        "pieces": pieces,
    }


def scored_runs(mask: list[int]) -> int:
    """How many separate stretches of a loss mask are scored (a multi-turn row's answers)."""
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


def format_inspection(info: Inspection) -> str:
    lines = [f"file:      {info.source}", f"schema:    {info.schema}", f"rows:      {info.rows}"]
    if info.schema == "opposing":
        lines.append("these rows hold two opposing answers; make preference pairs with "
                     "`mlxft data convert pairs FILE --out pairs.jsonl --support-ratio R`")
        return "\n".join(lines)
    lines.append(f"template:  {info.template}")
    stats = lambda d: ", ".join(f"{k} {v:g}" for k, v in d.items())  # noqa: E731
    lines.append(f"tokens per row:         {stats(info.lengths)}")
    lines.append(f"scored tokens per row:  {stats(info.supervised)}")
    if info.cutoff:
        lines.append(f"rows over the cutoff of {info.cutoff} tokens (truncated): {info.truncated}")
    if info.labels:
        total = sum(info.labels.values())
        balance = ", ".join(f"{k!r} {v} ({100 * v / total:.1f}%)" for k, v in info.labels.items())
        lines.append(f"labels:    {balance}")
    if info.example:
        ex = info.example
        lines.append(f"example ({ex['origin']}), loss mask {ex['mask_runs']}:")
        if sum(scored for scored, _ in ex["pieces"]) > 1:  # several answers: each piece in order
            for scored, text in ex["pieces"]:
                lines += ["--- scored ---" if scored else "--- read, not scored ---", repr(text) if scored else text]
        else:
            lines += ["--- read, not scored ---", ex["not_scored"], "--- scored ---",
                      f"{ex['scored']!r}  tokens {ex['scored_tokens']}"]
    return "\n".join(lines)
