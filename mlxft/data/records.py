"""Rows from JSON arrays, JSONL and CSV files, each remembering where it came from.

Every row carries its origin ("train.jsonl:12") so that any later complaint about it (a missing
field, a placeholder the CSV lacks) can name the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from mlxft.data.text import read_lines, read_text
from mlxft.errors import UserError
from mlxft.files import write_atomic


@dataclass(frozen=True)
class Record:
    fields: dict
    origin: str  # "path:line" for JSONL/CSV, "path[item]" for a JSON array

    def __getitem__(self, key):
        return self.fields[key]

    def get(self, key, default=None):
        return self.fields.get(key, default)


# Each schema: the fields a row must have, and the optional ones it may have.
# Order matters: the first whose required fields a row has wins (preference rows also have
# a "prompt", so they are checked before prompt/completion rows).
SCHEMAS = {
    "preference": ({"prompt", "chosen", "rejected"}, {"system"}),
    "opposing": ({"prompt", "support", "oppose"}, {"id"}),
    "alpaca": ({"instruction", "output"}, {"input"}),
    "completion": ({"prompt", "completion"}, set()),
    "chat": ({"messages"}, {"tools"}),
    "text": ({"text"}, set()),
}

SCHEMA_HELP = (
    "alpaca (instruction, input?, output), completion (prompt, completion), chat (messages), "
    "text (text), preference (prompt, chosen, rejected), opposing (prompt, support, oppose)"
)


def load_records(path: str | Path) -> list[Record]:
    """Read every row of a .json (array), .jsonl or .csv file; raise UserError naming file:line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; name a .json, .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    else:
        raise UserError(f"{path}: unknown file type '{suffix}'; use .json, .jsonl or .csv")
    if not records:
        raise UserError(f"{path}: no rows")
    return records


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in read_lines(path):
        if not line.strip():
            continue
        row = _parse_json(line, path, number)
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        records.append(Record(row, f"{path}:{number}"))
    return records


def _parse_json(text: str, path: Path, number: int | None = None):
    """JSON as the standard defines it: NaN and Infinity are not numbers a row may hold, and a
    nesting too deep to read or an integer too long to convert is a bad row, not a crash."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{number or e.lineno}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        where = f"{path}:{number}" if number else f"{path}"
        raise UserError(f"{where}: not valid JSON ({str(e).splitlines()[0] if str(e) else 'nested too deeply'})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _read_json(path: Path) -> list[Record]:
    text = read_text(path)
    if not text.strip():
        return []
    rows = _parse_json(text, path)
    if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
        rows = next(iter(rows.values()))  # {"train": [...]} style files
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON array of objects (or use .jsonl)")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}[{i}]: expected a JSON object, got {type(row).__name__}")
        records.append(Record(row, f"{path}[{i}]"))
    return records


def _read_csv(path: Path) -> list[Record]:
    try:
        return _parse_csv(path, read_text(path))
    except csv.Error as e:
        raise UserError(f"{path}: not a CSV file this reader understands ({e})") from None


def _parse_csv(path: Path, text: str) -> list[Record]:
    records = []
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        if len(set(reader.fieldnames)) != len(reader.fieldnames):
            raise UserError(f"{path}:1: repeated column names in the header")
        for row in reader:
            if None in row:  # more cells than header columns
                raise UserError(
                    f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} cells "
                    f"but the header has {len(reader.fieldnames)} columns"
                )
            records.append(Record(dict(row), f"{path}:{reader.line_num}"))
    return records


def rename_columns(records: list[Record], columns: dict[str, str] | None) -> list[Record]:
    """Rows whose columns are renamed to the fields mlxft reads (data.columns): `columns` maps a
    field to the column that holds it ({instruction: question}). Some row must have each column
    named; a row that lacks one lacks the field, and the schema check names it if it needs it."""
    if not columns or not records:
        return records
    check_columns(records[0].origin, list(dict.fromkeys(k for record in records for k in record.fields)), columns)
    return [Record(rename(record.fields, columns), record.origin) for record in records]


def check_columns(where: str, names: list[str], columns: dict[str, str]) -> None:
    for field, column in columns.items():
        if column not in names:
            raise UserError(f"{where}: no column '{column}' to read '{field}' from (data.columns); "
                            f"the columns: {', '.join(map(str, names))}")


def rename(fields: dict, columns: dict[str, str] | None) -> dict:
    """One row's fields with each column named in `columns` under its field's name instead."""
    if not columns:
        return fields
    kept = {k: v for k, v in fields.items() if k not in columns.values()}
    return {**kept, **{field: fields[column] for field, column in columns.items() if column in fields}}


def detect_schema(records: list[Record]) -> str:
    """Name the schema of the rows from the first one, then check that every row fits it."""
    first = records[0]
    keys = set(first.fields)
    schema = next((name for name, (required, _) in SCHEMAS.items() if required <= keys), None)
    if schema is None:
        raise UserError(
            f"{first.origin}: unknown row schema with fields {sorted(keys)}; expected one of: "
            f"{SCHEMA_HELP}, or give a prompt format string for CSV-like rows"
        )
    for record in records:
        check_fields(record, schema)
    return schema


def check_fields(record: Record, schema: str) -> None:
    required, _ = SCHEMAS[schema]
    missing = sorted(required - set(record.fields))
    if missing:
        raise UserError(
            f"{record.origin}: missing field {', '.join(repr(m) for m in missing)} "
            f"({schema} rows need {', '.join(sorted(required))})"
        )
    if schema == "chat":
        _check_messages(record)
        return
    if schema == "preference":
        _check_preference(record)
        return
    for name in required:
        if not isinstance(record.fields[name], str):
            raise UserError(f"{record.origin}: field '{name}' must be a string")


def _check_messages(record: Record, name: str = "messages", last_role: str | None = "assistant") -> None:
    messages = record.fields[name]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{record.origin}: '{name}' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{record.origin}: {name}[{i}] needs 'role' and 'content'")
    if last_role and messages[-1]["role"] != last_role:
        where = "" if name == "messages" else f" of '{name}'"
        raise UserError(f"{record.origin}: the last message{where} must be the {last_role}'s answer")


def _check_preference(record: Record) -> None:
    """Plain text, or TRL's conversational form: `prompt` a list of messages, `chosen` and
    `rejected` lists ending with the assistant's answer."""
    for name in ("prompt", "chosen", "rejected"):
        value = record.fields[name]
        if isinstance(value, list):
            _check_messages(record, name, None if name == "prompt" else "assistant")
        elif not isinstance(value, str):
            raise UserError(f"{record.origin}: field '{name}' must be a string or a list of messages")
    if not isinstance(record.fields.get("system", ""), str):
        raise UserError(f"{record.origin}: field 'system' must be a string")


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write rows as JSONL under a temporary name, then rename: never a half-written file."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
