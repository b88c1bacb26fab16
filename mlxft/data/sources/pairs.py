"""Preference pairs from rows that hold two opposing answers to one prompt.

    rows = opposing_to_preference(load_records("train.json"), support_ratio=0.5, max_rows=50)
    write_jsonl(rows, "data/dpo/train.jsonl")

Rows look like `{id, prompt, support, oppose}` (the NTU GenAI HW6 DPO exercise). The first
round(support_ratio * N) rows prefer `support`, the rest prefer `oppose`, so one data set can
teach a model either stance, or a mix, by changing a single number.
"""

from __future__ import annotations

from mlxft.data.records import Record
from mlxft.errors import UserError


def opposing_to_preference(
    records: list[Record],
    support_ratio: float,
    max_rows: int | None = None,
    *,
    prompt_field: str = "prompt",
    support_field: str = "support",
    oppose_field: str = "oppose",
) -> list[dict]:
    """`{prompt, chosen, rejected}` rows (+ `id` when present) from the first `max_rows` records."""
    number = isinstance(support_ratio, (int, float)) and not isinstance(support_ratio, bool)
    if not number or not 0 <= support_ratio <= 1:
        raise UserError(f"support_ratio must be between 0 and 1, got {support_ratio}")
    if max_rows is not None and max_rows < 1:
        raise UserError(f"max_rows must be at least 1 (or unset for all rows), got {max_rows}")
    if not records:
        raise UserError("no rows to turn into preference pairs")
    records = records[:max_rows]
    n_support = round(support_ratio * len(records))

    rows = []
    for i, record in enumerate(records):
        prompt, support, oppose = (
            _text(record, name) for name in (prompt_field, support_field, oppose_field)
        )
        chosen, rejected = (support, oppose) if i < n_support else (oppose, support)
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if "id" in record.fields:
            row["id"] = record["id"]
        rows.append(row)
    return rows


def _text(record: Record, name: str) -> str:
    if name not in record.fields:
        have = ", ".join(sorted(record.fields))
        raise UserError(f"{record.origin}: missing field '{name}' (the row has: {have})")
    value = record[name]
    if not isinstance(value, str):
        raise UserError(f"{record.origin}: field '{name}' must be a string, got {type(value).__name__}")
    return value
