import json
import re

import pytest

from mlxft.data.records import detect_schema, load_records
from mlxft.errors import UserError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_jsonl_json_and_csv_rows_keep_their_origin(tmp_path):
    jsonl = write(tmp_path, "a.jsonl", '{"text": "one"}\n\n{"text": "two"}\n')
    records = load_records(jsonl)
    assert [r["text"] for r in records] == ["one", "two"]
    assert [r.origin for r in records] == [f"{jsonl}:1", f"{jsonl}:3"]  # blank line skipped, numbering kept

    array = write(tmp_path, "a.json", json.dumps([{"text": "x"}, {"text": "y"}]))
    assert [r.origin for r in load_records(array)] == [f"{array}[0]", f"{array}[1]"]

    csv = write(tmp_path, "a.csv", 'name,features\n"Lamp, desk",bright\nMug,"big\nhandle"\nPen,blue\n')
    records = load_records(csv)
    assert records[0].fields == {"name": "Lamp, desk", "features": "bright"}
    assert records[1]["features"] == "big\nhandle"
    assert records[2].origin == f"{csv}:5"  # physical line, after the quoted newline


@pytest.mark.parametrize(
    "row, schema",
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"prompt": "p", "completion": "c"}, "completion"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "chat"),
        ({"text": "t"}, "text"),
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
        ({"id": 1, "prompt": "p", "support": "s", "oppose": "o"}, "opposing"),
    ],
)
def test_schema_detection(tmp_path, row, schema):
    path = write(tmp_path, "rows.jsonl", json.dumps(row) + "\n")
    assert detect_schema(load_records(path)) == schema


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: not valid JSON"),
        ("list.jsonl", '["a", "b"]\n', "list.jsonl:1: expected a JSON object"),
        ("empty.jsonl", "\n\n", "empty.jsonl: no rows"),
        ("empty.json", "", "empty.json: no rows"),
        ("empty.csv", "", "empty.csv: no rows"),
        ("cells.csv", "a,b\n1,2\n1,2,3\n", "cells.csv:3: 3 cells but the header has 2 columns"),
        ("rows.txt", "hello", "unknown file type '.txt'"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_records(write(tmp_path, name, text))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a folder"):
        load_records(tmp_path)


def test_missing_field_names_the_row(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"instruction": "i", "output": "o"}\n{"instruction": "i2"}\n')
    with pytest.raises(UserError, match=r"a\.jsonl:2: missing field 'output' \(alpaca rows need instruction, output\)"):
        detect_schema(load_records(path))


def test_unknown_schema_lists_the_known_ones(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"question": "q", "answer": "a"}\n')
    with pytest.raises(UserError, match=r"a\.jsonl:1: unknown row schema with fields \['answer', 'question'\].*alpaca"):
        detect_schema(load_records(path))


def test_chat_rows_must_end_with_the_assistant(tmp_path):
    path = write(tmp_path, "a.jsonl", json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(UserError, match="a.jsonl:1: the last message must be the assistant's answer"):
        detect_schema(load_records(path))


LATIN1 = "Café crème".encode("latin-1")  # b"Caf\xe9 cr\xe8me": not UTF-8


@pytest.mark.parametrize("name, head, tail", [
    ("a.jsonl", b'{"text": "ok"}\n{"text": "', b'"}\n'),
    ("a.json", b'[{"text": "ok"},\n {"text": "', b'"}]\n'),
    ("a.csv", b'text\nok\n', b'\n'),
])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, name, head, tail):
    path = tmp_path / name
    path.write_bytes(head + LATIN1 + tail)
    with pytest.raises(UserError, match=rf"{name}:[23]: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        load_records(path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.csv").write_bytes(bom + "name,features\nLamp,bright\n".encode())
    assert load_records(tmp_path / "a.csv")[0].fields == {"name": "Lamp", "features": "bright"}  # not "\ufeffname"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "one"}\n')
    assert load_records(tmp_path / "a.jsonl")[0]["text"] == "one"
    (tmp_path / "a.json").write_bytes(bom + b'[{"text": "one"}]')
    assert load_records(tmp_path / "a.json")[0]["text"] == "one"


@pytest.mark.parametrize("text, message", [
    ('{"text": NaN}\n', "NaN is not a JSON number"),
    ('{"text": -Infinity}\n', "-Infinity is not a JSON number"),
    ("[" * 100_000 + "]" * 100_000 + "\n", "not valid JSON"),
    ('{"n": ' + "9" * 5000 + "}\n", "not valid JSON"),
])
def test_rows_json_cannot_hold_are_one_line_errors(tmp_path, text, message):
    path = write(tmp_path, "a.jsonl", text)
    with pytest.raises(UserError, match=re.escape(f"{path}:1: ") + ".*" + re.escape(message)) as info:
        load_records(path)
    assert "\n" not in str(info.value)
